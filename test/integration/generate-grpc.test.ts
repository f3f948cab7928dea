/**
 * Generate through gRPC with both tiers as processes, serving the tiny Llama-3 golden fixture:
 * the greedy continuation equals transformers', concurrent calls share batched decode steps and
 * still each get that answer, a session continues across calls (multi-turn) exactly like one
 * dense run over the whole conversation, a deadline and a cancellation stop the work and free the
 * request's segments, and bad requests get the status naming the problem.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ClientReadableStream, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type GenerateResponse, type GenerateFinal } from "../../proto/gen/freekv/v1/compute.js";
import { loadModel } from "../../services/compute/model/loader.js";
import { argmax } from "../../services/compute/generate/sampling.js";
import { retrievalDefaults } from "../../services/common/retrieval.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startTiers, unary, type Tiers } from "../helpers/services.js";

const MODEL = join(import.meta.dirname, "..", "fixtures", "models", "tiny-llama3");
const golden = JSON.parse(readFileSync(join(MODEL, "golden.json"), "utf8")) as { prompt: number[]; continuation: number[] };

let tiers: Tiers;
let client: ReturnType<typeof computeClient>;
let kv: ReturnType<typeof kvstoreClient>;

beforeAll(async () => {
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_MODEL: MODEL, FREEKV_THREADS: "2" } });
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
  chunks: GenerateResponse["event"][];
  final?: GenerateFinal;
}

function start(req: Partial<GenerateRequest>, deadlineMs = 60_000): ClientReadableStream<GenerateResponse> {
  return client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + deadlineMs });
}

function collect(stream: ClientReadableStream<GenerateResponse>, onChunk?: (n: number) => void): Promise<Result> {
  const r: Result = { tokens: [], chunks: [] };
  return new Promise((resolve, reject) => {
    stream.on("data", (m: GenerateResponse) => {
      r.chunks.push(m.event);
      if (m.event?.$case === "chunk") {
        r.tokens.push(...m.event.value.tokenIds);
        onChunk?.(r.tokens.length);
      } else if (m.event?.$case === "final") r.final = m.event.value;
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(r));
  });
}

const run = (req: Partial<GenerateRequest>, deadlineMs?: number) => collect(start(req, deadlineMs));
const tokens = (ids: number[]) => ({ $case: "tokens" as const, value: { ids } });

async function expectStatus(p: Promise<unknown>, code: status, text: RegExp): Promise<void> {
  const e = (await p.then(
    () => undefined,
    (err: ServiceError) => err,
  )) as ServiceError | undefined;
  expect(e, "the call should fail").toBeDefined();
  expect(e!.code).toBe(code);
  expect(e!.details).toMatch(text);
}

/** The sessions the kvstore holds (each with its four segments). */
async function kvSessions(): Promise<Set<string>> {
  const r = await unary<{ sessionIds: string[] }>(kv, "listSessions", {});
  return new Set(r.sessionIds);
}

