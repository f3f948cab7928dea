/**
 * Admission across real processes (the built-in model, random prompts): with a kvstore whose
 * capacity holds two request sessions, more concurrent Generates all complete (they waited for
 * memory, each with the answer it gets alone) instead of RESOURCE_EXHAUSTED, and one that could
 * never fit is refused at once; with one running slot and a queue of two, a further request is
 * refused, a cancelled waiting request leaves at once (the queue gauge drops, no session made for
 * it), and the serving metrics routers read are there.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ClientReadableStream, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type GenerateFinal, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { DType, type ModelGeometry } from "../../proto/gen/freekv/v1/common.js";
import { builtinModelDir, readModelFolder } from "../../services/compute/model/loader.js";
import { modelSessionBytes } from "../../services/compute/sessions/footprint.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startTiers, unary, unaryError, type Tiers } from "../helpers/services.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 12)) >>> 0;
const rand = prng(seed);
const spec = readModelFolder(builtinModelDir()).spec.native;
const geometry: ModelGeometry = { layers: spec.layers, queryHeads: spec.qHeads, kvHeads: spec.kvHeads, headDim: spec.headDim, kvDtype: DType.D_TYPE_FLOAT32 };
const PROMPT = 24;
const MAX_TOKENS = 16;
const perSession = modelSessionBytes(geometry, DType.D_TYPE_FLOAT32, undefined, PROMPT + MAX_TOKENS);

let small: Tiers; // kvstore capacity: two request sessions
let narrow: Tiers; // one running slot, a queue of two
let smallClient: ReturnType<typeof computeClient>;
let narrowClient: ReturnType<typeof computeClient>;
let narrowKv: ReturnType<typeof kvstoreClient>;

beforeAll(async () => {
  [small, narrow] = await Promise.all([
    startTiers({ kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_CAPACITY_BYTES: String(Math.floor(2.5 * perSession)) }, computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_QUEUE_RETRY_MS: "50" } }),
    startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_MAX_RUNNING_REQUESTS: "1", FREEKV_QUEUE_MAX_REQUESTS: "2", FREEKV_PREFILL_CHUNK_TOKENS: "1" } }),
  ]);
  smallClient = computeClient(small.compute.address);
  narrowClient = computeClient(narrow.compute.address);
  narrowKv = kvstoreClient(narrow.kvstore.address);
});

afterAll(async () => {
  smallClient?.close();
  narrowClient?.close();
  narrowKv?.close();
  await Promise.all([small?.stop(), narrow?.stop()]);
});

interface Result {
  tokens: number[];
  final?: GenerateFinal;
}

function start(client: ReturnType<typeof computeClient>, req: Partial<GenerateRequest>, tenant?: string, deadlineMs = 60_000): ClientReadableStream<GenerateResponse> {
  const md = new Metadata();
  if (tenant) md.set("x-freekv-tenant", tenant);
  return client.generate(GenerateRequest.fromPartial(req), md, { deadline: Date.now() + deadlineMs });
}

function collect(stream: ClientReadableStream<GenerateResponse>): Promise<Result> {
  const r: Result = { tokens: [] };
  return new Promise((resolve, reject) => {
    stream.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") r.tokens.push(...m.event.value.tokenIds);
      else if (m.event?.$case === "final") r.final = m.event.value;
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(r));
  });
}

const failure = (p: Promise<unknown>) =>
  p.then(
    () => undefined,
    (e: ServiceError) => e,
  );
const randomPrompt = (n: number) => ({ $case: "tokens" as const, value: { ids: Array.from({ length: n }, () => Math.floor(rand() * 500)) } });
const greedy = { temperature: 0, topP: 0, topK: 0, seed: 0 };

async function until(what: string, ok: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!(await ok())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe(`admission (seed ${seed})`, () => {
  it("more concurrent Generates than the kvstore holds all complete, each with its answer alone", async () => {
    const n = 5 + Math.floor(rand() * 4);
    const prompts = Array.from({ length: n }, () => randomPrompt(PROMPT));
    const alone: Result[] = [];
    for (const prompt of prompts) alone.push(await collect(start(smallClient, { prompt, maxTokens: MAX_TOKENS, sampling: greedy })));
    const before = await fetchMetrics(small.kvstore.metricsPort);
    const tenants = ["a", "b", "", "c"];
    const together = await Promise.all(prompts.map((prompt, i) => collect(start(smallClient, { prompt, maxTokens: MAX_TOKENS, sampling: greedy }, tenants[i % tenants.length]))));
    together.forEach((r, i) => {
      expect(r.final, `request ${i}`).toBeDefined();
      expect(r.tokens, `request ${i}`).toEqual(alone[i].tokens);
    });
    // They did wait for memory: the kvstore refused some attempts for capacity.
    const after = await fetchMetrics(small.kvstore.metricsPort);
    const refused = (t: string) => metricValue(t, "freekv_kvstore_rejected_total", 'reason="capacity"') ?? 0;
    expect(refused(after)).toBeGreaterThan(refused(before));
    expect(metricValue(after, "freekv_kvstore_capacity_bytes")).toBe(Math.floor(2.5 * perSession));
    // A request's slot and memory go back after its stream ended (the fresh session's close runs
    // then): the gauges settle to zero shortly after the last answer, and stay there.
    // The kvstore's release follows the close, after the stream ended: the usage settles after the
    // running count does, so both are waited for (a session never released times this out).
    await until("every running slot and its memory released", async () => {
      const g = await fetchMetrics(small.compute.metricsPort);
      return metricValue(g, "vllm:num_requests_running") === 0 && metricValue(g, "vllm:kv_cache_usage_perc") === 0;
    });
    const m = await fetchMetrics(small.compute.metricsPort);
    expect(metricValue(m, "freekv_generate_queue_seconds_count")).toBeGreaterThanOrEqual(2 * n);
    expect(metricValue(m, "freekv_generate_queue_seconds_sum")).toBeGreaterThan(0);
    expect(metricValue(m, "vllm:num_requests_waiting")).toBe(0);
    expect(metricValue(m, "vllm:num_requests_running")).toBe(0);
    expect(metricValue(m, "vllm:kv_cache_usage_perc")).toBe(0);
    expect(metricValue(m, "freekv_compute_host_kv_bytes", 'state="capacity"')).toBe(Math.floor(2.5 * perSession));
    expect(metricValue(m, "freekv_generate_time_to_first_token_seconds_count")).toBeGreaterThanOrEqual(2 * n);
    expect(metricValue(m, "freekv_generate_time_per_output_token_seconds_count")).toBeGreaterThanOrEqual(1);
    expect(metricValue(m, "freekv_generate_e2e_request_latency_seconds_count")).toBeGreaterThanOrEqual(2 * n);
  });

  it("64 concurrent Generates against a kvstore that holds 8 all complete (none refused), each with its answer alone; memory returns to its baseline", async () => {
    const capacity = 8 * perSession + Math.floor(perSession / 2);
    const tiers = await startTiers({
      kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_CAPACITY_BYTES: String(capacity) },
      computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_QUEUE_RETRY_MS: "50" },
    });
    const client = computeClient(tiers.compute.address);
    const kv = kvstoreClient(tiers.kvstore.address);
    const stats = async () => {
      const x = await unary<Record<string, number | string>>(kv, "getStats", {});
      return { sessions: Number(x.sessions), reservedBytes: Number(x.reservedBytes), allocatedBytes: Number(x.allocatedBytes) };
    };
    try {
      const baseline = await stats();
      const prompts = Array.from({ length: 64 }, () => randomPrompt(PROMPT));
      const tenants = ["a", "b", "c", ""];
      const alone: Result[] = [];
      for (const prompt of prompts) alone.push(await collect(start(client, { prompt, maxTokens: MAX_TOKENS, sampling: greedy })));
      // While they run: the kvstore never holds more than its capacity, and requests wait.
      let polling = true;
      let maxReserved = 0;
      let maxWaiting = 0;
      const poll = (async () => {
        while (polling) {
          const [st, m] = await Promise.all([stats(), fetchMetrics(tiers.compute.metricsPort)]);
          maxReserved = Math.max(maxReserved, st.reservedBytes);
          maxWaiting = Math.max(maxWaiting, metricValue(m, "vllm:num_requests_waiting") ?? 0);
          await new Promise((r) => setTimeout(r, 20));
        }
      })();
      const together = await Promise.all(prompts.map((prompt, i) => collect(start(client, { prompt, maxTokens: MAX_TOKENS, sampling: greedy }, tenants[i % tenants.length], 120_000))));
      polling = false;
      await poll;
      together.forEach((r, i) => {
        expect(r.final, `request ${i}`).toBeDefined();
        expect(r.tokens, `request ${i}`).toEqual(alone[i].tokens);
      });
      expect(maxReserved).toBeLessThanOrEqual(capacity);
      expect(maxWaiting).toBeGreaterThan(0);
      // Some waited for memory: their queue time is in their usage.
      expect(Math.max(...together.map((r) => r.final!.usage!.queueMs))).toBeGreaterThan(0);
      // Memory back to its baseline: no session, no reservation, nothing allocated (a stateless
      // request's session is closed, and its slot given back, right after its stream ends).
      await until("the kvstore back to its baseline", async () => JSON.stringify(await stats()) === JSON.stringify(baseline));
      expect(await stats()).toEqual(baseline);
      await until("no request running", async () => metricValue(await fetchMetrics(tiers.compute.metricsPort), "vllm:num_requests_running") === 0);
      const m = await fetchMetrics(tiers.compute.metricsPort);
      expect(metricValue(m, "freekv_generate_queue_seconds_count")).toBe(128);
      expect(metricValue(m, "vllm:num_requests_waiting")).toBe(0);
    } finally {
      client.close();
      kv.close();
      await tiers.stop();
    }
  }, 240_000);

  it("refuses at once a request that could never fit the kvstore", async () => {
    let maxTokens = MAX_TOKENS;
    while (modelSessionBytes(geometry, DType.D_TYPE_FLOAT32, undefined, PROMPT + maxTokens) <= 2.5 * perSession) maxTokens *= 2;
    const t0 = Date.now();
    const e = await failure(collect(start(smallClient, { prompt: randomPrompt(PROMPT), maxTokens })));
    expect(e?.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(e?.details).toMatch(/can never fit/);
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it("refuses at once a request that could never fit while another waits for memory; the waiter runs when memory comes back", async () => {
    const kv = kvstoreClient(small.kvstore.address);
    const capacity = Math.floor(2.5 * perSession);
    try {
      // A session held at the kvstore directly leaves less than one request's memory free.
      let hogTokens = PROMPT + MAX_TOKENS;
      while (capacity - modelSessionBytes(geometry, DType.D_TYPE_FLOAT32, undefined, hogTokens) >= perSession) hogTokens += 8;
      expect(modelSessionBytes(geometry, DType.D_TYPE_FLOAT32, undefined, hogTokens)).toBeLessThanOrEqual(capacity);
      await unary(kv, "attachSession", { sessionId: "hog", geometry, maxContextTokens: hogTokens });
      const m = async () => fetchMetrics(small.compute.metricsPort);
      const tenants = ["a", "b", ""];
      const waiter = collect(start(smallClient, { prompt: randomPrompt(PROMPT), maxTokens: MAX_TOKENS, sampling: greedy }, tenants[Math.floor(rand() * 3)]));
      await until("a request waiting for memory", async () => metricValue(await m(), "vllm:num_requests_waiting") === 1);
      let maxTokens = MAX_TOKENS;
      while (modelSessionBytes(geometry, DType.D_TYPE_FLOAT32, undefined, PROMPT + maxTokens) <= capacity) maxTokens *= 2;
      const t0 = Date.now();
      const e = await failure(collect(start(smallClient, { prompt: randomPrompt(PROMPT), maxTokens }, tenants[Math.floor(rand() * 3)])));
      expect(e?.code).toBe(status.RESOURCE_EXHAUSTED);
      expect(e?.details).toMatch(/can never fit/);
      expect(Date.now() - t0).toBeLessThan(5000);
      expect(metricValue(await m(), "vllm:num_requests_waiting")).toBe(1);
      const held = Date.now();
      await unary(kv, "releaseSession", { sessionId: "hog" });
      const r = await waiter;
      expect(r.final?.usage?.completionTokens).toBeGreaterThan(0);
      // It reports the time it waited (at least until the never-fitting one was refused).
      expect(r.final!.usage!.queueMs).toBeGreaterThanOrEqual(held - t0 - 50);
    } finally {
      await unary(kv, "releaseSession", { sessionId: "hog" }).catch(() => undefined);
      kv.close();
    }
  });

  it("turns waiting for their session's earlier turns hold no running slot: another request runs beside them", async () => {
    const two = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_MAX_RUNNING_REQUESTS: "2" } });
    const c = computeClient(two.compute.address);
    try {
      const sid = `turns-${seed}`;
      await unary(c, "createSession", { sessionId: sid, kind: 1, maxContextTokens: 2048 });
      // Four turns on one session at once, each long enough to keep the next ones waiting.
      const order: string[] = [];
      const turns = Array.from({ length: 4 }, (_, i) => collect(start(c, { sessionId: sid, prompt: randomPrompt(8), maxTokens: 120, sampling: greedy, ignoreEos: true })).then(() => order.push(`turn${i}`)));
      await until("the first turn running", async () => (metricValue(await fetchMetrics(two.compute.metricsPort), "vllm:num_requests_running") ?? 0) >= 1);
      // A request of no session of theirs: the second running slot is free for it.
      const other = collect(start(c, { prompt: randomPrompt(8), maxTokens: 4, sampling: greedy })).then(() => order.push("other"));
      await Promise.all([...turns, other]);
      expect(order.indexOf("other"), order.join(" ")).toBeLessThan(2);
      await unary(c, "closeSession", { sessionId: sid });
    } finally {
      c.close();
      await two.stop();
    }
  }, 60_000);

  it("a turn whose session is free does not wait: with FREEKV_QUEUE_MAX_REQUESTS 0 it runs, and one behind it is refused", async () => {
    const none = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_QUEUE_MAX_REQUESTS: "0" } });
    const c = computeClient(none.compute.address);
    try {
      const sid = `no-queue-${seed}`;
      await unary(c, "createSession", { sessionId: sid, kind: 1, maxContextTokens: 4096 });
      const first = collect(start(c, { sessionId: sid, prompt: randomPrompt(6), maxTokens: 2000, sampling: greedy, ignoreEos: true }));
      await until("the turn running", async () => (metricValue(await fetchMetrics(none.compute.metricsPort), "vllm:num_requests_running") ?? 0) >= 1);
      const behind = await failure(collect(start(c, { sessionId: sid, prompt: randomPrompt(3), maxTokens: 2, sampling: greedy })));
      expect(behind?.code).toBe(status.RESOURCE_EXHAUSTED);
      expect(behind?.details).toMatch(/FREEKV_QUEUE_MAX_REQUESTS 0/);
      expect((await first).final?.usage?.completionTokens).toBeGreaterThan(0);
      // The session is free again: the next turn runs.
      const next = await collect(start(c, { sessionId: sid, prompt: randomPrompt(3), maxTokens: 2, sampling: greedy }));
      expect(next.final?.usage?.completionTokens).toBeGreaterThan(0);
      await unary(c, "closeSession", { sessionId: sid });
    } finally {
      c.close();
      await none.stop();
    }
  }, 60_000);

  it("turns waiting for their session's earlier turns count as waiting requests: past FREEKV_QUEUE_MAX_REQUESTS they are refused at once", async () => {
    const two = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_QUEUE_MAX_REQUESTS: "2" } });
    const c = computeClient(two.compute.address);
    try {
      const sid = `bounded-turns-${seed}`;
      await unary(c, "createSession", { sessionId: sid, kind: 1, maxContextTokens: 4096 });
      const first = collect(start(c, { sessionId: sid, prompt: randomPrompt(8), maxTokens: 2000, sampling: greedy, ignoreEos: true }));
      await until("the first turn running", async () => (metricValue(await fetchMetrics(two.compute.metricsPort), "vllm:num_requests_running") ?? 0) >= 1);
      const extra = 3 + Math.floor(rand() * 4);
      const t0 = Date.now();
      const turns = Array.from({ length: extra }, () => collect(start(c, { sessionId: sid, prompt: randomPrompt(4), maxTokens: 2, sampling: greedy })));
      const refused = turns.map((t) => failure(t));
      await until("two turns waiting", async () => metricValue(await fetchMetrics(two.compute.metricsPort), "vllm:num_requests_waiting") === 2);
      const all = await Promise.all(refused);
      const exhausted = all.filter((e) => e?.code === status.RESOURCE_EXHAUSTED);
      expect(exhausted, all.map((e) => e?.code).join(",")).toHaveLength(extra - 2);
      for (const e of exhausted) expect(e?.details).toMatch(/the request queue is full: 2 requests wait \(FREEKV_QUEUE_MAX_REQUESTS 2\)/);
      expect(all.filter((e) => e === undefined)).toHaveLength(2);
      expect((await first).final?.usage?.completionTokens).toBeGreaterThan(0);
      expect(Date.now() - t0).toBeLessThan(50_000);
      expect(metricValue(await fetchMetrics(two.compute.metricsPort), "vllm:num_requests_waiting")).toBe(0);
      await unary(c, "closeSession", { sessionId: sid });
    } finally {
      c.close();
      await two.stop();
    }
  }, 60_000);

  it("with the only running slot held, what the request alone makes invalid is refused at once, not queued to its deadline", async () => {
    const m = async () => fetchMetrics(narrow.compute.metricsPort);
    const attention = `att-${seed.toString(36)}`;
    await unary(narrowClient, "createSession", { sessionId: attention, kind: 2, geometry: { layers: 1, queryHeads: 2, kvHeads: 1, headDim: 64 } });
    const running = start(narrowClient, { prompt: randomPrompt(8000), maxTokens: 1, sampling: greedy }, "x");
    const runningDone = collect(running);
    await until("the held request to run", async () => metricValue(await m(), "vllm:num_requests_running") === 1);
    const refusedAtOnce = async (req: Partial<GenerateRequest>) => {
      const t0 = Date.now();
      const e = await failure(collect(start(narrowClient, req, "y", 20_000)));
      return { code: e?.code, details: e?.details, ms: Date.now() - t0 };
    };
    // A fresh session's retrieval settings that no session can have.
    const pageSize = 3 + 2 * Math.floor(rand() * 5);
    const badRetrieval = await refusedAtOnce({ prompt: randomPrompt(8), maxTokens: 4, retrieval: { pageSize } as GenerateRequest["retrieval"] });
    expect(badRetrieval.code, badRetrieval.details).toBe(status.INVALID_ARGUMENT);
    expect(badRetrieval.details).toMatch(/^retrieval\./);
    expect(badRetrieval.ms).toBeLessThan(5_000);
    // A session that can never serve Generate.
    const attentionTurn = await refusedAtOnce({ sessionId: attention, prompt: randomPrompt(4), maxTokens: 2 });
    expect(attentionTurn.code, attentionTurn.details).toBe(status.FAILED_PRECONDITION);
    expect(attentionTurn.details).toMatch(/attention session/);
    expect(attentionTurn.ms).toBeLessThan(5_000);
    // Session ids CreateSession would refuse: refused alike, before any lookup.
    for (const id of ["a b", "x".repeat(129 + Math.floor(rand() * 1000))]) {
      const turn = await refusedAtOnce({ sessionId: id, prompt: randomPrompt(4), maxTokens: 2 });
      expect(turn.code, turn.details).toBe(status.INVALID_ARGUMENT);
      expect(turn.details).toMatch(/^session_id: must match/);
      for (const method of ["getSession", "closeSession"]) {
        const e = await unaryError(narrowClient, method, { sessionId: id });
        expect(e.code, `${method}: ${e.details}`).toBe(status.INVALID_ARGUMENT);
      }
    }
    expect(metricValue(await m(), "vllm:num_requests_waiting")).toBe(0);
    running.cancel();
    expect((await failure(runningDone))?.code).toBe(status.CANCELLED);
    await unary(narrowClient, "closeSession", { sessionId: attention });
    // The held request has left its slot before the next test uses this compute.
    await until("the slot to be free", async () => {
      const t = await m();
      return metricValue(t, "vllm:num_requests_waiting") === 0 && metricValue(t, "vllm:num_requests_running") === 0;
    });
  });

  it("one running slot, a queue of two: a third waiting request is refused, a cancelled one leaves at once", async () => {
    // A request that holds the running slot for seconds: a long prompt prefilled one token per
    // model call (FREEKV_PREFILL_CHUNK_TOKENS=1 here); cancelled at the end.
    const prompt = randomPrompt(8000);
    const m = async () => fetchMetrics(narrow.compute.metricsPort);
    const running = start(narrowClient, { prompt, maxTokens: 1, sampling: greedy }, "x");
    const runningDone = collect(running);
    await until("the held request to run", async () => metricValue(await m(), "vllm:num_requests_running") === 1);
    const kvBefore = (await unary<{ sessionIds: string[] }>(narrowKv, "listSessions", {})).sessionIds.length;
    const w1 = start(narrowClient, { prompt: randomPrompt(8), maxTokens: 4 }, "y");
    const w1Done = collect(w1);
    const w2Done = collect(start(narrowClient, { prompt: randomPrompt(8), maxTokens: 4 }, "z"));
    await until("two waiting", async () => metricValue(await m(), "vllm:num_requests_waiting") === 2);
    const full = await failure(collect(start(narrowClient, { prompt: randomPrompt(8), maxTokens: 4 }, "y")));
    expect(full?.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(full?.details).toMatch(/queue is full/);
    // The cancelled one leaves now, while the slot is still held.
    w1.cancel();
    expect((await failure(w1Done))?.code).toBe(status.CANCELLED);
    await until("one waiting", async () => metricValue(await m(), "vllm:num_requests_waiting") === 1);
    expect(metricValue(await m(), "vllm:num_requests_running")).toBe(1);
    expect((await unary<{ sessionIds: string[] }>(narrowKv, "listSessions", {})).sessionIds.length).toBe(kvBefore);
    // The held request ends (cancelled); the last one then runs.
    running.cancel();
    expect((await failure(runningDone))?.code).toBe(status.CANCELLED);
    expect((await w2Done).final?.usage?.completionTokens).toBeGreaterThan(0);
    await until("the queue to empty", async () => {
      const t = await m();
      return metricValue(t, "vllm:num_requests_waiting") === 0 && metricValue(t, "vllm:num_requests_running") === 0;
    });
  });
});
