/**
 * Diverged sessions through the compute service: compute in process (so the engine's decode can
 * be made to fail after it ran, as in attention-batcher-locks.test.ts: the real decode appends the
 * token, then the call throws) over a real kvstore process, called over gRPC.
 * - a healthy session's GetSession has an empty data_loss;
 * - a session whose decode failed after it may have appended: GetSession reports data_loss, the
 *   DATA_LOSS message every later call gets (an Attention prefill or decode, Generate, a move);
 *   freekv_compute_sessions_diverged_total counts it, freekv_compute_sessions_diverged holds it
 *   until CloseSession, and a warn line names the session, the layer and the engine's failure;
 * - MoveSession of such a session fails with that DATA_LOSS before anything reaches the target,
 *   and the session stays here (still listed by the kvstore, still closable);
 * - the drain's hand-off offers it to no peer and leaves it in place, with its reason logged.
 */
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { credentials, Metadata, Server, status, type ServiceError } from "@grpc/grpc-js";
import type { Registry } from "prom-client";
import type { DecodeInput } from "../../native/binding.js";
import type { Tensor } from "../../proto/gen/freekv/v1/common.js";
import { ArrivalState, GenerateRequest, SessionMoveServiceClient, SessionMoveServiceService, type GetSessionResponse, type Session, type SessionMoveServiceServer } from "../../proto/gen/freekv/v1/compute.js";
import { parseConfig } from "../../services/common/config.js";
import { bindServer } from "../../services/common/lifecycle.js";
import { createRegistry } from "../../services/common/metrics.js";
import { computeConfigSchema } from "../../services/compute/config.js";
import { createContext, loadServedModel, type ComputeContext } from "../../services/compute/context.js";
import { createComputeServer, type ComputeServer } from "../../services/compute/server.js";
import { divergedError } from "../../services/compute/sessions/diverged.js";
import { handOffSessions } from "../../services/compute/sessions/handoff.js";
import { AttentionStream, f32Tensor } from "../helpers/attention-stream.js";
import { capturedLogger } from "../helpers/log.js";
import { prng, randomF32 } from "../helpers/prng.js";
import { ATTENTION, QUIET, computeClient, registryValue, startService, unary, unaryError, type ServiceProcess, kvstoreSessions } from "../helpers/services.js";

const seed = (Date.now() ^ (process.pid << 7)) >>> 0;
const rand = prng(seed);

const MODEL = join(import.meta.dirname, "..", "fixtures", "models", "tiny-llama3");
const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 32, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 32, windowTokens: 32, selectTokens: 512 };
const KV = G.kvHeads * G.headDim;
const QD = G.queryHeads * G.headDim;

let kvstore: ServiceProcess;
let ctx: ComputeContext;
let registry: Registry;
let srv: ComputeServer;
let address: string;
let compute: ReturnType<typeof computeClient>;
/** The stand-in target of moves: counts the ReceiveSession calls that reach it, and refuses them. */
let target: Server;
let targetAddress: string;
const received: string[] = [];
/** The compute's log lines (warn and above), parsed. */
const lines: Array<Record<string, unknown>> = [];
/** Engine sessions whose decode calls throw after the real decode ran. */
const failFor = new Set<number>();
const failure = `engine failure after the append (seed ${seed})`;

