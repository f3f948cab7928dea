/**
 * Moving sessions between two pods (compute + kvstore pairs as real processes, each its own shared
 * memory and in-memory directory) that share the session owners in Redis (a prefix of this run).
 * A session moved after its first turn continues on the target with exactly the greedy tokens of
 * a twin that never moved (the built-in model; a small retrieval budget, so selection state has to
 * survive the move); the source then redirects its calls to the target. A move that fails (an
 * unreachable target, the pod itself, a caller that gives up at any point, including after the
 * target took the session and before its answer arrived) leaves the session on exactly one pod,
 * whole. A pod stopped with FREEKV_DRAIN_HANDOFF=owners finds the other one live
 * in the owners directory and hands its sessions to it, the client package follows, and a session
 * the peer refuses is logged and counted.
 * Skipped, saying so, without Redis.
 */
import { connect, createServer, type Socket } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { Redis } from "ioredis";
import { FreeKvClient, SESSION_OWNER_KEY } from "../../packages/client/src/index.js";
import { ArrivalState, GenerateRequest, MoveSessionRequest, SessionMoveServiceClient, SessionMoveServiceService, type GenerateResponse, type ReceiveSessionRequest } from "../../proto/gen/freekv/v1/compute.js";
import { KvStoreTransferServiceClient, type ExportSessionResponse, type SessionTransferHeader } from "../../proto/gen/freekv/v1/kvstore.js";
import { MAX_METADATA_BYTES } from "../../services/kvstore/store.js";
import { credentials, Server, ServerCredentials } from "@grpc/grpc-js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startTiers, unary, unaryError, type Tiers, redisUp, kvstoreSessions } from "../helpers/services.js";

const REDIS = "redis://127.0.0.1:6379/0";
const up = await redisUp();
if (!up) console.warn("session-move tests skipped: no Redis answers PING at 127.0.0.1:6379");

const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const p = (srv.address() as { port: number }).port;
      srv.close(() => resolve(p));
    });
  });

const GREEDY = { temperature: 0, topP: 0, topK: 0, seed: 0 };
// A budget smaller than the context: selection, speculation and correction state travel with the session.
const RETRIEVAL = { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 32, tau: 0.9, tauSet: true };

const kvSessions = (t: Tiers): Promise<string[]> => kvstoreSessions(t.kvstore.address);

