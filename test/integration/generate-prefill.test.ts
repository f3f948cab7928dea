/**
 * The edges of Generate's chunked prefill, through both tiers as processes serving the tiny
 * Llama-3 golden fixture with 24-token prefill chunks: chunk boundaries on and off page
 * boundaries (page sizes 8, 16 and 32) give transformers' continuation of the golden prompt, a
 * prompt that exactly fills pages or chunks gives the unchunked dense run's answer, a follow-up
 * turn prefills only its new tokens, a prompt longer than the session's context is refused with
 * nothing written, and prefill progress is reported on request. References: golden.json
 * (transformers) and the model's own dense attention prefilled in one call (no engine, no chunks).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type GenerateFinal, type GenerateResponse, type PrefillProgress } from "../../proto/gen/freekv/v1/compute.js";
import { RetrievalConfig } from "../../proto/gen/freekv/v1/common.js";
import { argmax } from "../../services/compute/generate/sampling.js";
import { loadModel } from "../../services/compute/model/loader.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startTiers, unary, type Tiers } from "../helpers/services.js";

const MODEL = join(import.meta.dirname, "..", "fixtures", "models", "tiny-llama3");
const golden = JSON.parse(readFileSync(join(MODEL, "golden.json"), "utf8")) as { prompt: number[]; continuation: number[] };
const CHUNK = 24;
const EOS = 2; // config.json's eos_token_id: always a stop token of Generate
const SEED = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1_000_000);

let tiers: Tiers;
let client: ReturnType<typeof computeClient>;
let kv: ReturnType<typeof kvstoreClient>;
const rand = prng(SEED);
const randomTokens = (n: number) => Array.from({ length: n }, () => 3 + Math.floor(rand() * 381));

beforeAll(async () => {
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_MODEL: MODEL, FREEKV_THREADS: "2", FREEKV_PREFILL_CHUNK_TOKENS: String(CHUNK) } });
  client = computeClient(tiers.compute.address);
  kv = kvstoreClient(tiers.kvstore.address);
});

afterAll(async () => {
  client?.close();
  kv?.close();
  await tiers?.stop();
});

interface Result {
  tokens: number[];
  progress: PrefillProgress[];
  /** Events in order: "p" progress, "t" tokens. */
  order: string;
  final: GenerateFinal;
}

function run(req: Partial<GenerateRequest>): Promise<Result> {
  const stream = client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + 60_000 });
  const r = { tokens: [] as number[], progress: [] as PrefillProgress[], order: "" } as Result;
  return new Promise((resolve, reject) => {
    stream.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk") {
        r.tokens.push(...m.event.value.tokenIds);
        r.order += "t";
      } else if (m.event?.$case === "progress") {
        r.progress.push(m.event.value);
        r.order += "p";
      } else if (m.event?.$case === "final") r.final = m.event.value;
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(r));
  });
}

const tokens = (ids: number[]) => ({ $case: "tokens" as const, value: { ids } });

let refSession = 1;
/** Greedy continuation by the model's own dense attention, the whole sequence prefilled in one call. */
async function dense(seq: number[], n: number): Promise<number[]> {
  const { model } = (dense.ref ??= loadModel(MODEL));
  const id = refSession++;
  let logits = await model.prefill(id, Int32Array.from(seq), 0, false);
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = argmax(logits);
    out.push(t);
    if (t === EOS) break;
    logits = await model.decode(Int32Array.of(id), Int32Array.of(t), Int32Array.of(seq.length + i));
  }
  model.releaseSession(id);
  return out;
}
dense.ref = undefined as ReturnType<typeof loadModel> | undefined;

async function metric(name: string): Promise<number> {
  return metricValue(await fetchMetrics(tiers.compute.metricsPort), name) ?? 0;
}

