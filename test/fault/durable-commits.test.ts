/**
 * Nothing lost, nothing silent, with real processes:
 * - the kvstore stops answering (SIGSTOP) while a model session generates: commits fail, the
 *   failure reaches the client (UNAVAILABLE) and the metrics; once it answers again (SIGCONT) the
 *   retry fills the gap and the session continues exactly like a fresh run over what it holds;
 * - compute is SIGKILLed in the middle of a Generate: the restarted compute's next turn equals the
 *   reference continuation of the tokens the session holds (no stale pending token);
 * - the kvstore's Redis directory goes away: health is NOT_SERVING, failures are counted, and it
 *   serves again once Redis is back.
 * The references are fresh single-call runs of the same model and retrieval config (greedy).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { afterAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type ComputeServiceClient, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { healthCheck } from "../helpers/grpc-probes.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startService, startTiers, unary, type ServiceProcess, type Tiers } from "../helpers/services.js";

const R = { pageSize: 16, sinkTokens: 32, windowTokens: 64, selectTokens: 256 };
const MAX_CONTEXT = 1024;
const VOCAB = 512; // the built-in model's
const cleanup: (() => Promise<unknown> | unknown)[] = [];
afterAll(async () => {
  for (const f of cleanup.reverse()) await f();
});

interface Run {
  tokens: number[];
  finish?: number;
  error?: ServiceError;
}

function generate(client: ComputeServiceClient, req: Partial<GenerateRequest>, onChunk?: (n: number) => void): Promise<Run> {
  return new Promise((resolve) => {
    const out: Run = { tokens: [] };
    const call = client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + 60_000 });
    call.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") {
        out.tokens.push(...m.event.value.tokenIds);
        onChunk?.(out.tokens.length);
      }
      if (m.event?.$case === "final") out.finish = m.event.value.finishReason;
    });
    call.on("error", (e: ServiceError) => resolve({ ...out, error: e }));
    call.on("end", () => resolve(out));
  });
}

/** The reference: a fresh session fed `held` as one prompt, greedy. */
async function reference(client: ComputeServiceClient, held: number[], maxTokens: number): Promise<number[]> {
  const r = await generate(client, { prompt: { $case: "tokens", value: { ids: held } }, maxTokens, retrieval: R as never });
  expect(r.error).toBeUndefined();
  return r.tokens;
}

const randomTokens = (n: number, rand: () => number) => Array.from({ length: n }, () => 3 + Math.floor(rand() * (VOCAB - 3)));

/**
 * The tokens a session holds after a turn: the previous turn's last token (pending), the prompt,
 * and the completion; the completion's last token stays pending when the call ended normally (a
 * call failed at a commit point after writing, ABORTED, had appended every token it streamed; one
 * refused UNAVAILABLE had written nothing).
 */
function advance(held: number[], pending: number | undefined, prompt: number[], run: Run): { held: number[]; pending: number | undefined } {
  if (run.error?.code === status.UNAVAILABLE) return { held, pending };
  const next = [...held, ...(pending === undefined ? [] : [pending]), ...prompt];
  if (run.error) return { held: [...next, ...run.tokens], pending: undefined };
  return { held: [...next, ...run.tokens.slice(0, -1)], pending: run.tokens.at(-1) };
}