beforeAll(async () => {
  kvstore = await startService("kvstore", { env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0" } });
  const log = capturedLogger(lines);
  const config = parseConfig(computeConfigSchema, { FREEKV_KVSTORE_ADDR: kvstore.address, FREEKV_MODEL: MODEL, FREEKV_THREADS: "2", FREEKV_DRAIN_HANDOFF_TIMEOUT_MS: "10000" });
  registry = createRegistry("compute");
  ctx = createContext(config, log, registry);
  // The real engine, whose decode throws after it ran for the sessions of failFor (their token is appended).
  const engine = ctx.engine;
  const decode = engine.decode.bind(engine);
  Object.defineProperty(engine, "decode", {
    configurable: true,
    value: async (layer: number, inputs: DecodeInput[]) => {
      const out = await decode(layer, inputs);
      if (inputs.some((i) => failFor.has(i.session))) throw new Error(failure);
      return out;
    },
  });
  srv = createComputeServer(ctx);
  address = `127.0.0.1:${await bindServer(srv.server, "127.0.0.1", 0)}`;
  srv.upstream(true);
  expect(await loadServedModel(ctx)).toBe(true);
  compute = computeClient(address);

  target = new Server();
  const refuse: SessionMoveServiceServer = {
    moveSession: (_call, cb) => cb({ code: status.UNIMPLEMENTED, details: "the stand-in target moves nothing" }),
    receiveSession: (call, cb) => {
      received.push(call.getPeer());
      cb({ code: status.FAILED_PRECONDITION, details: "the stand-in target takes no session" });
    },
    getArrival: (_call, cb) => cb(null, { state: ArrivalState.ARRIVAL_STATE_ABSENT }),
  };
  target.addService(SessionMoveServiceService, refuse);
  targetAddress = `127.0.0.1:${await bindServer(target, "127.0.0.1", 0)}`;
}, 120_000);

// A test that failed half-way leaves no session behind for the next one.
afterEach(async () => {
  for (const s of ctx.sessions.list()) await ctx.sessions.close(s.id).catch(() => undefined);
});

afterAll(async () => {
  compute?.close();
  target?.forceShutdown();
  srv?.server.forceShutdown();
  await ctx?.sessions.shutdown();
  ctx?.kvstore.close();
  await kvstore?.stop();
});

/** A metric's value from the compute's registry (its series matching `labels`, summed). */
const metric = (name: string, labels: Record<string, string> = {}) => registryValue(registry, name, labels);

const t32 = (data: Float32Array, shape: number[]): Tensor => f32Tensor(data, shape);
const decodeItem = (sessionId: string) => ({
  sessionId,
  q: t32(randomF32(QD, rand, 2), [G.queryHeads, G.headDim]),
  k: t32(randomF32(KV, rand), [G.kvHeads, G.headDim]),
  v: t32(randomF32(KV, rand), [G.kvHeads, G.headDim]),
});

/** An attention session (CreateSession over gRPC) with a random prefill on every layer; returns the Session CreateSession answered. */
async function open(id: string): Promise<Session> {
  const { session } = await unary<{ session: Session }>(compute, "createSession", { sessionId: id, kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: 600 });
  const st = new AttentionStream(compute);
  for (let l = 0; l < G.layers; l++) {
    const n = 20 + Math.floor(rand() * 60);
    await st.prefill(id, l, t32(randomF32(n * KV, rand), [n, G.kvHeads, G.headDim]), t32(randomF32(n * KV, rand), [n, G.kvHeads, G.headDim]));
  }
  expect(await st.close()).toBeUndefined();
  return session;
}

/** A decode of `id` that fails in the engine after the token was appended; returns its layer and the stream's error. */
async function diverge(id: string): Promise<{ layer: number; error: ServiceError }> {
  const layer = Math.floor(rand() * G.layers);
  const st = new AttentionStream(compute);
  const handle = ctx.sessions.get(id).engineSession;
  failFor.add(handle);
  try {
    const error = await st.decode(layer, [decodeItem(id)]).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(error, "the decode that failed in the engine").toBeDefined();
    return { layer, error: error! };
  } finally {
    failFor.delete(handle);
    await st.ended;
  }
}

const getSession = async (id: string) => (await unary<GetSessionResponse>(compute, "getSession", { sessionId: id })).session!;

/** The error of the first message of a fresh Attention stream. */
async function attentionError(send: (st: AttentionStream) => Promise<unknown>): Promise<ServiceError> {
  const st = new AttentionStream(compute);
  const e = await send(st).then(
    () => undefined,
    (x: ServiceError) => x,
  );
  if (!e) {
    await st.close();
    throw new Error("the Attention call succeeded but was expected to fail");
  }
  await st.ended;
  return e;
}

function generateError(sessionId: string): Promise<ServiceError> {
  return new Promise((resolve, reject) => {
    const call = compute.generate(GenerateRequest.fromPartial({ sessionId, prompt: { $case: "tokens", value: { ids: [1, 2, 3] } }, maxTokens: 2 }), new Metadata(), { deadline: Date.now() + 30_000 });
    call.on("data", () => {});
    call.on("error", resolve);
    call.on("end", () => reject(new Error("Generate succeeded but was expected to fail")));
  });
}

const kvSessions = (): Promise<string[]> => kvstoreSessions(kvstore.address);

let nextId = 0;
const newId = () => `dv-${seed}-${nextId++}`;

describe(`diverged sessions over gRPC (seed ${seed})`, () => {
  it("a healthy session has an empty data_loss (CreateSession and GetSession) and is not counted", async () => {
    const id = newId();
    const created = await open(id);
    expect(created.sessionId).toBe(id);
    expect(created.dataLoss).toBe("");
    const before = { total: await metric("freekv_compute_sessions_diverged_total"), open: await metric("freekv_compute_sessions_diverged") };
    // A decode that runs: the session stays healthy.
    const st = new AttentionStream(compute);
    const [out] = await st.decode(Math.floor(rand() * G.layers), [decodeItem(id)]);
    expect(out.shape).toEqual([G.queryHeads, G.headDim]);
    expect(await st.close()).toBeUndefined();
    const got = await getSession(id);
    expect(got.sessionId).toBe(id);
    expect(got.dataLoss).toBe("");
    expect(await metric("freekv_compute_sessions_diverged_total")).toBe(before.total);
    expect(await metric("freekv_compute_sessions_diverged")).toBe(before.open);
    await unary(compute, "closeSession", { sessionId: id });
  });

  it("a decode that failed after it may have appended: data_loss is the DATA_LOSS of every later call; counted, logged, and the gauge drops at close", async () => {
    const before = { total: await metric("freekv_compute_sessions_diverged_total"), open: await metric("freekv_compute_sessions_diverged") };
    const id = newId();
    const healthy = newId();
    await open(id);
    await open(healthy);
    const { layer, error } = await diverge(id);
    expect(error.details).toContain(failure);

    const got = await getSession(id);
    expect(got.sessionId).toBe(id);
    expect(got.dataLoss).toBe(divergedError(ctx.sessions.get(id))?.message);
    expect(got.dataLoss).toMatch(new RegExp(`^session "${id}": a decode of layer ${layer} failed in the engine \\(${failure.replace(/[()]/g, "\\$&")}\\) after it may have appended the token`));
    // The session in no failed call stays healthy.
    expect((await getSession(healthy)).dataLoss).toBe("");

    // Every later call gets exactly that status and message.
    const later = [
      await attentionError((st) => st.prefill(id, Math.floor(rand() * G.layers), t32(randomF32(4 * KV, rand), [4, G.kvHeads, G.headDim]), t32(randomF32(4 * KV, rand), [4, G.kvHeads, G.headDim]))),
      await attentionError((st) => st.decode(Math.floor(rand() * G.layers), [decodeItem(id)])),
      await generateError(id),
    ];
    for (const e of later) {
      expect(e.code).toBe(status.DATA_LOSS);
      expect(e.details).toBe(got.dataLoss);
    }

    expect(await metric("freekv_compute_sessions_diverged_total")).toBe(before.total + 1);
    expect(await metric("freekv_compute_sessions_diverged")).toBe(before.open + 1);
    const warned = lines.filter((l) => l.session === id && l.level === "warn" && /diverged/.test(String(l.msg)));
    expect(warned).toHaveLength(1);
    expect(warned[0]).toMatchObject({ layer, err: failure });

    // Closing it takes it off the gauge (the counter keeps it); a failed call does not count it twice.
    expect((await unary<{ closed: boolean }>(compute, "closeSession", { sessionId: id })).closed).toBe(true);
    expect(await metric("freekv_compute_sessions_diverged")).toBe(before.open);
    expect(await metric("freekv_compute_sessions_diverged_total")).toBe(before.total + 1);
    expect((await unaryError(compute, "getSession", { sessionId: id })).code).toBe(status.NOT_FOUND);
    expect((await getSession(healthy)).dataLoss).toBe("");
    await unary(compute, "closeSession", { sessionId: healthy });
  });

  it("MoveSession of a diverged session fails with its DATA_LOSS before anything reaches the target; the session stays here", async () => {
    const id = newId();
    await open(id);
    await diverge(id);
    const dataLoss = (await getSession(id)).dataLoss;
    expect(dataLoss).not.toBe("");
    const movesBefore = await metric("freekv_compute_session_moves_total", { role: "out", result: "data_loss" });
    const mover = new SessionMoveServiceClient(address, credentials.createInsecure());
    const err = await new Promise<ServiceError | undefined>((resolve) =>
      mover.moveSession({ sessionId: id, target: targetAddress, chunkBytes: 0 }, new Metadata(), { deadline: Date.now() + 20_000 }, (e) => resolve(e ?? undefined)),
    );
    mover.close();
    expect(err?.code).toBe(status.DATA_LOSS);
    expect(err?.details).toBe(dataLoss);
    expect(received).toEqual([]);
    expect(await metric("freekv_compute_session_moves_total", { role: "out", result: "data_loss" })).toBe(movesBefore + 1);
    // Still here, still diverged, still held by this pod's kvstore; it can be closed.
    expect((await getSession(id)).dataLoss).toBe(dataLoss);
    expect(await kvSessions()).toContain(id);
    expect((await unary<{ closed: boolean }>(compute, "closeSession", { sessionId: id })).closed).toBe(true);
    expect(await kvSessions()).not.toContain(id);
  });

  it("the drain's hand-off offers a diverged session to no peer and leaves it in place, logging why", async () => {
    const id = newId();
    await open(id);
    await diverge(id);
    const dataLoss = (await getSession(id)).dataLoss;
    expect(dataLoss).not.toBe("");
    // The only named session open here.
    expect(ctx.sessions.list().map((s) => s.id)).toEqual([id]);
    const failuresBefore = await metric("freekv_compute_handoff_failures_total");
    const r = await handOffSessions(ctx, srv.mover, [targetAddress], 10_000);
    expect(r).toEqual({ moved: 0, failed: 1 });
    expect(received).toEqual([]);
    expect(await metric("freekv_compute_handoff_failures_total")).toBe(failuresBefore + 1);
    const logged = lines.filter((l) => l.session === id && l.level === "error" && /not handed off/.test(String(l.msg)));
    expect(logged).toHaveLength(1);
    expect(logged[0].reason).toBe(dataLoss);
    expect((await getSession(id)).dataLoss).toBe(dataLoss);
    expect(await kvSessions()).toContain(id);
    expect((await unary<{ closed: boolean }>(compute, "closeSession", { sessionId: id })).closed).toBe(true);
  });
});