describe.skipIf(!up)("moving sessions between two pods", () => {
  const prefix = `freekv-move-${process.pid}-${Date.now()}:`;
  const rand = prng(Number(process.env.FREEKV_TEST_SEED ?? 9091));
  const tokens = (n: number) => ({ $case: "tokens" as const, value: { ids: Array.from({ length: n }, () => 3 + Math.floor(rand() * 400)) } });
  let a: Tiers, b: Tiers;
  let bAddress: string;
  beforeAll(async () => {
    const [pa, pb] = [await freePort(), await freePort()];
    bAddress = `127.0.0.1:${pb}`;
    const computeEnv = (port: number) => ({ ...QUIET, FREEKV_THREADS: "1", FREEKV_COMPUTE_PORT: String(port), FREEKV_SESSION_OWNERS: REDIS, FREEKV_SESSION_OWNERS_PREFIX: prefix, FREEKV_ADVERTISE_ADDRESS: `127.0.0.1:${port}` });
    // A hands its sessions off when it drains; B takes no session that may grow past 8192 tokens.
    // Its peers are the live pods of the owners directory (B announces itself there).
    a = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...computeEnv(pa), FREEKV_DRAIN_HANDOFF: "owners", FREEKV_LOG_LEVEL: "info" } });
    b = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...computeEnv(pb), FREEKV_MAX_CONTEXT_LIMIT: "8192" } });
  }, 180_000);
  afterAll(async () => {
    await a?.stop();
    await b?.stop();
    const r = new Redis(REDIS);
    await r.del(`${prefix}owners`, ...(await r.keys(`${prefix}pod:*`)));
    r.disconnect();
  });

  it("continues a moved session on the target with the tokens of a session that never moved, and redirects from the source", async () => {
    const sid = `mv-${Math.floor(rand() * 1e9)}`;
    const toA = new FreeKvClient(a.compute.address);
    try {
      for (const id of [sid, `${sid}-twin`]) await toA.createSession({ sessionId: id, kind: 1, retrieval: RETRIEVAL, maxContextTokens: 1024 });
      const turn1 = tokens(150);
      const t1 = await toA.generateText({ sessionId: sid, prompt: turn1, maxTokens: 12, sampling: GREEDY });
      const t1twin = await toA.generateText({ sessionId: `${sid}-twin`, prompt: turn1, maxTokens: 12, sampling: GREEDY });
      expect(t1.tokenIds).toEqual(t1twin.tokenIds);

      const moved = await toA.moveSession({ sessionId: sid, target: b.compute.address, chunkBytes: 4096 });
      expect(moved.target).toBe(b.compute.address);
      expect(moved.contextTokens).toBe(t1.final.usage!.contextTokens);
      expect(moved.chunks).toBeGreaterThan(1);
      expect(await kvSessions(a)).not.toContain(sid);
      expect(await kvSessions(b)).toContain(sid);
      const r = new Redis(REDIS);
      expect(await r.hget(`${prefix}owners`, sid)).toBe(b.compute.address);
      r.disconnect();

      // The source answers with the target in the trailer.
      const stub = computeClient(a.compute.address);
      const err = await new Promise<ServiceError>((resolve) => {
        const call = stub.generate(GenerateRequest.fromPartial({ sessionId: sid, prompt: tokens(3), maxTokens: 2 }), new Metadata(), { deadline: Date.now() + 10_000 });
        call.on("data", (_: GenerateResponse) => {});
        call.on("error", resolve);
      });
      stub.close();
      expect(err.code).toBe(status.FAILED_PRECONDITION);
      expect(err.metadata.get(SESSION_OWNER_KEY)).toEqual([b.compute.address]);

      // Turns 2 and 3: the moved session on B, the twin on A.
      for (const prompt of [tokens(40), tokens(9)]) {
        const viaMoved = await toA.generateText({ sessionId: sid, prompt, maxTokens: 12, sampling: GREEDY });
        const twin = await toA.generateText({ sessionId: `${sid}-twin`, prompt, maxTokens: 12, sampling: GREEDY });
        expect(viaMoved.tokenIds).toEqual(twin.tokenIds);
        expect(viaMoved.tokenIds.length).toBe(12);
        expect(viaMoved.final.usage!.contextTokens).toBe(twin.final.usage!.contextTokens);
      }
      expect(toA.addressFor(sid)).toBe(b.compute.address);
      await toA.closeSession({ sessionId: sid });
      await toA.closeSession({ sessionId: `${sid}-twin` });
      const m = await fetchMetrics(a.compute.metricsPort);
      expect(metricValue(m, "freekv_compute_session_moves_total", 'role="out",result="ok"')).toBe(1);
    } finally {
      toA.close();
    }
  }, 120_000);

  it("keeps the session whole on exactly one pod when a move fails or its caller gives up", async () => {
    const toA = new FreeKvClient(a.compute.address, { retry: { maxAttempts: 1 } });
    const mover = new SessionMoveServiceClient(a.compute.address, credentials.createInsecure());
    const move = (req: object, deadlineMs: number) =>
      new Promise<ServiceError | undefined>((resolve) => mover.moveSession(MoveSessionRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + deadlineMs }, (e) => resolve(e ?? undefined)));
    try {
      const sid = `mvf-${Math.floor(rand() * 1e9)}`;
      await toA.createSession({ sessionId: sid, kind: 1, retrieval: RETRIEVAL, maxContextTokens: 1024 });
      await toA.generateText({ sessionId: sid, prompt: tokens(120), maxTokens: 4, sampling: GREEDY });
      const free = await freePort();
      const nobody = `127.0.0.1:${free}`;
      // Ports outside 1-65535 and ids no session can have are the caller's mistakes, named by field.
      const badPort = [0, 65536 + Math.floor(rand() * 30000), 100000 + Math.floor(rand() * 900000)][Math.floor(rand() * 3)];
      const badId = ["bad id!", "x".repeat(129 + Math.floor(rand() * 5000)), "../x", "a/b"][Math.floor(rand() * 4)];
      const refusals: Array<[object, number, string?]> = [
        [{ sessionId: sid, target: nobody }, status.UNAVAILABLE],
        // An IPv6 address in brackets is a target (nobody listens there either).
        [{ sessionId: sid, target: `[::1]:${free}` }, status.UNAVAILABLE],
        [{ sessionId: sid, target: a.compute.address }, status.FAILED_PRECONDITION],
        [{ sessionId: sid, target: "no-port" }, status.INVALID_ARGUMENT, "target"],
        [{ sessionId: sid, target: "" }, status.INVALID_ARGUMENT, "target"],
        [{ sessionId: sid, target: `127.0.0.1:${badPort}` }, status.INVALID_ARGUMENT, "target"],
        [{ sessionId: sid, target: "[::1:80" }, status.INVALID_ARGUMENT, "target"],
        [{ sessionId: "", target: bAddress }, status.INVALID_ARGUMENT, "session_id"],
        [{ sessionId: badId, target: bAddress }, status.INVALID_ARGUMENT, "session_id"],
        [{ sessionId: "no-such-session", target: bAddress }, status.NOT_FOUND],
        [{ sessionId: sid, target: bAddress, chunkBytes: 10 }, status.INVALID_ARGUMENT, "chunk_bytes"],
      ];
      for (const [req, code, field] of refusals) {
        const e = await move(req, 20_000);
        expect(e ? status[e.code] : "OK", `${JSON.stringify(req).slice(0, 200)}: ${e?.details}`).toBe(status[code]);
        if (field) expect(e?.details).toMatch(new RegExp(`^${field}: `));
      }
      expect(await kvSessions(a)).toContain(sid);
      expect(await kvSessions(b)).not.toContain(sid);
      // Where a move stands on a pod (what a source whose answer was lost asks the target): a
      // session created there did not arrive by any move.
      const arrival = (c: SessionMoveServiceClient, id: string, moveId?: string) =>
        new Promise<string>((resolve) => c.getArrival({ sessionId: id, moveId }, new Metadata(), { deadline: Date.now() + 5000 }, (e, r) => resolve(e ? status[e.code] : ArrivalState[r!.state])));
      const atB = new SessionMoveServiceClient(bAddress, credentials.createInsecure());
      const someMove = `m-${Math.floor(rand() * 1e9)}`;
      expect(await arrival(mover, sid, someMove)).toBe("ARRIVAL_STATE_ABSENT");
      expect(await arrival(atB, sid, someMove)).toBe("ARRIVAL_STATE_ABSENT");
      expect(await arrival(atB, "../x", someMove)).toBe("INVALID_ARGUMENT");
      expect(await arrival(mover, sid)).toBe("INVALID_ARGUMENT");
      atB.close();
      // Callers that give up after a few milliseconds, at different points of the move: afterwards
      // exactly one pod holds the session, and it answers through the client.
      const outcomes: string[] = [];
      const segmentBytes = async (t: Tiers) => {
        const c = kvstoreClient(t.kvstore.address);
        try {
          return Number((await unary<{ segmentBytes: number }>(c, "getStats", {})).segmentBytes);
        } finally {
          c.close();
        }
      };
      const baseline = await segmentBytes(b);
      for (const ms of [1, 60, 150, 250, 400, 600, 1500, 30_000]) {
        const e = await move({ sessionId: sid, target: bAddress, chunkBytes: 4096 }, ms);
        let onA = false;
        let onB = false;
        const t0 = Date.now();
        // The target's side ends when its stream does: wait until the two agree.
        for (;;) {
          onA = (await kvSessions(a)).includes(sid);
          onB = (await kvSessions(b)).includes(sid);
          if (onA !== onB || Date.now() - t0 > 10_000) break;
          await new Promise((r) => setTimeout(r, 50));
        }
        outcomes.push(e ? status[e.code] : "OK");
        expect([onA, onB], `deadline ${ms} ms: ${e ? status[e.code] : "OK"}`).not.toEqual([true, true]);
        expect([onA, onB]).not.toEqual([false, false]);
        if (e) expect([status.DEADLINE_EXCEEDED, status.CANCELLED]).toContain(e.code);
        const got = await toA.getSession({ sessionId: sid });
        expect(Number(got.session!.contextTokens)).toBeGreaterThan(120);
        if (onB) {
          // Moved: bring it back for the next round (and check the way back works too).
          await toA.moveSession({ sessionId: sid, target: a.compute.address });
          expect(await kvSessions(a)).toContain(sid);
        }
        // No partial import is left at B: its shared memory is back where it was.
        const t1 = Date.now();
        while ((await segmentBytes(b)) !== baseline && Date.now() - t1 < 10_000) await new Promise((r) => setTimeout(r, 50));
        expect(await segmentBytes(b)).toBe(baseline);
      }
      // The first caller gave up before anything moved, the last one waited for the move.
      expect(outcomes[0]).toBe("DEADLINE_EXCEEDED");
      expect(outcomes.at(-1)).toBe("OK");
      await toA.closeSession({ sessionId: sid });
    } finally {
      mover.close();
      toA.close();
    }
  }, 180_000);

  it("checks what ReceiveSession gets: malformed, out of order, corrupted (DATA_LOSS) or foreign streams leave nothing on the target", async () => {
    const sid = `rcv-${Math.floor(rand() * 1e9)}`;
    const toA = new FreeKvClient(a.compute.address);
    const transfer = new KvStoreTransferServiceClient(a.kvstore.address, credentials.createInsecure(), { "grpc.max_receive_message_length": 64 << 20 });
    const receiver = new SessionMoveServiceClient(b.compute.address, credentials.createInsecure(), { "grpc.max_send_message_length": 64 << 20 });
    const receive = (msgs: ReceiveSessionRequest[]) =>
      new Promise<ServiceError | undefined>((resolve) => {
        const call = receiver.receiveSession(new Metadata(), { deadline: Date.now() + 20_000 }, (e) => resolve(e ?? undefined));
        for (const m of msgs) call.write(m);
        call.end();
      });
    try {
      await toA.createSession({ sessionId: sid, kind: 1, retrieval: RETRIEVAL, maxContextTokens: 1024 });
      await toA.generateText({ sessionId: sid, prompt: tokens(90), maxTokens: 4, sampling: GREEDY });
      const exported = await new Promise<ExportSessionResponse[]>((resolve, reject) => {
        const out: ExportSessionResponse[] = [];
        const call = transfer.exportSession({ sessionId: sid, chunkBytes: 4096 }, new Metadata(), { deadline: Date.now() + 20_000 });
        call.on("data", (m: ExportSessionResponse) => out.push(m));
        call.on("error", reject);
        call.on("end", () => resolve(out));
      });
      const before = await kvSessions(b);
      const header = () => structuredClone((exported[0].item as { value: SessionTransferHeader }).value);
      const flipped = () => {
        const m = structuredClone(exported) as ReceiveSessionRequest[];
        const k = 1 + Math.floor(rand() * (m.length - 2));
        const c = (m[k].item as { value: { data: Uint8Array } }).value;
        const data = Buffer.from(c.data);
        data[Math.floor(rand() * data.length)] ^= 0x40;
        c.data = data;
        return m;
      };
      const cases: Array<[string, ReceiveSessionRequest[], number]> = [
        ["chunk first", exported.slice(1) as ReceiveSessionRequest[], status.INVALID_ARGUMENT],
        ["empty stream", [], status.INVALID_ARGUMENT],
        ["ends before the digest", exported.slice(0, -1) as ReceiveSessionRequest[], status.INVALID_ARGUMENT],
        ["corrupted chunk", flipped(), status.DATA_LOSS],
        ["another model", [{ item: { $case: "header", value: { ...header(), geometry: { ...header().geometry!, layers: header().geometry!.layers + 1 } } } }], status.FAILED_PRECONDITION],
        ["past the context limit", [{ item: { $case: "header", value: { ...header(), maxContextTokens: 9000 } } }], status.FAILED_PRECONDITION],
        ["bad id", [{ item: { $case: "header", value: { ...header(), sessionId: "../x" } } }], status.INVALID_ARGUMENT],
      ];
      // Metadata that is not a JSON object (compute always saves one) is the sender's mistake,
      // named by field, whatever follows it.
      const notObjects = ["null", "[]", `[${Math.floor(rand() * 100)}]`, String(Math.floor(rand() * 1e6)), '"text"', "true", "{not json"];
      for (const text of notObjects) {
        const msgs = structuredClone(exported) as ReceiveSessionRequest[];
        (msgs[0].item as { value: SessionTransferHeader }).value.metadata = Buffer.from(text);
        cases.push([`metadata ${text}`, rand() < 0.5 ? msgs : msgs.slice(0, 1), status.INVALID_ARGUMENT]);
      }
      {
        // Metadata past the kvstore's import limit is refused by size before it is parsed (a JSON
        // text of hundreds of MB would hold the event loop for seconds).
        const msgs = structuredClone(exported.slice(0, 1)) as ReceiveSessionRequest[];
        (msgs[0].item as { value: SessionTransferHeader }).value.metadata = Buffer.from(`[${"1,".repeat(MAX_METADATA_BYTES / 2)}1]`);
        cases.push(["metadata past the limit", msgs, status.INVALID_ARGUMENT]);
      }
      for (const [name, msgs, code] of cases) {
        const e = await receive(msgs);
        expect(e ? `${name}: ${status[e.code]}` : `${name}: OK`, e?.details).toBe(`${name}: ${status[code]}`);
        if (name.startsWith("metadata ")) expect(e?.details).toMatch(/^header\.metadata: /);
        if (name === "metadata past the limit") expect(e?.details).toMatch(/^header\.metadata: must be at most 33554432 bytes/);
        expect(await kvSessions(b)).toEqual(before);
      }
      // Bytes that do not decode.
      const raw = await new Promise<ServiceError>((resolve) => {
        const call = receiver.makeClientStreamRequest("/freekv.v1.SessionMoveService/ReceiveSession", (x: Buffer) => x, (x: Buffer) => x, new Metadata(), { deadline: Date.now() + 10_000 }, (e) => resolve(e!));
        call.write(Buffer.from([0x12, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3]));
        call.end();
      });
      expect(raw.code).toBe(status.INVALID_ARGUMENT);
      // The session is still A's, whole.
      expect(await kvSessions(a)).toContain(sid);
      const t = await toA.generateText({ sessionId: sid, prompt: tokens(3), maxTokens: 2, sampling: GREEDY });
      expect(t.tokenIds.length).toBe(2);
      await toA.closeSession({ sessionId: sid });
    } finally {
      transfer.close();
      receiver.close();
      toA.close();
    }
  }, 120_000);

  it("settles a move whose answer was lost by asking the target (held: closed here; absent: kept here; cannot ask: the owners directory)", async () => {
    // A scripted target: it reads the whole stream and never answers, so the source's caller
    // deadline passes after the digest went out; GetArrival then answers from a script.
    let script: Array<ArrivalState | "unimplemented"> = [];
    let asked = 0;
    let received = 0;
    const server = new Server();
    server.addService(SessionMoveServiceService, {
      moveSession: (_call: unknown, cb: (e: Partial<ServiceError>) => void) => cb({ code: status.UNIMPLEMENTED }),
      receiveSession: (call: { on(ev: string, f: (m?: ReceiveSessionRequest) => void): void }) => {
        call.on("data", (m) => void (m?.item?.$case === "digest" && received++));
      },
      getArrival: (_call: unknown, cb: (e: Partial<ServiceError> | null, r?: { state: ArrivalState }) => void) => {
        const next = script[Math.min(asked++, script.length - 1)];
        if (next === "unimplemented") cb({ code: status.UNIMPLEMENTED, details: "scripted" });
        else cb(null, { state: next });
      },
    });
    const port = await new Promise<number>((resolve, reject) => server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
    const target = `127.0.0.1:${port}`;
    const toA = new FreeKvClient(a.compute.address, { retry: { maxAttempts: 1 } });
    const mover = new SessionMoveServiceClient(a.compute.address, credentials.createInsecure());
    const r = new Redis(REDIS);
    const moves = async (result: string) => metricValue(await fetchMetrics(a.compute.metricsPort), "freekv_compute_session_moves_total", `role="out",result="${result}"`) ?? 0;
    const outcomes = async () => (await moves("ok")) + (await moves("deadline_exceeded"));
    const unknown = async () => metricValue(await fetchMetrics(a.compute.metricsPort), "freekv_compute_move_outcome_unknown_total") ?? 0;
    const m0 = await moves("ok");
    // The target as it records itself in the directory, which need not be how the caller named it
    // (a DNS name, a Service, a proxy in front of it).
    const advertised = `10.${Math.floor(rand() * 250)}.${Math.floor(rand() * 250)}.${1 + Math.floor(rand() * 250)}:${1024 + Math.floor(rand() * 60000)}`;
    try {
      const cases: Array<[string, Array<ArrivalState | "unimplemented">, string | null | undefined, boolean, boolean?]> = [
        // [name, GetArrival's answers, the owners record (undefined: A's own, null: none), does the session leave A, is the outcome unknown]
        ["still receiving, then held", [ArrivalState.ARRIVAL_STATE_RECEIVING, ArrivalState.ARRIVAL_STATE_RECEIVING, ArrivalState.ARRIVAL_STATE_HELD], undefined, true],
        ["absent", [ArrivalState.ARRIVAL_STATE_RECEIVING, ArrivalState.ARRIVAL_STATE_ABSENT], undefined, false],
        ["cannot ask, the directory names the target", ["unimplemented"], target, true],
        ["cannot ask, the directory names the target by its own address", ["unimplemented"], advertised, true],
        ["cannot ask, the record still names this pod", ["unimplemented"], undefined, false],
        ["cannot ask, no record", ["unimplemented"], null, false, true],
      ];
      for (const [name, answers, record, leaves, unknownOutcome] of cases) {
        const sid = `lost-${Math.floor(rand() * 1e9)}`;
        await toA.createSession({ sessionId: sid, kind: 1, retrieval: RETRIEVAL, maxContextTokens: 1024 });
        await toA.generateText({ sessionId: sid, prompt: tokens(60), maxTokens: 3, sampling: GREEDY });
        const before = await outcomes();
        const unknownBefore = await unknown();
        script = answers;
        asked = 0;
        const digests = received;
        expect(await r.hget(`${prefix}owners`, sid)).toBe(a.compute.address);
        if (record) await r.hset(`${prefix}owners`, sid, record);
        if (record === null) await r.hdel(`${prefix}owners`, sid);
        const e = await new Promise<ServiceError | null>((resolve) =>
          mover.moveSession(MoveSessionRequest.fromPartial({ sessionId: sid, target, chunkBytes: 4096 }), new Metadata(), { deadline: Date.now() + 1500 }, (err) => resolve(err)),
        );
        expect(e?.code, name).toBe(status.DEADLINE_EXCEEDED);
        expect(received, `${name}: the digest reached the target`).toBe(digests + 1);
        // The source settles after its caller gave up; its move is counted once it has.
        const t0 = Date.now();
        while ((await outcomes()) === before && Date.now() - t0 < 10_000) await new Promise((res) => setTimeout(res, 50));
        expect(await outcomes(), name).toBe(before + 1);
        expect((await kvSessions(a)).includes(sid), name).toBe(!leaves);
        expect((await unknown()) - unknownBefore, `${name}: unknown outcomes`).toBe(unknownOutcome ? 1 : 0);
        expect(asked, `${name}: GetArrival calls`).toBeGreaterThanOrEqual(answers[0] === "unimplemented" ? 1 : answers.length);
        if (leaves) {
          // A redirects its calls to the target (as the directory names it, when it does).
          const stub = computeClient(a.compute.address);
          const err = await unaryError(stub, "getSession", { sessionId: sid });
          stub.close();
          expect(err.code, name).toBe(status.FAILED_PRECONDITION);
          expect(err.metadata.get(SESSION_OWNER_KEY), name).toEqual([record ?? target]);
          await r.hdel(`${prefix}owners`, sid);
        } else {
          // Still A's, whole.
          const t = await toA.generateText({ sessionId: sid, prompt: tokens(3), maxTokens: 2, sampling: GREEDY });
          expect(t.tokenIds.length, name).toBe(2);
          await toA.closeSession({ sessionId: sid });
        }
      }
      expect((await moves("ok")) - m0).toBe(3);
    } finally {
      r.disconnect();
      mover.close();
      toA.close();
      server.forceShutdown();
    }
  }, 120_000);

  it("answers GetArrival about a move, not about an id: HELD only for the move whose header brought the session", async () => {
    const sid = `arr-${Math.floor(rand() * 1e9)}`;
    const moveId = `move-${Math.floor(rand() * 1e12).toString(36)}`;
    const toA = new FreeKvClient(a.compute.address);
    const transfer = new KvStoreTransferServiceClient(a.kvstore.address, credentials.createInsecure(), { "grpc.max_receive_message_length": 64 << 20 });
    const atB = new SessionMoveServiceClient(b.compute.address, credentials.createInsecure(), { "grpc.max_send_message_length": 64 << 20 });
    const arrival = (id: string, move?: string) =>
      new Promise<string>((resolve) => atB.getArrival({ sessionId: id, moveId: move }, new Metadata(), { deadline: Date.now() + 5000 }, (e, r) => resolve(e ? status[e.code] : ArrivalState[r!.state])));
    const stubB = computeClient(b.compute.address);
    try {
      await toA.createSession({ sessionId: sid, kind: 1, retrieval: RETRIEVAL, maxContextTokens: 1024 });
      await toA.generateText({ sessionId: sid, prompt: tokens(70), maxTokens: 3, sampling: GREEDY });
      // A's kvstore writes the move's id into the header (covered by the digest); B keeps it.
      const exported = await new Promise<ExportSessionResponse[]>((resolve, reject) => {
        const out: ExportSessionResponse[] = [];
        const call = transfer.exportSession({ sessionId: sid, chunkBytes: 4096, moveId }, new Metadata(), { deadline: Date.now() + 20_000 });
        call.on("data", (m: ExportSessionResponse) => out.push(m));
        call.on("error", reject);
        call.on("end", () => resolve(out));
      });
      expect((exported[0].item as { value: SessionTransferHeader }).value.moveId).toBe(moveId);
      expect(await arrival(sid, moveId)).toBe("ARRIVAL_STATE_ABSENT");
      const e = await new Promise<ServiceError | undefined>((resolve) => {
        const call = atB.receiveSession(new Metadata(), { deadline: Date.now() + 20_000 }, (err) => resolve(err ?? undefined));
        for (const m of exported) call.write(m);
        call.end();
      });
      expect(e?.details).toBeUndefined();
      expect(await arrival(sid, moveId)).toBe("ARRIVAL_STATE_HELD");
      // Any other move of this id did not bring the session B holds.
      for (let i = 0; i < 3; i++) expect(await arrival(sid, `${moveId}${Math.floor(rand() * 1e6)}`)).toBe("ARRIVAL_STATE_ABSENT");
      expect(await arrival(sid, moveId.slice(0, -1))).toBe("ARRIVAL_STATE_ABSENT");
      expect(await arrival(sid)).toBe("INVALID_ARGUMENT");
      // Both copies go (this test made the second one by hand).
      await unary(stubB, "closeSession", { sessionId: sid });
      expect(await arrival(sid, moveId)).toBe("ARRIVAL_STATE_ABSENT");
      await toA.closeSession({ sessionId: sid });
    } finally {
      stubB.close();
      atB.close();
      transfer.close();
      toA.close();
    }
  }, 60_000);

  it("keeps the session at the source when its move's answer is lost and the target holds another session of that id", async () => {
    // B holds its own session of the id (here: A's owner record was lost, so B's create took the
    // name). A moves its session to B through a proxy that delays B's answers and cuts the
    // connection once A has sent everything: B refused the move (ALREADY_EXISTS), but A never
    // hears it and asks GetArrival, which must not mistake B's session for the one A sent.
    const sid = `twice-${Math.floor(rand() * 1e9)}`;
    const r = new Redis(REDIS);
    const toA = new FreeKvClient(a.compute.address, { retry: { maxAttempts: 1 } });
    const stubA = computeClient(a.compute.address);
    const stubB = computeClient(b.compute.address);
    const mover = new SessionMoveServiceClient(a.compute.address, credentials.createInsecure());
    let connections = 0;
    let cut = false;
    const sockets = new Set<Socket>();
    const proxy = createServer((c) => {
      const n = ++connections;
      const upstream = connect(Number(bAddress.split(":")[1]), "127.0.0.1");
      sockets.add(c).add(upstream);
      let bytes = 0;
      let last = Date.now();
      c.on("data", (d) => {
        bytes += d.length;
        last = Date.now();
        upstream.write(d);
      });
      upstream.on("data", (d) => setTimeout(() => c.destroyed || c.write(d), 800));
      const end = () => (c.destroy(), upstream.destroy());
      for (const s of [c, upstream]) s.on("error", end).on("close", end);
      if (n === 1) {
        const watch = setInterval(() => {
          if (bytes > 2000 && Date.now() - last > 150) {
            clearInterval(watch);
            cut = true;
            end();
          }
        }, 10);
        c.on("close", () => clearInterval(watch));
      }
    });
    const proxyPort = await new Promise<number>((resolve) => proxy.listen(0, "127.0.0.1", () => resolve((proxy.address() as { port: number }).port)));
    try {
      await toA.createSession({ sessionId: sid, kind: 1, retrieval: RETRIEVAL, maxContextTokens: 1024 });
      const onA = await toA.generateText({ sessionId: sid, prompt: tokens(140), maxTokens: 5, sampling: GREEDY });
      await r.hdel(`${prefix}owners`, sid);
      await unary(stubB, "createSession", { sessionId: sid, kind: 1, retrieval: RETRIEVAL, maxContextTokens: 1024 });
      const e = await new Promise<ServiceError | null>((resolve) =>
        mover.moveSession(MoveSessionRequest.fromPartial({ sessionId: sid, target: `127.0.0.1:${proxyPort}`, chunkBytes: 4096 }), new Metadata(), { deadline: Date.now() + 30_000 }, (err) => resolve(err)),
      );
      expect(cut, "the proxy cut the move's connection").toBe(true);
      expect(connections, "A asked B again after the answer was lost").toBeGreaterThanOrEqual(2);
      expect(e?.code, e?.details).toBe(status.UNAVAILABLE);
      // A's session is still A's, whole; B's is untouched.
      expect(await kvSessions(a)).toContain(sid);
      const got = await unary<{ session: { contextTokens: number } }>(stubA, "getSession", { sessionId: sid });
      expect(Number(got.session.contextTokens)).toBe(onA.final.usage!.contextTokens);
      const theirs = await unary<{ session: { contextTokens: number } }>(stubB, "getSession", { sessionId: sid });
      expect(Number(theirs.session.contextTokens)).toBe(0);
      await unary(stubA, "closeSession", { sessionId: sid });
      await unary(stubB, "closeSession", { sessionId: sid });
    } finally {
      proxy.close();
      for (const s of sockets) s.destroy();
      await r.hdel(`${prefix}owners`, sid);
      r.disconnect();
      mover.close();
      stubA.close();
      stubB.close();
      toA.close();
    }
  }, 90_000);

  it("hands the sessions of a draining pod off to its peer; the client follows; a refused one is logged and counted", async () => {
    const sid = `drain-${Math.floor(rand() * 1e9)}`;
    const direct = new FreeKvClient(a.compute.address);
    const viaB = new FreeKvClient(b.compute.address);
    try {
      await direct.createSession({ sessionId: sid, kind: 1, retrieval: RETRIEVAL, maxContextTokens: 1024 });
      await viaB.createSession({ sessionId: `${sid}-twin`, kind: 1, retrieval: RETRIEVAL, maxContextTokens: 1024 });
      // Too big for B's FREEKV_MAX_CONTEXT_LIMIT: B refuses it, it stays in A's kvstore.
      await direct.createSession({ sessionId: `${sid}-big`, kind: 1, maxContextTokens: 16384 });
      const turn1 = tokens(100);
      const t1 = await viaB.generateText({ sessionId: sid, prompt: turn1, maxTokens: 10, sampling: GREEDY });
      const t1twin = await viaB.generateText({ sessionId: `${sid}-twin`, prompt: turn1, maxTokens: 10, sampling: GREEDY });
      expect(t1.tokenIds).toEqual(t1twin.tokenIds);
      expect(viaB.addressFor(sid)).toBe(a.compute.address);
      // The process exits at the end of its drain; its log lines are the record.
      await a.compute.stop("SIGTERM");
      const out = a.compute.output.join("\n");
      expect(out).toMatch(/"hand-off done"/);
      const lines = a.compute.output.filter((l) => l.includes("session not handed off"));
      expect(lines.length).toBe(1);
      expect(lines[0]).toContain(`${sid}-big`);
      expect(lines[0]).toContain("FREEKV_MAX_CONTEXT_LIMIT");
      expect(await kvSessions(b)).toContain(sid);
      expect(await kvSessions(a)).toContain(`${sid}-big`);
      // A withdrew its live announcement when it started to drain; B's stays.
      const r = new Redis(REDIS);
      expect(await r.exists(`${prefix}pod:${a.compute.address}`)).toBe(0);
      expect(await r.exists(`${prefix}pod:${b.compute.address}`)).toBe(1);
      r.disconnect();
      // The client remembered A, which is gone: it goes back to B, which holds the session now.
      for (const prompt of [tokens(30), tokens(5)]) {
        const moved = await viaB.generateText({ sessionId: sid, prompt, maxTokens: 10, sampling: GREEDY });
        const twin = await viaB.generateText({ sessionId: `${sid}-twin`, prompt, maxTokens: 10, sampling: GREEDY });
        expect(moved.tokenIds).toEqual(twin.tokenIds);
      }
      expect(viaB.addressFor(sid)).toBe(b.compute.address);
      const m = await fetchMetrics(b.compute.metricsPort);
      expect(metricValue(m, "freekv_compute_session_moves_total", 'role="in",result="ok"')).toBeGreaterThanOrEqual(1);
    } finally {
      direct.close();
      viaB.close();
    }
  }, 180_000);
});
