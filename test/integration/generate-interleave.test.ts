/**
 * Chunked prefill overlapped with decoding, through both tiers as processes serving the built-in
 * model with 32-token prefill chunks (time slices off: FREEKV_PREFILL_SLICE=0, so the chunk
 * boundaries are fixed; test/unit/model-scheduler.test.ts covers the slices): a session that decodes keeps producing tokens while another
 * session's long prompt is read (seen in the order of the two streams' events: the decoding
 * session's tokens arrive between the other's prefill progress events), and both answers equal
 * their answers when run alone; a call cancelled in the middle of a long prefill leaves its
 * session consistent (the chunks that ran are kept, in its context and its committed pages), the
 * next turn answers as one dense run over what the session holds, and nothing is left behind.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ClientReadableStream, type ServiceError } from "@grpc/grpc-js";
import { GenerateRequest, type GenerateFinal, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { argmax } from "../../services/compute/generate/sampling.js";
import { loadModel, readModelFolder } from "../../services/compute/model/loader.js";
import { prng } from "../helpers/prng.js";
import { QUIET, computeClient, fetchMetrics, kvstoreClient, metricValue, startTiers, unary, type Tiers } from "../helpers/services.js";

const CHUNK = 32;
const SEED = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1_000_000);
const dir = mkdtempSync(join(tmpdir(), "freekv-interleave-"));
let tiers: Tiers;
let client: ReturnType<typeof computeClient>;
let kv: ReturnType<typeof kvstoreClient>;
let eos: number[];
const rand = prng(SEED);
const randomTokens = (n: number) => Array.from({ length: n }, () => Math.floor(rand() * 500)); // below the special ids

beforeAll(async () => {
  execFileSync(process.execPath, [join(import.meta.dirname, "..", "..", "scripts", "make-builtin-model.mjs"), "--out", dir]);
  eos = readModelFolder(dir).spec.eosTokenIds;
  tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_MODEL: dir, FREEKV_THREADS: "2", FREEKV_PREFILL_CHUNK_TOKENS: String(CHUNK), FREEKV_PREFILL_SLICE: "0" } });
  client = computeClient(tiers.compute.address);
  kv = kvstoreClient(tiers.kvstore.address);
});

afterAll(async () => {
  client?.close();
  kv?.close();
  await tiers?.stop();
  rmSync(dir, { recursive: true, force: true });
});

interface Events {
  tokens: number[];
  /** Prefill progress events so far. */
  progress: number;
  final?: GenerateFinal;
}

function start(req: Partial<GenerateRequest>): ClientReadableStream<GenerateResponse> {
  return client.generate(GenerateRequest.fromPartial(req), new Metadata(), { deadline: Date.now() + 90_000 });
}

function collect(stream: ClientReadableStream<GenerateResponse>, on?: (e: Events, kind: "token" | "progress") => void): Promise<Events> {
  const e: Events = { tokens: [], progress: 0 };
  return new Promise((resolve, reject) => {
    stream.on("data", (m: GenerateResponse) => {
      if (m.event?.$case === "chunk" && m.event.value.tokenIds.length) {
        e.tokens.push(...m.event.value.tokenIds);
        on?.(e, "token");
      } else if (m.event?.$case === "progress") {
        e.progress++;
        on?.(e, "progress");
      } else if (m.event?.$case === "final") e.final = m.event.value;
    });
    stream.on("error", reject);
    stream.on("end", () => resolve(e));
  });
}

const tokens = (ids: number[]) => ({ $case: "tokens" as const, value: { ids } });
const greedy = { temperature: 0, topP: 0, topK: 0, seed: 0 };

let refSession = 1;
/** Greedy continuation by the model's own dense attention, the whole sequence prefilled in one call. */
async function dense(seq: number[], n: number): Promise<number[]> {
  const { model } = (dense.ref ??= loadModel(dir, { threads: 2 }));
  const id = refSession++;
  let logits = await model.prefill(id, Int32Array.from(seq), 0, false);
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = argmax(logits);
    out.push(t);
    if (eos.includes(t)) break;
    logits = await model.decode(Int32Array.of(id), Int32Array.of(t), Int32Array.of(seq.length + i));
  }
  model.releaseSession(id);
  return out;
}
dense.ref = undefined as ReturnType<typeof loadModel> | undefined;

const kvSessions = async () => new Set((await unary<{ sessionIds: string[] }>(kv, "listSessions", {})).sessionIds);