/** Full pages the kvstore has committed per layer; waits (briefly) until they are `want`. */
async function committedPages(sessionId: string, want?: number): Promise<number[]> {
  const t0 = Date.now();
  for (;;) {
    const a = await unary<{ committedPages: number[] }>(kv, "attachSession", { sessionId });
    if (want === undefined || a.committedPages.every((p) => p === want) || Date.now() - t0 > 5000) return a.committedPages;
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function contextTokens(sessionId: string): Promise<number> {
  return Number((await unary<{ session: { contextTokens: number } }>(client, "getSession", { sessionId })).session.contextTokens);
}

describe(`chunked prefill (${CHUNK}-token chunks; FREEKV_TEST_SEED=${SEED})`, () => {
  for (const pageSize of [8, 16, 32]) {
    const aligned = CHUNK % pageSize === 0 ? "on page boundaries" : "off page boundaries";
    it(`page size ${pageSize}, chunk ends ${aligned}: the golden continuation, every chunk counted`, async () => {
      const tokensBefore = await metric("freekv_compute_prefill_tokens_total");
      const chunksBefore = await metric("freekv_compute_prefill_chunk_seconds_count");
      const r = await run({ prompt: tokens(golden.prompt), maxTokens: 24, retrieval: RetrievalConfig.fromPartial({ pageSize }) });
      expect(r.tokens).toEqual(golden.continuation.slice(0, 24));
      expect(r.final.usage?.promptTokens).toBe(golden.prompt.length);
      expect((await metric("freekv_compute_prefill_tokens_total")) - tokensBefore).toBe(golden.prompt.length);
      expect((await metric("freekv_compute_prefill_chunk_seconds_count")) - chunksBefore).toBe(Math.ceil(golden.prompt.length / CHUNK));
    });
  }

  it("a prompt that exactly fills pages, and one that exactly fills chunks, answer as the unchunked dense run", async () => {
    for (const [pageSize, n] of [
      [32, 32], // one page, one chunk and a bit
      [16, 48], // three pages, two chunks exactly
      [8, 8], // one page, less than a chunk
      [16, 24 * 5], // five chunks, 7.5 pages
    ]) {
      const id = `fill-${pageSize}-${n}`;
      await unary(client, "createSession", { sessionId: id, kind: 1, retrieval: { pageSize }, maxContextTokens: 512 });
      const prompt = randomTokens(n);
      const r = await run({ sessionId: id, prompt: tokens(prompt), maxTokens: 10 });
      expect(r.tokens, `page ${pageSize}, prompt ${n}`).toEqual(await dense(prompt, 10));
      const ctx = Number(r.final.usage!.contextTokens);
      expect(await contextTokens(id)).toBe(ctx);
      expect(await committedPages(id, Math.floor(ctx / pageSize))).toEqual([Math.floor(ctx / pageSize), Math.floor(ctx / pageSize)]);
      await unary(client, "closeSession", { sessionId: id });
    }
  });

  it("a follow-up turn prefills only its new tokens and answers as one dense run over the conversation", async () => {
    await unary(client, "createSession", { sessionId: "turns", kind: 1, retrieval: { pageSize: 16 }, maxContextTokens: 1024 });
    const a = randomTokens(150);
    const b = randomTokens(61);
    const first = await run({ sessionId: "turns", prompt: tokens(a), maxTokens: 9 });
    expect(first.tokens).toEqual(await dense(a, 9));
    const tokensBefore = await metric("freekv_compute_prefill_tokens_total");
    const chunksBefore = await metric("freekv_compute_prefill_chunk_seconds_count");
    const second = await run({ sessionId: "turns", prompt: tokens(b), maxTokens: 9 });
    // The new turn: its prompt, after the previous answer's last token (sampled, never fed yet).
    expect(second.final.usage?.promptTokens).toBe(b.length);
    expect((await metric("freekv_compute_prefill_tokens_total")) - tokensBefore).toBe(b.length + 1);
    expect((await metric("freekv_compute_prefill_chunk_seconds_count")) - chunksBefore).toBe(Math.ceil((b.length + 1) / CHUNK));
    expect(Number(second.final.usage?.contextTokens)).toBe(a.length + first.tokens.length + b.length + second.tokens.length - 1);
    expect(second.tokens).toEqual(await dense([...a, ...first.tokens, ...b], 9));
    await unary(client, "closeSession", { sessionId: "turns" });
  });

  it("a prompt longer than the session's context: INVALID_ARGUMENT, nothing written, the next turn as the reference", async () => {
    const id = "too-long";
    const P = 16;
    await unary(client, "createSession", { sessionId: id, kind: 1, retrieval: { pageSize: P }, maxContextTokens: 128 });
    const a = randomTokens(50);
    const first = await run({ sessionId: id, prompt: tokens(a), maxTokens: 8 });
    const ctx = Number(first.final.usage!.contextTokens);
    const pages = await committedPages(id, Math.floor(ctx / P));
    expect(pages).toEqual([Math.floor(ctx / P), Math.floor(ctx / P)]);
    const prefilled = await metric("freekv_compute_prefill_tokens_total");

    const big = randomTokens(128 - ctx); // with the pending token, one more than is left
    const e = await run({ sessionId: id, prompt: tokens(big), maxTokens: 4 }).then(
      () => undefined,
      (err: ServiceError) => err,
    );
    expect(e?.code).toBe(status.INVALID_ARGUMENT);
    expect(e?.details).toBe(`prompt: ${big.length} tokens do not fit the session's context: ${ctx + 1} of max_context_tokens 128 are used, ${128 - ctx - 1} left`);
    expect(await contextTokens(id)).toBe(ctx);
    expect(await committedPages(id)).toEqual(pages);
    expect(await metric("freekv_compute_prefill_tokens_total")).toBe(prefilled);

    // A fresh session's context is FREEKV_MAX_CONTEXT_TOKENS (32768 by default): checked before it is made.
    const huge = await run({ prompt: tokens(randomTokens(32769)), maxTokens: 1 }).then(
      () => undefined,
      (err: ServiceError) => err,
    );
    expect(huge?.code).toBe(status.INVALID_ARGUMENT);
    expect(huge?.details).toBe("prompt: 32769 tokens do not fit the session's context: 0 of max_context_tokens 32768 are used, 32768 left");

    const c = big.slice(0, 30);
    const next = await run({ sessionId: id, prompt: tokens(c), maxTokens: 8 });
    expect(next.tokens).toEqual(await dense([...a, ...first.tokens, ...c], 8));
    await unary(client, "closeSession", { sessionId: id });
  });

  it("reports prefill progress after each chunk when asked, and only for prompts at least that long", async () => {
    const n = golden.prompt.length;
    const r = await run({ prompt: tokens(golden.prompt), maxTokens: 3, prefillProgressMinTokens: n });
    const want = Array.from({ length: Math.ceil(n / CHUNK) }, (_, k) => Math.min(n, (k + 1) * CHUNK));
    expect(r.progress.map((p) => p.prefilledTokens)).toEqual(want);
    expect(r.progress.every((p) => p.promptTokens === n)).toBe(true);
    expect(r.order).toBe(`${"p".repeat(want.length)}ttt`);
    expect(r.tokens).toEqual(golden.continuation.slice(0, 3));
    // Shorter than the threshold, or not asked: no progress events.
    expect((await run({ prompt: tokens(golden.prompt), maxTokens: 2, prefillProgressMinTokens: n + 1 })).progress).toHaveLength(0);
    expect((await run({ prompt: tokens(golden.prompt), maxTokens: 2 })).progress).toHaveLength(0);
    // A follow-up turn counts its own prompt's tokens (the pending token fed first is not one).
    await unary(client, "createSession", { sessionId: "progress", kind: 1 });
    await run({ sessionId: "progress", prompt: tokens(randomTokens(10)), maxTokens: 2 });
    const b = randomTokens(50);
    const second = await run({ sessionId: "progress", prompt: tokens(b), maxTokens: 2, prefillProgressMinTokens: 1 });
    expect(second.progress.map((p) => p.prefilledTokens)).toEqual([CHUNK - 1, 2 * CHUNK - 1, 50]);
    await unary(client, "closeSession", { sessionId: "progress" });
    // Throughput per Generate is observed.
    const m = await fetchMetrics(tiers.compute.metricsPort);
    expect(metricValue(m, "freekv_generate_prefill_tokens_per_second_count")).toBeGreaterThan(0);
    expect(metricValue(m, "freekv_generate_prefill_tokens_per_second_sum")).toBeGreaterThan(0);
  });
});