/** Waits until the kvstore holds no session beyond `before` (the request's session was released). */
async function sessionsBack(before: Set<string>, timeoutMs = 5000): Promise<void> {
  const t0 = Date.now();
  for (;;) {
    const extra = [...(await kvSessions())].filter((s) => !before.has(s));
    if (extra.length === 0) return;
    if (Date.now() - t0 > timeoutMs) throw new Error(`sessions left behind at the kvstore: ${extra.join(", ")}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe("Generate over gRPC", () => {
  it("continues the golden prompt exactly as transformers does (greedy, FreeKV session)", async () => {
    const r = await run({ prompt: tokens(golden.prompt), maxTokens: golden.continuation.length });
    expect(r.tokens).toEqual(golden.continuation);
    expect(r.final?.finishReason).toBe(1); // LENGTH
    expect(r.final?.usage).toMatchObject({ promptTokens: golden.prompt.length, completionTokens: golden.continuation.length });
    expect(r.final?.usage?.contextTokens).toBe(golden.prompt.length + golden.continuation.length - 1);
    expect(r.final?.stats?.decodeSteps).toBeGreaterThan(0);
    for (const c of r.chunks) if (c?.$case === "chunk") expect(c.value.stepMs).toBeGreaterThan(0);
    const m = await fetchMetrics(tiers.compute.metricsPort);
    expect(metricValue(m, "freekv_generate_requests_total", 'finish="length"')).toBeGreaterThanOrEqual(1);
    expect(metricValue(m, "freekv_generate_tokens_total", 'kind="completion"')).toBeGreaterThanOrEqual(golden.continuation.length);
  });

  // Timing-dependent: the three calls must be decoding at the same time. Under the whole suite on
  // 2 cores one call once finished its 30 tokens before the others were admitted (largest batch 1);
  // a retry asks again, and a build that never batches still fails all three tries.
  it("batches the decode steps of concurrent calls, each still getting its own answer", { retry: 2 }, async () => {
    const n = 3;
    const rs = await Promise.all(Array.from({ length: n }, () => run({ prompt: tokens(golden.prompt), maxTokens: 30 })));
    for (const r of rs) expect(r.tokens).toEqual(golden.continuation.slice(0, 30));
    const biggest = Math.max(...rs.map((r) => r.final?.maxBatchSize ?? 0));
    const chunkBatches = rs.flatMap((r) => r.chunks.flatMap((c) => (c?.$case === "chunk" ? [c.value.batchSize] : [])));
    console.log(`concurrent Generate: largest batch ${biggest}; chunk batch sizes seen ${[...new Set(chunkBatches)].sort().join(",")}`);
    expect(biggest).toBeGreaterThan(1);
    expect(Math.max(...chunkBatches)).toBe(biggest);
  });

  it("commits the pages a decode step fills in every layer with one CommitPages call", async () => {
    // Two fresh sessions, prompts shorter than a page (the prefill fills none): one generation
    // that fills no page and one that fills `fills`; the difference in the kvstore's accepted
    // commits is one per fill (not one per fill and layer), whatever else a request commits.
    const commits = async () => metricValue(await fetchMetrics(tiers.kvstore.metricsPort), "freekv_kvstore_commits_total") ?? 0;
    const P = retrievalDefaults().pageSize; // the sessions take the default retrieval
    const prompt = golden.prompt.slice(0, 5);
    const delta = async (id: string, maxTokens: number) => {
      await unary(client, "createSession", { sessionId: id, kind: 1 });
      const before = await commits();
      const r = await run({ sessionId: id, prompt: tokens(prompt), maxTokens });
      await unary(client, "closeSession", { sessionId: id });
      return { d: (await commits()) - before, context: r.final!.usage!.contextTokens };
    };
    const none = await delta("commit-none", P - prompt.length - 2);
    expect(Math.floor(none.context / P)).toBe(0);
    const some = await delta("commit-some", 3 * P);
    const fills = Math.floor(some.context / P);
    expect(fills).toBeGreaterThanOrEqual(2);
    expect(some.d - none.d).toBe(fills);
  });

  it("continues a session across calls like one dense run over the whole conversation", async () => {
    await unary(client, "createSession", { sessionId: "chat-1", kind: 1 });
    const a = golden.prompt.slice(0, 50);
    const b = golden.prompt.slice(200, 230);
    const first = await run({ sessionId: "chat-1", prompt: tokens(a), maxTokens: 8 });
    const second = await run({ sessionId: "chat-1", prompt: tokens(b), maxTokens: 8 });
    expect(second.final?.usage?.contextTokens).toBe(a.length + 8 + b.length + 8 - 1);
    // Reference: the model's own dense attention over a + first + b, greedy.
    const { model } = loadModel(MODEL);
    const seq = [...a, ...first.tokens, ...b];
    let logits = await model.prefill(1, Int32Array.from(seq), 0, false);
    const want: number[] = [];
    for (let i = 0; i < 8; i++) {
      const t = argmax(logits);
      want.push(t);
      logits = await model.decode(Int32Array.of(1), Int32Array.of(t), Int32Array.of(seq.length + i));
    }
    expect(second.tokens).toEqual(want);
    await unary(client, "closeSession", { sessionId: "chat-1" });
  });

  it("stops at the deadline and frees the request's session", async () => {
    const before = await kvSessions();
    const e = await run({ prompt: tokens(golden.prompt), maxTokens: 20_000 }, 600).then(
      () => undefined,
      (err: ServiceError) => err,
    );
    expect(e?.code).toBe(status.DEADLINE_EXCEEDED);
    await sessionsBack(before);
  });

  it("stops on cancellation and frees the request's session", async () => {
    const before = await kvSessions();
    const stream = start({ prompt: tokens(golden.prompt), maxTokens: 20_000 });
    const done = collect(stream, (n) => {
      if (n === 3) stream.cancel();
    });
    const e = await done.then(
      () => undefined,
      (err: ServiceError) => err,
    );
    expect(e?.code).toBe(status.CANCELLED);
    await sessionsBack(before);
  });

  it("answers bad requests with the status naming the problem", async () => {
    await expectStatus(run({ sessionId: "no-such-session", prompt: tokens([1, 2]), maxTokens: 2 }), status.NOT_FOUND, /no-such-session/);
    await expectStatus(run({ prompt: tokens([1, 5000, 3]), maxTokens: 2 }), status.INVALID_ARGUMENT, /prompt\.tokens\[1\].*5000/);
    await expectStatus(run({ prompt: tokens([1, 2]), maxTokens: 0 }), status.INVALID_ARGUMENT, /max_tokens/);
    await expectStatus(run({ prompt: { $case: "text", value: "hello" }, maxTokens: 2 }), status.FAILED_PRECONDITION, /tokenizer/);
    await expectStatus(run({ prompt: tokens([1, 2]), maxTokens: 2, sampling: { temperature: -1, topP: 0, topK: 0, seed: 0 } }), status.INVALID_ARGUMENT, /temperature/);
    // Stop conditions are matched after every token: their number and size are bounded.
    await expectStatus(run({ prompt: tokens([1, 2]), maxTokens: 2, stopStrings: Array.from({ length: 17 }, (_, i) => `s${i}`) }), status.INVALID_ARGUMENT, /^stop_strings: takes at most 16 strings, got 17/);
    await expectStatus(run({ prompt: tokens([1, 2]), maxTokens: 2, stopStrings: ["ok", "é".repeat(129)] }), status.INVALID_ARGUMENT, /^stop_strings\[1\]: is 258 bytes; at most 256/);
    await expectStatus(run({ prompt: tokens([1, 2]), maxTokens: 2, stopTokenIds: Array.from({ length: 1025 }, (_, i) => i) }), status.INVALID_ARGUMENT, /^stop_token_ids: takes at most 1024/);
    await unary(client, "createSession", { sessionId: "attn", kind: 2, geometry: { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 } });
    await expectStatus(run({ sessionId: "attn", prompt: tokens([1, 2]), maxTokens: 2 }), status.FAILED_PRECONDITION, /attention session/);
    await unary(client, "closeSession", { sessionId: "attn" });
    await unary(client, "createSession", { sessionId: "small", kind: 1, maxContextTokens: 64 });
    await expectStatus(run({ sessionId: "small", prompt: tokens(golden.prompt.slice(0, 100)), maxTokens: 2 }), status.INVALID_ARGUMENT, /^prompt: 100 tokens do not fit.*max_context_tokens 64/);
    // The session is unaffected and still serves a prompt that fits.
    const ok = await run({ sessionId: "small", prompt: tokens(golden.prompt.slice(0, 20)), maxTokens: 4 });
    expect(ok.tokens).toHaveLength(4);
    await unary(client, "closeSession", { sessionId: "small" });
  });
});