describe(`prefill overlapped with decoding (built-in model, ${CHUNK}-token chunks; FREEKV_TEST_SEED=${SEED})`, () => {
  it("a decoding session produces tokens while another session's long prompt is read; both answer as alone", async () => {
    const N = 160;
    // A decoding prompt whose greedy answer alone runs the full length (no EOS on the way).
    let a: number[] = [];
    let aloneA: number[] = [];
    for (let tries = 0; tries < 8 && aloneA.length < N; tries++) {
      a = randomTokens(40);
      aloneA = (await collect(start({ prompt: tokens(a), maxTokens: N, sampling: greedy }))).tokens;
    }
    expect(aloneA.length, "no prompt found whose answer runs the full length").toBe(N);
    const b = randomTokens(1500);
    const aloneB = await collect(start({ prompt: tokens(b), maxTokens: 6, sampling: greedy }));
    const chunks = Math.ceil(b.length / CHUNK);

    // A decodes; once it has a few tokens, B arrives with its long prompt.
    let bProgress = 0;
    let aDuringPrefill = 0;
    let aBatch = 0;
    let bStream: Promise<Events> | undefined;
    const aStream = start({ prompt: tokens(a), maxTokens: N, sampling: greedy });
    aStream.on("data", (m: GenerateResponse) => {
      // While B's prompt is read, A decodes alone (batch 1); B joins the batch once it decodes.
      if (m.event?.$case === "chunk" && bProgress > 0 && bProgress < chunks) aBatch = Math.max(aBatch, m.event.value.batchSize);
    });
    const aRun = collect(aStream, (e) => {
      if (e.tokens.length === 3) bStream = collect(start({ prompt: tokens(b), maxTokens: 6, sampling: greedy, prefillProgressMinTokens: 1 }), (be, kind) => {
        if (kind === "progress") bProgress = be.progress;
      });
      if (bProgress > 0 && bProgress < chunks) aDuringPrefill++;
    });
    const ra = await aRun;
    expect(bStream).toBeDefined();
    const rb = await bStream!;
    console.log(
      `interleave: ${aDuringPrefill} of the decoding session's tokens arrived during the other session's ${chunks}-chunk prefill ` +
        `(its prefill ${rb.final!.usage!.prefillMs.toFixed(0)} ms, alone ${aloneB.final!.usage!.prefillMs.toFixed(0)} ms)`,
    );
    expect(rb.progress).toBe(chunks);
    expect(ra.final!.usage!.completionTokens).toBe(N);
    // At most one chunk runs between two decode steps: the decoding session gets a step
    // between almost every pair of chunks (the stream's events may bunch a little).
    expect(aDuringPrefill).toBeGreaterThanOrEqual(Math.floor((chunks - 1) / 2));
    expect(ra.tokens).toEqual(aloneA);
    expect(rb.tokens).toEqual(aloneB.tokens);
    expect(aBatch).toBe(1);
  });

  it("a call cancelled during a long prefill keeps the chunks that ran, consistently; the next turn and the session's pages agree", async () => {
    const before = await kvSessions();
    const id = "cancel-prefill";
    const P = 32;
    await unary(client, "createSession", { sessionId: id, kind: 1, retrieval: { pageSize: P }, maxContextTokens: 4096 });
    const p1 = randomTokens(30);
    const first = await collect(start({ sessionId: id, prompt: tokens(p1), maxTokens: 5, sampling: greedy }));
    const c1 = Number(first.final!.usage!.contextTokens);
    expect(c1).toBe(p1.length + first.tokens.length - 1);

    const p2 = randomTokens(1500);
    const s2 = start({ sessionId: id, prompt: tokens(p2), maxTokens: 5, sampling: greedy, prefillProgressMinTokens: 1 });
    const cancelled = await collect(s2, (e, kind) => {
      if (kind === "progress" && e.progress === 3) s2.cancel();
    }).then(
      () => undefined,
      (err: ServiceError) => err,
    );
    expect(cancelled?.code).toBe(status.CANCELLED);

    // The next turn waits for the cancelled call to let go of the session.
    const p3 = randomTokens(20);
    const third = await collect(start({ sessionId: id, prompt: tokens(p3), maxTokens: 6, sampling: greedy }));
    const c3 = Number(third.final!.usage!.contextTokens);
    const c2 = c3 - p3.length - third.tokens.length + 1;
    const kept = c2 - c1; // whole chunks of [pending token, ...p2]
    console.log(`cancelled prefill: ${kept} of ${p2.length + 1} tokens kept (${kept / CHUNK} chunks)`);
    expect(kept % CHUNK).toBe(0);
    expect(kept).toBeGreaterThanOrEqual(3 * CHUNK);
    expect(kept).toBeLessThan(p2.length + 1);
    expect(third.tokens).toEqual(await dense([...p1, ...first.tokens, ...p2.slice(0, kept - 1), ...p3], 6));

    // What the session holds is what compute and the kvstore say it holds.
    const session = await unary<{ session: { contextTokens: number } }>(client, "getSession", { sessionId: id });
    expect(Number(session.session.contextTokens)).toBe(c3);
    const t0 = Date.now();
    let pages: number[] = [];
    while (Date.now() - t0 < 5000) {
      pages = (await unary<{ committedPages: number[] }>(kv, "attachSession", { sessionId: id })).committedPages;
      if (pages.every((p) => p === Math.floor(c3 / P))) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(pages).toEqual(new Array(pages.length).fill(Math.floor(c3 / P)));
    expect(pages.length).toBe(4);
    await unary(client, "closeSession", { sessionId: id });

    // A fresh session's call cancelled during its prefill: its session is released.
    const s4 = start({ prompt: tokens(randomTokens(1500)), maxTokens: 5, prefillProgressMinTokens: 1 });
    const e4 = await collect(s4, (e, kind) => {
      if (kind === "progress" && e.progress === 2) s4.cancel();
    }).then(
      () => undefined,
      (err: ServiceError) => err,
    );
    expect(e4?.code).toBe(status.CANCELLED);
    const t1 = Date.now();
    let extra: string[] = [];
    do {
      extra = [...(await kvSessions())].filter((s) => !before.has(s));
      if (extra.length) await new Promise((r) => setTimeout(r, 50));
    } while (extra.length && Date.now() - t1 < 5000);
    expect(extra).toEqual([]);
    expect(metricValue(await fetchMetrics(tiers.compute.metricsPort), "freekv_compute_sessions")).toBe(0);
  });
});
