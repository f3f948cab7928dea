/**
 * Memory that follows the context, across real processes (the built-in model, random prompts):
 * - a named session with a large max_context_tokens holds only the extents its turns reach (the
 *   kvstore's reserved bytes equal the real allocation, far below the apparent size), grows across
 *   many extents during long generations, and its tokens equal those of the same turns on a
 *   kvstore that reserves the whole context at the first turn;
 * - a turn whose growth the capacity cannot take waits in the request queue and runs once another
 *   session is closed; a turn that could never fit is refused at once, naming the limit;
 * - a kvstore restarted over a persistent directory (Redis) keeps each session's reservation and
 *   memory, and the conversation continues exactly;
 * - ReserveContext fuzzed with random sessions and sizes answers only allowed statuses, never
 *   commits more than the capacity, and keeps counted and allocated bytes equal.
 */
import { randomBytes } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Redis } from "ioredis";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type ComputeServiceClient, type GenerateFinal, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { DType, type ModelGeometry } from "../../proto/gen/freekv/v1/common.js";
import { builtinModelDir, readModelFolder } from "../../services/compute/model/loader.js";
import { modelSessionBytes } from "../../services/compute/sessions/footprint.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startService, startTiers, unary, type ServiceProcess, type Tiers, redisUp } from "../helpers/services.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 8)) >>> 0;
const rand = prng(seed);
const VOCAB = 512; // the built-in model's
const spec = readModelFolder(builtinModelDir()).spec.native;
const geometry: ModelGeometry = { layers: spec.layers, queryHeads: spec.qHeads, kvHeads: spec.kvHeads, headDim: spec.headDim, kvDtype: DType.D_TYPE_FLOAT32 };
const EXTENT = 64;
const MAX_CONTEXT = 16384;
const greedy = { temperature: 0, topP: 0, topK: 0, seed: 0 };
const tokens = (n: number) => Array.from({ length: n }, () => 3 + Math.floor(rand() * (VOCAB - 3)));

const cleanup: (() => Promise<unknown> | unknown)[] = [];
afterAll(async () => {
  for (const f of cleanup.reverse()) await f();
});

interface Turn {
  tokens: number[];
  final?: GenerateFinal;
  error?: ServiceError;
}

function generate(client: ComputeServiceClient, req: Partial<GenerateRequest>, deadlineMs = 120_000): Promise<Turn> {
  return new Promise((resolve) => {
    const t: Turn = { tokens: [] };
    const call = client.generate(GenerateRequest.fromPartial({ sampling: greedy, ...req }), new Metadata(), { deadline: Date.now() + deadlineMs });
    call.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") t.tokens.push(...m.event.value.tokenIds);
      else if (m.event?.$case === "final") t.final = m.event.value;
    });
    call.on("error", (e: ServiceError) => resolve({ ...t, error: e }));
    call.on("end", () => resolve(t));
  });
}

