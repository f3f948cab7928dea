/**
 * A diverged session's mark outlives its compute: it is saved with the session's metadata at the
 * kvstore (SessionMetadata.dataLoss) and a compute that re-attaches the session marks it again.
 * Compute A runs in process (so its engine's decode can be made to fail after it ran, as in
 * session-diverged.test.ts, and its commits to the kvstore can be made to fail), over a real
 * kvstore process; the restarted compute B is a real compute process against that same kvstore,
 * re-attaching its sessions at start (main.ts); malformed saved marks go through the re-attach of a
 * second in-process compute.
 * - the mark is at the kvstore before the failed decode is answered, whole (at most 2048
 *   characters, an engine message of any length included); a healthy session's metadata has none;
 * - a commit of the mark that fails degrades the session (logged, counted) and is retried until
 *   the kvstore has it; the session's calls get its DATA_LOSS meanwhile;
 * - after A drained without a hand-off (its sessions left in the kvstore, one of them with a mark
 *   whose commits failed until then, another whose commits never pass: logged at error), B
 *   re-attaches them: GetSession's data_loss is the original message, an Attention prefill and
 *   decode, Generate and MoveSession get exactly that DATA_LOSS, the gauge counts them, the
 *   counter does not count them again, and a healthy session re-attached beside them serves;
 * - a continued Generate session's turn end (its pending token) is at the kvstore before the
 *   final answer, so a compute that dies right after it leaves a session that continues exactly;
 * - a saved mark that is malformed (another type, null, empty, too long) still marks the session,
 *   with a DATA_LOSS that says so, logged at error, and is replaced at the kvstore by that message;
 *   a well-formed one is restored as saved; metadata that is not a JSON object is foreign
 *   metadata (a healthy attention session), not a crash.
 */
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { credentials, Metadata, status, type ServiceError } from "@grpc/grpc-js";
import type { Registry } from "prom-client";
import type { DecodeInput } from "../../native/binding.js";
import type { Tensor } from "../../proto/gen/freekv/v1/common.js";
import { GenerateRequest, SessionMoveServiceClient, type GetSessionResponse, type Session } from "../../proto/gen/freekv/v1/compute.js";
import type { AttachSessionResponse, CommitPagesRequest } from "../../proto/gen/freekv/v1/kvstore.js";
import { parseConfig } from "../../services/common/config.js";
import { bindServer } from "../../services/common/lifecycle.js";
import { createRegistry } from "../../services/common/metrics.js";
import { computeConfigSchema } from "../../services/compute/config.js";
import { createContext, loadServedModel, type ComputeContext } from "../../services/compute/context.js";
import { createComputeServer, type ComputeServer } from "../../services/compute/server.js";
import { divergedError, MAX_DATA_LOSS_CHARS } from "../../services/compute/sessions/diverged.js";
import { AttentionStream, f32Tensor } from "../helpers/attention-stream.js";
import { capturedLogger } from "../helpers/log.js";
import { prng, randomF32 } from "../helpers/prng.js";
import { ATTENTION, QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, registryValue, startService, unary, type ServiceProcess } from "../helpers/services.js";

const seed = (Date.now() ^ (process.pid << 7)) >>> 0;
const rand = prng(seed);

const MODEL = join(import.meta.dirname, "..", "fixtures", "models", "tiny-llama3");
const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 32, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 32, windowTokens: 32, selectTokens: 512 };
const KV = G.kvHeads * G.headDim;
const QD = G.queryHeads * G.headDim;
const MAX = 600;

let kvstore: ServiceProcess;
let kv: ReturnType<typeof kvstoreClient>;
/** Compute A, in process. */
let ctx: ComputeContext;
let registry: Registry;
let srv: ComputeServer;
let compute: ReturnType<typeof computeClient>;
/** Compute B, the restarted one: a process. */
let restarted: ServiceProcess | undefined;
/** A second in-process compute that re-attaches sessions (the malformed marks). */
let other: { ctx: ComputeContext; registry: Registry; lines: Array<Record<string, unknown>> } | undefined;
/** Compute A's log lines (warn and above), parsed. */
let lines: Array<Record<string, unknown>>;
/** Engine sessions whose decode calls throw after the real decode ran. */
const failFor = new Set<number>();
/** The engine's failure message of the next diverge(). */
let failure = `engine failure after the append (seed ${seed})`;
/** Sessions whose commits to the kvstore fail: until compute A shuts down, or always. */
const commitsFail = new Map<string, "until-shutdown" | "always">();
// Sessions whose commits reach the kvstore only after this many ms (a slow kvstore).
const commitsSlow = new Map<string, number>();
let shuttingDown = false;
/** Sessions made at the kvstore directly (for a re-attach): released there after each test. */
const made: string[] = [];