async function waitFor(what: string, ok: () => Promise<boolean>, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await ok().catch(() => false)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe("durable commits", () => {
  it("a kvstore that stops answering fails the calls that need it; once back, the gap is filled and the session continues exactly", async () => {
    const tiers: Tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "2", FREEKV_KVSTORE_TIMEOUT_MS: "800" } });
    cleanup.push(() => tiers.stop());
    const client = computeClient(tiers.compute.address);
    const kv = kvstoreClient(tiers.kvstore.address);
    const rand = prng(0x5eed01);
    const { session } = await unary<{ session: { sessionId: string } }>(client, "createSession", { retrieval: R, maxContextTokens: MAX_CONTEXT });
    const id = session.sessionId;
    let st = { held: [] as number[], pending: undefined as number | undefined };

    const p1 = randomTokens(40, rand);
    const t1 = await generate(client, { sessionId: id, prompt: { $case: "tokens", value: { ids: p1 } }, maxTokens: 30 });
    expect(t1.error).toBeUndefined();
    st = advance(st.held, st.pending, p1, t1);

    tiers.kvstore.child.kill("SIGSTOP");
    let stopped = true;
    cleanup.push(() => stopped && tiers.kvstore.child.kill("SIGCONT"));
    const p2 = randomTokens(12, rand);
    const t2 = await generate(client, { sessionId: id, prompt: { $case: "tokens", value: { ids: p2 } }, maxTokens: 40 });
    const heldBefore2 = st.held.length;
    st = advance(st.held, st.pending, p2, t2);
    if (t2.error) {
      // Failed at a commit point after the turn had written into the session: ABORTED, which no
      // client retries as a call that did nothing, saying how many tokens the session kept.
      expect(t2.error.code, t2.error.details).toBe(status.ABORTED);
      expect(t2.error.details).toMatch(/kvstore did not take its pages/);
      expect(t2.error.details).toContain(`had already written ${st.held.length - heldBefore2} tokens into session`);
    }
    await waitFor("a counted commit failure", async () => (metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_commit_failures_total") ?? 0) >= 1);

    // The session is degraded: a call that appends to it is told so before it writes anything
    // (UNAVAILABLE, which clients retry: the retry writes the prompt once).
    const p3 = randomTokens(5, rand);
    const t3 = await generate(client, { sessionId: id, prompt: { $case: "tokens", value: { ids: p3 } }, maxTokens: 10 });
    expect(t3.error?.code).toBe(status.UNAVAILABLE);
    expect(t3.error?.details).toMatch(/kvstore did not take its pages/);
    expect(t3.tokens).toEqual([]);
    st = advance(st.held, st.pending, p3, t3);
    const { session: during } = await unary<{ session: { contextTokens: number } }>(client, "getSession", { sessionId: id });
    expect(during.contextTokens).toBe(st.held.length);

    tiers.kvstore.child.kill("SIGCONT");
    stopped = false;
    // The retry fills the gap on its own: every offloading layer's full pages are committed.
    const layers = 4;
    await waitFor("the gap filled", async () => (await unary<{ committedPages: number }>(kv, "getStats", {})).committedPages >= layers * (Math.floor(st.held.length / R.pageSize) - 1));
    // ... and the session no longer degraded (its retry succeeded; the retry timer may lag the pages on a busy machine).
    await waitFor("no degraded session", async () => metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_degraded_sessions") === 0);

    const p4 = randomTokens(6, rand);
    const t4 = await generate(client, { sessionId: id, prompt: { $case: "tokens", value: { ids: p4 } }, maxTokens: 16 });
    expect(t4.error).toBeUndefined();
    const heldBefore4 = [...st.held, ...(st.pending === undefined ? [] : [st.pending]), ...p4];
    expect(t4.tokens).toEqual(await reference(client, heldBefore4, t4.tokens.length));
    kv.close();
    client.close();
  }, 120_000);

  it("a commit that fails during a turn ends it ABORTED, saying how many tokens the session kept; the session then continues exactly", async () => {
    const tiers: Tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "2", FREEKV_KVSTORE_TIMEOUT_MS: "200" } });
    cleanup.push(() => tiers.stop());
    const client = computeClient(tiers.compute.address);
    const rand = prng(0x5eed04);
    const { session } = await unary<{ session: { sessionId: string } }>(client, "createSession", { retrieval: R, maxContextTokens: MAX_CONTEXT });
    const id = session.sessionId;
    let st = { held: [] as number[], pending: undefined as number | undefined };
    const p1 = randomTokens(20 + Math.floor(rand() * 20), rand);
    const t1 = await generate(client, { sessionId: id, prompt: { $case: "tokens", value: { ids: p1 } }, maxTokens: 4 });
    expect(t1.error).toBeUndefined();
    st = advance(st.held, st.pending, p1, t1);

    // The kvstore stops while a long turn runs: its pages' commit times out after 200 ms and the
    // turn's next commit point fails it, long after its prompt went into the session.
    tiers.kvstore.child.kill("SIGSTOP");
    let stopped = true;
    cleanup.push(() => stopped && tiers.kvstore.child.kill("SIGCONT"));
    const p2 = randomTokens(40, rand);
    const before = st.held.length;
    const t2 = await generate(client, { sessionId: id, prompt: { $case: "tokens", value: { ids: p2 } }, maxTokens: MAX_CONTEXT - before - p2.length - 8 });
    expect(t2.error?.code, t2.error?.details ?? "the turn ended without an error").toBe(status.ABORTED);
    expect(t2.error?.details).toMatch(/kvstore did not take its pages/);
    st = advance(st.held, st.pending, p2, t2);
    expect(t2.error?.details).toContain(`had already written ${st.held.length - before} tokens into session`);
    const { session: after } = await unary<{ session: { contextTokens: number } }>(client, "getSession", { sessionId: id });
    expect(after.contextTokens).toBe(st.held.length);

    tiers.kvstore.child.kill("SIGCONT");
    stopped = false;
    await waitFor("no degraded session", async () => metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_degraded_sessions") === 0);
    const p3 = randomTokens(6, rand);
    const t3 = await generate(client, { sessionId: id, prompt: { $case: "tokens", value: { ids: p3 } }, maxTokens: 8 });
    expect(t3.error).toBeUndefined();
    expect(t3.tokens).toEqual(await reference(client, [...st.held, ...(st.pending === undefined ? [] : [st.pending]), ...p3], t3.tokens.length));
    client.close();
  }, 120_000);

  it("a release the kvstore does not answer is retried until it does; an AttachSession its caller gave up creates nothing", async () => {
    const tiers: Tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_KVSTORE_TIMEOUT_MS: "600" } });
    cleanup.push(() => tiers.stop());
    const client = computeClient(tiers.compute.address);
    const kv = kvstoreClient(tiers.kvstore.address);
    const rand = prng(0x5eed02);
    const ids: string[] = [];
    for (let i = 0; i < 2 + Math.floor(rand() * 3); i++) {
      const { session } = await unary<{ session: { sessionId: string } }>(client, "createSession", { retrieval: R, maxContextTokens: MAX_CONTEXT });
      ids.push(session.sessionId);
    }
    const held = async () => (await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds;
    expect((await held()).sort()).toEqual([...ids].sort());
    const metrics = async () => fetchMetrics(tiers.compute.metricsPort);

    tiers.kvstore.child.kill("SIGSTOP");
    let stopped = true;
    cleanup.push(() => stopped && tiers.kvstore.child.kill("SIGCONT"));
    for (const id of ids) {
      const e = await unary(client, "closeSession", { sessionId: id }).then(
        () => undefined,
        (err: ServiceError) => err,
      );
      // The caller hears that the kvstore did not answer; the session is gone here all the same.
      expect([status.UNAVAILABLE, status.DEADLINE_EXCEEDED]).toContain(e?.code);
      const gone = await unary(client, "getSession", { sessionId: id }).catch((err: ServiceError) => err.code);
      expect(gone).toBe(status.NOT_FOUND);
    }
    const m = await metrics();
    expect(metricValue(m, "freekv_compute_releases_pending")).toBe(ids.length);
    expect(metricValue(m, "freekv_compute_release_failures_total")).toBeGreaterThanOrEqual(ids.length);

    tiers.kvstore.child.kill("SIGCONT");
    stopped = false;
    await waitFor("the releases retried", async () => (await held()).length === 0 && metricValue(await metrics(), "freekv_compute_releases_pending") === 0);

    // An AttachSession past its deadline before the kvstore answered: the session it made is dropped.
    const big = { sessionId: "late", geometry: { layers: 8, queryHeads: 8, kvHeads: 8, headDim: 128, kvDtype: 2 }, retrieval: R, maxContextTokens: 65536, reserveTokens: 65536 };
    const late = await unary(kv, "attachSession", big, 1).catch((err: ServiceError) => err.code);
    expect(late).toBe(status.DEADLINE_EXCEEDED);
    await waitFor("the cancelled attach's session dropped", async () => (await held()).length === 0 && Number((await unary<{ reservedBytes: number }>(kv, "getStats", {})).reservedBytes) === 0);
    kv.close();
    client.close();
  }, 120_000);

  it("compute SIGKILLed mid-Generate: after the restart the next turn continues what the session holds", async () => {
    const tiers: Tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "2" } });
    cleanup.push(() => tiers.stop());
    let client = computeClient(tiers.compute.address);
    const rand = prng(0x5eed02);
    const { session } = await unary<{ session: { sessionId: string } }>(client, "createSession", { retrieval: R, maxContextTokens: MAX_CONTEXT });
    const id = session.sessionId;
    const p1 = randomTokens(30, rand);
    const t1 = await generate(client, { sessionId: id, prompt: { $case: "tokens", value: { ids: p1 } }, maxTokens: 20 });
    expect(t1.error).toBeUndefined();
    const before2 = [...p1, ...t1.tokens];
    const p2 = randomTokens(9, rand);
    const t2 = await generate(client, { sessionId: id, prompt: { $case: "tokens", value: { ids: p2 } }, maxTokens: 400, ignoreEos: true }, (n) => {
      if (n === 6) tiers.compute.child.kill("SIGKILL");
    });
    expect(t2.error).toBeDefined();
    expect(t2.tokens.length).toBeGreaterThanOrEqual(6);
    await tiers.compute.exited;
    client.close();

    const compute: ServiceProcess = await startService("compute", {
      env: { ...QUIET, FREEKV_THREADS: "2", FREEKV_COMPUTE_PORT: "0", FREEKV_COMPUTE_METRICS_PORT: "0", FREEKV_KVSTORE_ADDR: tiers.kvstore.address },
    });
    cleanup.push(() => compute.stop());
    client = computeClient(compute.address);
    const { session: back } = await unary<{ session: { contextTokens: number } }>(client, "getSession", { sessionId: id });
    // The session holds turn 1, turn 2's prompt and the completion tokens appended before the kill
    // (at least the 5 fed after being streamed); which they are is the greedy continuation.
    const m = back.contextTokens - before2.length - p2.length;
    expect(m).toBeGreaterThanOrEqual(5);
    const o2 = await reference(client, [...before2, ...p2], m + 1);
    expect(o2.slice(0, 6)).toEqual(t2.tokens.slice(0, 6));
    const held = [...before2, ...p2, ...o2.slice(0, m)];
    const p3 = randomTokens(7, rand);
    const t3 = await generate(client, { sessionId: id, prompt: { $case: "tokens", value: { ids: p3 } }, maxTokens: 16 });
    expect(t3.error).toBeUndefined();
    expect(t3.tokens).toEqual(await reference(client, [...held, ...p3], t3.tokens.length));
    client.close();
  }, 120_000);

  it("a Redis directory that goes away: the kvstore reports NOT_SERVING and counts the failures, and serves again once it is back", async () => {
    const port = await freePort();
    const startRedis = (): ChildProcess => spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
    let redis = startRedis();
    cleanup.push(() => redis.kill("SIGKILL"));
    await waitFor("redis", async () => (await fetchPing(port)) === true);
    const tiers: Tiers = await startTiers({
      kvstoreEnv: { ...QUIET, FREEKV_DIRECTORY: `redis://127.0.0.1:${port}`, FREEKV_DIRECTORY_PREFIX: `t${port}:`, FREEKV_DIRECTORY_PROBE_MS: "200" },
      computeEnv: { ...QUIET, FREEKV_THREADS: "2", FREEKV_KVSTORE_TIMEOUT_MS: "2000" },
    });
    cleanup.push(() => tiers.stop());
    const client = computeClient(tiers.compute.address);
    const rand = prng(0x5eed03);
    const { session } = await unary<{ session: { sessionId: string } }>(client, "createSession", { retrieval: R, maxContextTokens: MAX_CONTEXT });
    expect(await healthCheck(tiers.kvstore.address)).toBe("SERVING");
    // A first short turn reserves the session's memory (an extent covers MAX_CONTEXT), a write to
    // the directory: the turns below then reach their commits, which are what fails.
    expect((await generate(client, { sessionId: session.sessionId, prompt: { $case: "tokens", value: { ids: randomTokens(2, rand) } }, maxTokens: 1 })).error).toBeUndefined();

    redis.kill("SIGKILL");
    await new Promise((r) => redis.once("exit", r));
    await waitFor("kvstore NOT_SERVING", async () => (await healthCheck(tiers.kvstore.address)) === "NOT_SERVING");
    await waitFor("compute NOT_SERVING", async () => (await healthCheck(tiers.compute.address)) === "NOT_SERVING");
    // A turn that fills pages cannot commit them: the failure reaches the metrics, and the call or the next one.
    const p = randomTokens(40, rand);
    const t1 = await generate(client, { sessionId: session.sessionId, prompt: { $case: "tokens", value: { ids: p } }, maxTokens: 8 });
    const t2 = await generate(client, { sessionId: session.sessionId, prompt: { $case: "tokens", value: { ids: randomTokens(3, rand) } }, maxTokens: 4 });
    expect([t1.error?.code, t2.error?.code]).toContain(status.UNAVAILABLE);
    expect(metricValue(await fetchMetrics(tiers.kvstore.metricsPort), "freekv_kvstore_directory_failures_total")).toBeGreaterThanOrEqual(1);
    expect(metricValue(await fetchMetrics(tiers.kvstore.metricsPort), "freekv_kvstore_directory_up")).toBe(0);
    expect(metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_commit_failures_total")).toBeGreaterThanOrEqual(1);

    redis = startRedis();
    await waitFor("kvstore SERVING", async () => (await healthCheck(tiers.kvstore.address)) === "SERVING", 20_000);
    await waitFor("compute SERVING", async () => (await healthCheck(tiers.compute.address)) === "SERVING", 20_000);
    // The retry commits the session's pages into the new directory; the session serves again.
    const kv = kvstoreClient(tiers.kvstore.address);
    await waitFor("pages committed", async () => (await unary<{ committedPages: number }>(kv, "getStats", {})).committedPages >= 4 * 2, 20_000);
    const t3 = await generate(client, { sessionId: session.sessionId, prompt: { $case: "tokens", value: { ids: randomTokens(3, rand) } }, maxTokens: 4 });
    expect(t3.error).toBeUndefined();
    kv.close();
    client.close();
  }, 120_000);
});

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

/** PING over RESP: true once Redis answers on `port`. */
async function fetchPing(port: number): Promise<boolean> {
  const { Redis } = await import("ioredis");
  const r = new Redis({ port, host: "127.0.0.1", lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
  r.on("error", () => undefined);
  try {
    await r.connect();
    return (await r.ping()) === "PONG";
  } finally {
    r.disconnect();
  }
}