async function waitFor(what: string, ok: () => Promise<boolean>, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await ok().catch(() => false)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

interface Stats {
  sessions: number;
  reservedBytes: number;
  allocatedBytes: number;
  apparentBytes: number;
  capacityBytes: number;
}
async function kvStats(address: string): Promise<Stats> {
  const kv = kvstoreClient(address);
  try {
    const s = await unary<Record<string, number | string>>(kv, "getStats", {});
    return { sessions: Number(s.sessions), reservedBytes: Number(s.reservedBytes), allocatedBytes: Number(s.allocatedBytes), apparentBytes: Number(s.apparentBytes), capacityBytes: Number(s.capacityBytes) };
  } finally {
    kv.close();
  }
}
async function reservedTokens(address: string, sessionId: string): Promise<number> {
  const kv = kvstoreClient(address);
  try {
    return Number((await unary<{ reservedTokens: number }>(kv, "attachSession", { sessionId })).reservedTokens);
  } finally {
    kv.close();
  }
}

/** The conversation every tier replays: turns of random prompts, at least two, until the context spans several extents. */
const turns: { prompt: number[]; maxTokens: number }[] = [];
const nextTurn = () => ({ prompt: tokens(12 + Math.floor(rand() * 28)), maxTokens: 150 + Math.floor(rand() * 60) });
/** The reference: the same turns on a kvstore that reserves the whole context at once. */
let reference: Turn[] = [];


const up = await redisUp();
if (!up) console.warn("the reservation restart test is skipped: no Redis answers PING at 127.0.0.1:6379");

describe(`memory that follows the context (seed ${seed})`, () => {
  let grown: Tiers;
  let whole: Tiers;
  beforeAll(async () => {
    [grown, whole] = await Promise.all([
      startTiers({ kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_EXTENT_TOKENS: String(EXTENT) }, computeEnv: { ...QUIET, FREEKV_THREADS: "1" } }),
      startTiers({ kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_EXTENT_TOKENS: String(MAX_CONTEXT) }, computeEnv: { ...QUIET, FREEKV_THREADS: "1" } }),
    ]);
    cleanup.push(() => grown.stop(), () => whole.stop());
  });

  it("a named session with a large max context holds only its extents, grows across them, and answers as a whole reservation does", async () => {
    const g = computeClient(grown.compute.address);
    const w = computeClient(whole.compute.address);
    cleanup.push(() => g.close(), () => w.close());
    const base = await kvStats(grown.kvstore.address);
    await unary(g, "createSession", { sessionId: "long", maxContextTokens: MAX_CONTEXT });
    await unary(w, "createSession", { sessionId: "long", maxContextTokens: MAX_CONTEXT });
    // Created, nothing reserved for the store yet: a few small segments.
    expect(await reservedTokens(grown.kvstore.address, "long")).toBe(0);
    let context = 0;
    let pending = 0;
    // A greedy turn may end early at an EOS token: turns go on until the context spans 4 extents.
    for (let i = 0; i < 12 && (i < 2 || context <= 4 * EXTENT); i++) {
      const t = nextTurn();
      turns.push(t);
      const req = { sessionId: "long", prompt: { $case: "tokens" as const, value: { ids: t.prompt } }, maxTokens: t.maxTokens };
      const [a, b] = await Promise.all([generate(g, req), generate(w, req)]);
      expect(a.error).toBeUndefined();
      expect(b.error).toBeUndefined();
      expect(a.tokens.length).toBeGreaterThan(0);
      expect(a.tokens).toEqual(b.tokens);
      reference.push(b);
      // What this turn could reach, rounded up to an extent.
      const reach = context + pending + t.prompt.length + t.maxTokens;
      expect(await reservedTokens(grown.kvstore.address, "long")).toBe(Math.ceil(reach / EXTENT) * EXTENT);
      expect(await reservedTokens(whole.kvstore.address, "long")).toBe(MAX_CONTEXT);
      context = Number(a.final!.usage!.contextTokens);
      pending = 1;
    }
    expect(context).toBeGreaterThan(4 * EXTENT);
    const s = await kvStats(grown.kvstore.address);
    const full = await kvStats(whole.kvstore.address);
    // Counted = allocated; the session holds what its turns reached, not its apparent size.
    expect(s.allocatedBytes).toBe(s.reservedBytes);
    expect(full.allocatedBytes).toBe(full.reservedBytes);
    const reach = await reservedTokens(grown.kvstore.address, "long");
    const expected = modelSessionBytes(geometry, DType.D_TYPE_FLOAT32, undefined, MAX_CONTEXT, reach);
    expect(s.reservedBytes - base.reservedBytes).toBe(expected);
    expect(full.reservedBytes).toBe(modelSessionBytes(geometry, DType.D_TYPE_FLOAT32, undefined, MAX_CONTEXT));
    expect(s.apparentBytes).toBeGreaterThan(10 * s.reservedBytes);
    // The metrics say the same.
    const m = await fetchMetrics(grown.kvstore.metricsPort);
    expect(metricValue(m, "freekv_kvstore_reserved_bytes")).toBe(s.reservedBytes);
    expect(metricValue(m, "freekv_kvstore_allocated_bytes")).toBe(s.allocatedBytes);
    expect(metricValue(m, "freekv_kvstore_reservations_total")).toBeGreaterThanOrEqual(2);
    // Closed: the memory goes back.
    await unary(g, "closeSession", { sessionId: "long" });
    const after = await kvStats(grown.kvstore.address);
    expect(after.reservedBytes).toBe(base.reservedBytes);
    expect(after.allocatedBytes).toBe(base.allocatedBytes);
  }, 240_000);

  it("a turn the capacity cannot take waits until memory is released; one that could never fit is refused", async () => {
    const bytesAt = (tokens: number) => modelSessionBytes(geometry, DType.D_TYPE_FLOAT32, undefined, 4096, tokens);
    // Two sessions at one extent each, and room for a quarter extent more (the kvstore then
    // reserves exactly what a turn asks when a whole extent does not fit).
    const capacity = 2 * bytesAt(EXTENT) + Math.floor((bytesAt(2 * EXTENT) - bytesAt(EXTENT)) / 4);
    const tiers = await startTiers({
      kvstoreEnv: { ...QUIET, FREEKV_KVSTORE_EXTENT_TOKENS: String(EXTENT), FREEKV_KVSTORE_CAPACITY_BYTES: String(capacity) },
      computeEnv: { ...QUIET, FREEKV_THREADS: "1", FREEKV_QUEUE_RETRY_MS: "50" },
    });
    cleanup.push(() => tiers.stop());
    const c = computeClient(tiers.compute.address);
    cleanup.push(() => c.close());
    for (const id of ["a", "b"]) await unary(c, "createSession", { sessionId: id, maxContextTokens: 4096 });
    const turn = (id: string, n: number, maxTokens: number) => generate(c, { sessionId: id, prompt: { $case: "tokens", value: { ids: tokens(n) } }, maxTokens });
    const first = new Map<string, Turn>();
    for (const id of ["a", "b"]) {
      first.set(id, await turn(id, 20, EXTENT - 20));
      expect(first.get(id)!.error).toBeUndefined();
    }
    // A turn that could never fit (its session at 4074 tokens is over the whole capacity) is refused at once.
    const t0 = Date.now();
    const never = await turn("b", 10, 4000);
    expect(never.error?.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(never.error?.details).toMatch(/can never fit/);
    expect(never.error?.details).toContain(String(capacity));
    expect(Date.now() - t0).toBeLessThan(5000);
    // a's next turn reaches 104 tokens, 40 past its extent: it waits in the queue. (Its context is
    // 63 after a first turn of 20 + 44 tokens, the last one appended by the next turn; the random
    // prompt may have made the built-in model stop sooner, at EOS, so the turn asks for the rest.)
    const u = first.get("a")!.final!.usage!;
    const waiting = turn("a", 10, 104 - 10 - (u.promptTokens + u.completionTokens));
    const metrics = async () => fetchMetrics(tiers.compute.metricsPort);
    await waitFor("the turn to wait", async () => metricValue(await metrics(), "vllm:num_requests_waiting") === 1);
    await new Promise((r) => setTimeout(r, 300));
    expect(metricValue(await metrics(), "vllm:num_requests_waiting")).toBe(1);
    // b closes: a's turn gets its extent and runs.
    await unary(c, "closeSession", { sessionId: "b" });
    const done = await waiting;
    expect(done.error).toBeUndefined();
    expect(done.final?.usage?.completionTokens).toBeGreaterThan(0);
    expect(await reservedTokens(tiers.kvstore.address, "a")).toBe(2 * EXTENT);
    const s = await kvStats(tiers.kvstore.address);
    expect(s.reservedBytes).toBe(bytesAt(2 * EXTENT));
    expect(s.allocatedBytes).toBe(s.reservedBytes);
    expect(s.reservedBytes).toBeLessThanOrEqual(capacity);
  }, 120_000);

  it("ReserveContext fuzzed: allowed statuses only, never past the capacity, counted bytes equal allocated bytes", async () => {
    const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 };
    const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 64 };
    const capacity = 48 << 20;
    const kvp = await startService("kvstore", { env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", FREEKV_KVSTORE_EXTENT_TOKENS: String(1 + Math.floor(rand() * 300)), FREEKV_KVSTORE_CAPACITY_BYTES: String(capacity) } });
    cleanup.push(() => kvp.stop());
    const kv = kvstoreClient(kvp.address);
    cleanup.push(() => kv.close());
    const ids = ["f0", "f1", "f2"];
    const maxes = [1 << 20, 4096, 1 + Math.floor(rand() * 5000)];
    for (const [i, id] of ids.entries()) await unary(kv, "attachSession", { sessionId: id, geometry: G, retrieval: R, maxContextTokens: maxes[i], reserveTokens: 0 });
    const pick = <T,>(xs: T[]) => xs[Math.floor(rand() * xs.length)];
    const sizes = () => pick([0, 1, Math.floor(rand() * 100), Math.floor(rand() * 10_000), Math.floor(rand() * 2 ** 20), 2 ** 20, 2 ** 20 + 1, 2 ** 31, 2 ** 32 - 1, 4096, 4097]);
    const badIds = ["", "nobody", "x".repeat(129), "a b", "../etc", "\u00e9t\u00e9", "x".repeat(5000)];
    const seen = new Map<string, number>();
    const last = new Map<string, number>(ids.map((id) => [id, 0]));
    const N = 1500;
    for (let i = 0; i < N; i++) {
      const id = rand() < 0.8 ? pick(ids) : pick(badIds);
      const t = sizes();
      let code: number;
      try {
        const r = await unary<{ reservedTokens: number; reservedBytes: number }>(kv, "reserveContext", { sessionId: id, tokens: t });
        code = status.OK;
        // Never shrinks; covers what was asked.
        expect(r.reservedTokens).toBeGreaterThanOrEqual(Math.max(last.get(id)!, t));
        last.set(id, r.reservedTokens);
      } catch (e) {
        code = (e as ServiceError).code;
      }
      seen.set(status[code], (seen.get(status[code]) ?? 0) + 1);
      expect([status.OK, status.INVALID_ARGUMENT, status.NOT_FOUND, status.RESOURCE_EXHAUSTED], `${id.slice(0, 20)} ${t}: ${status[code]}`).toContain(code);
      if (i % 100 === 0) {
        const s = await kvStats(kvp.address);
        expect(s.reservedBytes).toBeLessThanOrEqual(capacity);
        expect(s.allocatedBytes).toBe(s.reservedBytes);
      }
    }
    expect(seen.get("OK")).toBeGreaterThan(0);
    expect(seen.get("RESOURCE_EXHAUSTED")).toBeGreaterThan(0);
    expect(seen.get("INVALID_ARGUMENT")).toBeGreaterThan(0);
    const s = await kvStats(kvp.address);
    expect(s.sessions).toBe(3);
    expect(s.allocatedBytes).toBe(s.reservedBytes);
    for (const id of ids) expect(await reservedTokens(kvp.address, id)).toBe(last.get(id));
    // Released: nothing left.
    for (const id of ids) await unary(kv, "releaseSession", { sessionId: id });
    const end = await kvStats(kvp.address);
    expect([end.reservedBytes, end.allocatedBytes]).toEqual([0, 0]);
  }, 120_000);

  // Continues the conversation of the first test (its reference tokens).
  it.skipIf(!up)("a kvstore restarted over Redis adopts each session with its reservation and memory; the conversation continues exactly", async () => {
    expect(reference.length).toBeGreaterThanOrEqual(2);
    const prefix = `freekv-test-${randomBytes(6).toString("hex")}:`;
    cleanup.push(async () => {
      const r = new Redis("redis://127.0.0.1:6379/0");
      const keys = await r.keys(`${prefix}*`);
      if (keys.length) await r.del(...keys);
      await r.quit();
    });
    const kvEnv = { ...QUIET, FREEKV_DIRECTORY: "redis://127.0.0.1:6379/0", FREEKV_DIRECTORY_PREFIX: prefix, FREEKV_KVSTORE_PERSIST: "1", FREEKV_KVSTORE_EXTENT_TOKENS: String(EXTENT) };
    const tiers = await startTiers({ kvstoreEnv: kvEnv, computeEnv: { ...QUIET, FREEKV_THREADS: "1" } });
    let kv2: ServiceProcess | undefined;
    cleanup.push(async () => {
      await tiers.compute.stop();
      await kv2?.stop();
      await tiers.kvstore.stop();
      // Persisted segments: this test's to remove.
      const k = await startService("kvstore", { env: { ...kvEnv, FREEKV_KVSTORE_PERSIST: "0", FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0" } });
      const c = kvstoreClient(k.address);
      await unary(c, "releaseSession", { sessionId: "kept" }).catch(() => undefined);
      c.close();
      await k.stop();
    });
    const c = computeClient(tiers.compute.address);
    cleanup.push(() => c.close());
    await unary(c, "createSession", { sessionId: "kept", maxContextTokens: MAX_CONTEXT });
    const first = await generate(c, { sessionId: "kept", prompt: { $case: "tokens", value: { ids: turns[0].prompt } }, maxTokens: turns[0].maxTokens });
    expect(first.error).toBeUndefined();
    expect(first.tokens).toEqual(reference[0].tokens);
    const reserved = await reservedTokens(tiers.kvstore.address, "kept");
    const before = await kvStats(tiers.kvstore.address);
    await tiers.kvstore.stop();
    kv2 = await startService("kvstore", { env: { ...kvEnv, FREEKV_KVSTORE_PORT: String(tiers.kvstore.grpcPort), FREEKV_KVSTORE_METRICS_PORT: "0" } });
    expect(await reservedTokens(kv2.address, "kept")).toBe(reserved);
    const after = await kvStats(kv2.address);
    expect(after.reservedBytes).toBe(before.reservedBytes);
    expect(after.allocatedBytes).toBe(before.allocatedBytes);
    expect(after.allocatedBytes).toBe(after.reservedBytes);
    // The next turns match the uninterrupted reference and grow the adopted reservation where they
    // reach past it (a turn that ended early at EOS may leave room): replayed until it has grown,
    // which the reference guarantees (its context ends past 4 extents).
    let context = Number(first.final!.usage!.contextTokens);
    let held = reserved;
    for (let k = 1; k < turns.length && held <= reserved; k++) {
      let next: Turn = { tokens: [] };
      await waitFor("compute to use the restarted kvstore", async () => {
        next = await generate(c, { sessionId: "kept", prompt: { $case: "tokens", value: { ids: turns[k].prompt } }, maxTokens: turns[k].maxTokens });
        return next.error?.code !== status.UNAVAILABLE;
      });
      expect(next.error).toBeUndefined();
      expect(next.tokens).toEqual(reference[k].tokens);
      const reach = context + 1 + turns[k].prompt.length + turns[k].maxTokens;
      const now = await reservedTokens(kv2.address, "kept");
      expect(now).toBe(Math.max(held, Math.ceil(reach / EXTENT) * EXTENT));
      held = now;
      context = Number(next.final!.usage!.contextTokens);
    }
    expect(held).toBeGreaterThan(reserved);
  }, 240_000);
});