/** An in-process compute over the test's kvstore, logging warn and above into `lines`. */
function inProcessCompute(): { ctx: ComputeContext; registry: Registry; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const log = capturedLogger(lines);
  const config = parseConfig(computeConfigSchema, { FREEKV_KVSTORE_ADDR: kvstore.address, FREEKV_MODEL: MODEL, FREEKV_THREADS: "2" });
  const registry = createRegistry("compute");
  return { ctx: createContext(config, log, registry), registry, lines };
}

beforeAll(async () => {
  kvstore = await startService("kvstore", { env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0" } });
  kv = kvstoreClient(kvstore.address);
  ({ ctx, registry, lines } = inProcessCompute());
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
  // The real kvstore client, whose commits fail (UNAVAILABLE, as when the kvstore is unreachable) for the sessions of commitsFail.
  const commit = ctx.kvstore.commit.bind(ctx.kvstore);
  Object.defineProperty(ctx.kvstore, "commit", {
    configurable: true,
    value: async (req: CommitPagesRequest, signal?: AbortSignal) => {
      const mode = commitsFail.get(req.sessionId);
      if (mode === "always" || (mode === "until-shutdown" && !shuttingDown)) {
        throw Object.assign(new Error("14 UNAVAILABLE: the kvstore is unreachable (test)"), { code: status.UNAVAILABLE, details: "the kvstore is unreachable (test)" });
      }
      const slow = commitsSlow.get(req.sessionId);
      if (slow) await new Promise((r) => setTimeout(r, slow));
      return commit(req, signal);
    },
  });
  srv = createComputeServer(ctx);
  const address = `127.0.0.1:${await bindServer(srv.server, "127.0.0.1", 0)}`;
  srv.upstream(true);
  expect(await loadServedModel(ctx)).toBe(true);
  compute = computeClient(address);
}, 120_000);

afterEach(async () => {
  for (const s of ctx.sessions.list()) await ctx.sessions.close(s.id).catch(() => undefined);
  if (other) for (const s of other.ctx.sessions.list()) await other.ctx.sessions.close(s.id).catch(() => undefined);
  for (const id of made.splice(0)) await unary(kv, "releaseSession", { sessionId: id }).catch(() => undefined);
});

afterAll(async () => {
  compute?.close();
  srv?.server.forceShutdown();
  await ctx?.sessions.shutdown();
  ctx?.kvstore.close();
  await other?.ctx.sessions.shutdown();
  other?.ctx.kvstore.close();
  await restarted?.stop();
  kv?.close();
  await kvstore?.stop();
});

/** A metric's value from a registry (its series matching `labels`, summed). */
const metric = registryValue;

const t32 = (data: Float32Array, shape: number[]): Tensor => f32Tensor(data, shape);
const decodeItem = (sessionId: string) => ({
  sessionId,
  q: t32(randomF32(QD, rand, 2), [G.queryHeads, G.headDim]),
  k: t32(randomF32(KV, rand), [G.kvHeads, G.headDim]),
  v: t32(randomF32(KV, rand), [G.kvHeads, G.headDim]),
});
const prefillOf = (n: number) => [t32(randomF32(n * KV, rand), [n, G.kvHeads, G.headDim]), t32(randomF32(n * KV, rand), [n, G.kvHeads, G.headDim])] as const;

/** An attention session on compute A with a random prefill on every layer. */
async function open(id: string): Promise<Session> {
  const { session } = await unary<{ session: Session }>(compute, "createSession", { sessionId: id, kind: ATTENTION, geometry: G, retrieval: R, maxContextTokens: MAX });
  const st = new AttentionStream(compute);
  for (let l = 0; l < G.layers; l++) await st.prefill(id, l, ...prefillOf(20 + Math.floor(rand() * 60)));
  expect(await st.close()).toBeUndefined();
  // The prefill's pages are committed in the background: a test that makes the kvstore refuse
  // commits next must not catch this one (the session would be degraded, and its decode refused
  // with UNAVAILABLE before it reached the engine).
  const s = ctx.sessions.get(id);
  await s.commitChain;
  expect(s.commitError).toBeUndefined();
  return session;
}

/**
 * A decode of `id` on compute A that fails in the engine after the token was appended; returns
 * GetSession's data_loss after it. `atAnswer` gets the session's metadata at the kvstore as it
 * was when the failure reached the client.
 */
async function diverge(id: string, atAnswer?: (saved: Record<string, unknown>) => void): Promise<string> {
  const st = new AttentionStream(compute);
  const handle = ctx.sessions.get(id).engineSession;
  failFor.add(handle);
  try {
    const error = await st.decode(Math.floor(rand() * G.layers), [decodeItem(id)]).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(error, "the decode that failed in the engine").toBeDefined();
    atAnswer?.(await savedMetadata(id));
  } finally {
    failFor.delete(handle);
    await st.ended;
  }
  const dataLoss = (await unary<GetSessionResponse>(compute, "getSession", { sessionId: id })).session!.dataLoss;
  expect(dataLoss).toMatch(/after it may have appended the token/);
  return dataLoss;
}

/** The session's metadata as the kvstore holds it (an AttachSession of the existing session changes nothing). */
async function savedMetadata(id: string): Promise<Record<string, unknown>> {
  const r = await unary<AttachSessionResponse>(kv, "attachSession", { sessionId: id });
  expect(r.created).toBe(false);
  return JSON.parse(Buffer.from(r.metadata).toString("utf8")) as Record<string, unknown>;
}

async function until(what: string, ok: () => Promise<boolean> | boolean, ms = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!(await ok())) {
    if (Date.now() - t0 > ms) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const commitFailedLogged = (id: string) => lines.some((l) => l.session === id && l.level === "error" && /commit to the kvstore failed/.test(String(l.msg)));

let nextId = 0;
const newId = () => `dvr-${seed}-${nextId++}`;

describe(`diverged sessions across a compute restart (seed ${seed})`, () => {
  it("the mark is saved with the session's metadata at the kvstore before the failed decode is answered, whole; a healthy session's has none", async () => {
    const id = newId();
    const long = newId();
    const healthy = newId();
    for (const s of [id, long, healthy]) await open(s);
    let atAnswer: Record<string, unknown> = {};
    // A slow kvstore: the answer waits for the commit that carries the mark.
    commitsSlow.set(id, 400);
    let dataLoss: string;
    try {
      dataLoss = await diverge(id, (m) => (atAnswer = m));
    } finally {
      commitsSlow.delete(id);
    }
    expect(atAnswer).toMatchObject({ kind: "attention", dataLoss });
    expect(await savedMetadata(id)).toMatchObject({ kind: "attention", dataLoss });
    expect(ctx.sessions.get(id).metadataDirty).toBe(false);

    // An engine message past the bound: the message is shortened to fit, and saved as the session's calls get it.
    const plain = failure;
    failure = `${plain} ${"x".repeat(3 * MAX_DATA_LOSS_CHARS)}`;
    let longLoss: string;
    try {
      longLoss = await diverge(long, (m) => (atAnswer = m));
    } finally {
      failure = plain;
    }
    expect(longLoss.length).toBeLessThanOrEqual(MAX_DATA_LOSS_CHARS);
    expect(longLoss).toBe(divergedError(ctx.sessions.get(long))?.message);
    expect(longLoss).toMatch(/x…\) after it may have appended the token; the session's context is no longer known. Close it and start a new session$/);
    expect(atAnswer.dataLoss).toBe(longLoss);

    expect((await unary<GetSessionResponse>(compute, "getSession", { sessionId: healthy })).session!.dataLoss).toBe("");
    expect(await savedMetadata(healthy)).not.toHaveProperty("dataLoss");
  });

  it("a commit of the mark that fails degrades the session (logged, counted) and is retried until the kvstore has it", async () => {
    const id = newId();
    await open(id);
    const failuresBefore = await metric(registry, "freekv_compute_commit_failures_total");
    commitsFail.set(id, "always");
    try {
      const dataLoss = await diverge(id);
      await until("the failed commit is logged", () => commitFailedLogged(id));
      expect(await metric(registry, "freekv_compute_commit_failures_total")).toBeGreaterThan(failuresBefore);
      expect(await savedMetadata(id)).not.toHaveProperty("dataLoss");
      expect(ctx.sessions.get(id).metadataDirty).toBe(true);
      // The mark in memory is what the session's calls are refused by meanwhile.
      const st = new AttentionStream(compute);
      const e = await st.decode(0, [decodeItem(id)]).then(
        () => undefined,
        (x: ServiceError) => x,
      );
      await st.ended;
      expect(e?.code).toBe(status.DATA_LOSS);
      expect(e?.details).toBe(dataLoss);
      // The kvstore is reachable again: the retry carries the mark.
      commitsFail.delete(id);
      await until("the retried commit saved the mark", async () => (await savedMetadata(id)).dataLoss === dataLoss, 10_000);
      await until("the session's metadata is clean", () => !ctx.sessions.get(id).metadataDirty);
    } finally {
      commitsFail.delete(id);
    }
  });

  it("a saved mark is restored by a re-attach: a well-formed one as saved, a malformed one with a DATA_LOSS that says so (logged, replaced at the kvstore)", async () => {
    other = inProcessCompute();
    const c = other;
    const exactly = `session "x": ${"y".repeat(MAX_DATA_LOSS_CHARS - 13)}`;
    expect(exactly).toHaveLength(MAX_DATA_LOSS_CHARS);
    const cases: Array<{ name: string; metadata: string; restored?: string; malformed?: RegExp }> = [
      { name: "none", metadata: JSON.stringify({ kind: "attention" }) },
      { name: "well-formed", metadata: JSON.stringify({ kind: "attention", dataLoss: "session \"w\": a decode failed (saved)" }), restored: "session \"w\": a decode failed (saved)" },
      { name: "at the bound", metadata: JSON.stringify({ kind: "attention", dataLoss: exactly }), restored: exactly },
      { name: "a number", metadata: JSON.stringify({ kind: "attention", dataLoss: 42 }), malformed: /\(expected a string, got number\)/ },
      { name: "null", metadata: JSON.stringify({ kind: "attention", dataLoss: null }), malformed: /\(expected a string, got null\)/ },
      { name: "an array", metadata: JSON.stringify({ kind: "attention", dataLoss: ["a"] }), malformed: /\(expected a string, got an array\)/ },
      { name: "an object", metadata: JSON.stringify({ kind: "attention", dataLoss: { message: "m" } }), malformed: /\(expected a string, got object\)/ },
      { name: "empty", metadata: JSON.stringify({ kind: "attention", dataLoss: "" }), malformed: /\(it is empty\)/ },
      { name: "too long", metadata: JSON.stringify({ kind: "attention", dataLoss: `${exactly}z` }), malformed: new RegExp(`\\(it has ${MAX_DATA_LOSS_CHARS + 1} characters, more than ${MAX_DATA_LOSS_CHARS}\\)`) },
      { name: "not an object", metadata: "null" },
      { name: "not JSON", metadata: "{dataLoss" },
    ];
    const ids = new Map<string, string>();
    for (const k of cases) {
      const id = newId();
      ids.set(k.name, id);
      made.push(id);
      const r = await unary<AttachSessionResponse>(kv, "attachSession", { sessionId: id, geometry: G, retrieval: R, maxContextTokens: MAX, metadata: Buffer.from(k.metadata) });
      expect(r.created).toBe(true);
    }
    for (const k of cases) {
      const id = ids.get(k.name)!;
      const s = await c.ctx.sessions.reattach(id);
      const got = c.ctx.sessions.toProto(s).dataLoss;
      if (k.restored === undefined && k.malformed === undefined) {
        expect(got, k.name).toBe("");
        expect(() => c.ctx.sessions.checkLost(s), k.name).not.toThrow();
        continue;
      }
      const want = k.restored ?? got;
      if (k.malformed) {
        expect(got, k.name).toMatch(k.malformed);
        expect(got, k.name).toMatch(new RegExp(`^session "${id}": its saved data-loss mark is malformed .*; a decode may have failed after it appended a token, and the session's context is not known. Close it and start a new session$`));
        expect(c.lines.filter((l) => l.session === id && l.level === "error" && /saved data-loss mark is malformed/.test(String(l.msg))), k.name).toHaveLength(1);
        // The kvstore now holds the message the session is refused with.
        await until(`${k.name}: the kvstore holds the replaced mark`, async () => (await savedMetadata(id)).dataLoss === got, 5_000);
      } else {
        expect(got, k.name).toBe(want);
        expect(c.lines.filter((l) => l.session === id && l.level === "warn" && /re-attached diverged/.test(String(l.msg))), k.name).toHaveLength(1);
      }
      let thrown: ServiceError | undefined;
      try {
        c.ctx.sessions.checkLost(s);
      } catch (e) {
        thrown = e as ServiceError;
      }
      expect(thrown?.code, k.name).toBe(status.DATA_LOSS);
      expect(thrown?.message, k.name).toBe(got);
    }
    const marked = cases.filter((k) => k.restored !== undefined || k.malformed !== undefined).length;
    expect(await metric(c.registry, "freekv_compute_sessions_diverged")).toBe(marked);
    expect(await metric(c.registry, "freekv_compute_sessions_diverged_total")).toBe(0);
  });

  it("a continued session's turn end (its pending token) is at the kvstore before the final answer, even with a slow kvstore", async () => {
    const id = newId();
    await unary(compute, "createSession", { sessionId: id, kind: 1, retrieval: R, maxContextTokens: MAX });
    // Every commit of this session reaches the kvstore 400 ms late.
    commitsSlow.set(id, 400);
    try {
      for (let turn = 0; turn < 2; turn++) {
        const ids = Array.from({ length: 5 + Math.floor(rand() * 20) }, () => 3 + Math.floor(rand() * 250));
        const atFinal = await new Promise<Record<string, unknown>>((resolve, reject) => {
          const call = compute.generate(GenerateRequest.fromPartial({ sessionId: id, prompt: { $case: "tokens", value: { ids } }, maxTokens: 3 + Math.floor(rand() * 6) }), new Metadata(), { deadline: Date.now() + 30_000 });
          call.on("data", (m: { event?: { $case: string } }) => {
            if (m.event?.$case === "final") savedMetadata(id).then(resolve, reject);
          });
          call.on("error", reject);
        });
        const held = ctx.sessions.get(id).metadata.generate as { pendingToken?: number };
        expect(held.pendingToken).toBeTypeOf("number");
        expect(atFinal.generate, `turn ${turn}`).toEqual(held);
        expect(atFinal.contextTokens).toBe(ctx.sessions.get(id).contextTokens);
      }
    } finally {
      commitsSlow.delete(id);
    }
  });

  it("compute drained without a hand-off and restarted against the same kvstore: the re-attached sessions keep their marks; a healthy one serves", async () => {
    const d = newId();
    const e = newId();
    const f = newId();
    const h = newId();
    for (const s of [d, e, f, h]) await open(s);
    const lossD = await diverge(d);
    await until("the kvstore holds d's mark", async () => (await savedMetadata(d)).dataLoss === lossD, 5_000);
    // e's mark cannot be saved until the shutdown; f's never can.
    commitsFail.set(e, "until-shutdown");
    commitsFail.set(f, "always");
    const lossE = await diverge(e);
    await diverge(f);
    await until("e's and f's failed commits are logged", () => commitFailedLogged(e) && commitFailedLogged(f));
    expect(await savedMetadata(e)).not.toHaveProperty("dataLoss");
    expect(await metric(registry, "freekv_compute_sessions_diverged")).toBe(3);
    const totalA = await metric(registry, "freekv_compute_sessions_diverged_total");

    // A's drain: no hand-off; its sessions are committed and unmapped, the kvstore keeps them.
    shuttingDown = true;
    srv.server.forceShutdown();
    await ctx.sessions.shutdown();
    const notSaved = lines.filter((l) => l.level === "error" && /data-loss mark is not saved at the kvstore/.test(String(l.msg)));
    expect(notSaved.map((l) => l.session)).toEqual([f]);
    expect(await savedMetadata(e)).toMatchObject({ dataLoss: lossE });
    expect(await savedMetadata(f)).not.toHaveProperty("dataLoss");

    // B: a compute process that re-attaches every session the kvstore holds at start.
    restarted = await startService("compute", {
      env: { ...QUIET, FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: kvstore.address, FREEKV_MODEL: MODEL, FREEKV_THREADS: "2" },
    });
    const b = computeClient(restarted.address);
    try {
      const getB = async (id: string) => (await unary<GetSessionResponse>(b, "getSession", { sessionId: id })).session!;
      expect((await getB(d)).dataLoss).toBe(lossD);
      expect((await getB(e)).dataLoss).toBe(lossE);
      expect((await getB(h)).dataLoss).toBe("");

      for (const [id, loss] of [
        [d, lossD],
        [e, lossE],
      ]) {
        const errors: Array<ServiceError | undefined> = [];
        for (const send of [(st: AttentionStream) => st.decode(Math.floor(rand() * G.layers), [decodeItem(id)]), (st: AttentionStream) => st.prefill(id, Math.floor(rand() * G.layers), ...prefillOf(4))]) {
          const st = new AttentionStream(b);
          errors.push(
            await send(st).then(
              () => undefined,
              (x: ServiceError) => x,
            ),
          );
          await st.close().catch(() => undefined);
          await st.ended.catch(() => undefined);
        }
        errors.push(
          await new Promise<ServiceError | undefined>((resolve) => {
            const call = b.generate(GenerateRequest.fromPartial({ sessionId: id, prompt: { $case: "tokens", value: { ids: [1, 2, 3] } }, maxTokens: 2 }), new Metadata(), { deadline: Date.now() + 30_000 });
            call.on("data", () => {});
            call.on("error", resolve);
            call.on("end", () => resolve(undefined));
          }),
        );
        const mover = new SessionMoveServiceClient(restarted.address, credentials.createInsecure());
        errors.push(
          await new Promise<ServiceError | undefined>((resolve) =>
            mover.moveSession({ sessionId: id, target: "127.0.0.1:9", chunkBytes: 0 }, new Metadata(), { deadline: Date.now() + 20_000 }, (x) => resolve(x ?? undefined)),
          ),
        );
        mover.close();
        for (const x of errors) {
          expect(x?.code, id).toBe(status.DATA_LOSS);
          expect(x?.details, id).toBe(loss);
        }
      }

      // The healthy session re-attached beside them serves.
      const st = new AttentionStream(b);
      const [out] = await st.decode(Math.floor(rand() * G.layers), [decodeItem(h)]);
      expect(out.shape).toEqual([G.queryHeads, G.headDim]);
      expect(await st.close()).toBeUndefined();
      expect((await getB(h)).dataLoss).toBe("");

      // The gauge holds the re-attached marks; the counter counts this process's decodes only.
      let text = await fetchMetrics(restarted.metricsPort);
      expect(metricValue(text, "freekv_compute_sessions_diverged")).toBe(2);
      expect(metricValue(text, "freekv_compute_sessions_diverged_total")).toBe(0);
      expect(totalA).toBeGreaterThanOrEqual(3);
      // Closing one takes it off the gauge, and its copy off the kvstore.
      expect((await unary<{ closed: boolean }>(b, "closeSession", { sessionId: d })).closed).toBe(true);
      text = await fetchMetrics(restarted.metricsPort);
      expect(metricValue(text, "freekv_compute_sessions_diverged")).toBe(1);
      for (const id of [e, f, h]) await unary(b, "closeSession", { sessionId: id });
      expect((await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds.filter((x) => [d, e, f, h].includes(x))).toEqual([]);
    } finally {
      b.close();
    }
  });
});
