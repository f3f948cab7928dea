/**
 * How much of a decode step is TypeScript and gRPC, at batch 16 (issue 5, benchmark item 4;
 * target: at most 2% of a step).
 *
 * Both tiers run as real processes (tools/dev/launch.ts), and two request paths are measured:
 *
 * 1. Generate: 16 concurrent Generate streams with the served model (the built-in one unless
 *    FREEKV_MODEL says otherwise). Every chunk carries the duration of the native Model.decode
 *    call of the batch that produced it (`step_ms`, timed by the ModelScheduler around the
 *    call) and that batch's size. Per decode step the client sees one chunk per stream; the time
 *    between two chunks of a stream is the whole step as the service delivers it, and that minus
 *    the native call is what TypeScript and gRPC add to the step. The same 16 generations are also
 *    run in this process (same model, engine, retrieval defaults, prompts, greedy sampling: the
 *    same tokens, checked) through the same generate() / ModelScheduler code without gRPC, which
 *    splits the addition into (b) TypeScript in the compute process (scheduler, sampling, stop
 *    matching, detokenizing) and (c) the gRPC path (chunk serialisation, HTTP/2, the client,
 *    and the page commits to the kvstore that Generate triggers).
 *
 * 2. Per-layer Attention: 16 attention sessions (Llama-3.1-8B head shape: 32 query heads, 8 KV
 *    heads, head dim 128) decoded as one AttentionDecode message of 16 items per layer on one
 *    stream. The round trip of each message is timed at the client; the native engine.decode
 *    call with identical inputs (same sessions, prefill and decode data, same retrieval) is
 *    timed in this process against its own segments, so round trip minus that is TypeScript and
 *    gRPC. The service's own histograms (handler time, engine call time) give the split between
 *    (b) TypeScript in the handler (validation, tensor decoding, the batching window) and (c)
 *    transport (protobuf encoding at both ends, HTTP/2, the client). Beside it, the transport's
 *    own floor: grpc-js alone echoing messages of the same sizes (no protobuf, no engine). The
 *    same messages also run with the tensors in the stream's shared-memory exchange (q/k/v
 *    copied into the mapping by the client inside the timed round trip, outputs written there
 *    by the service, only offsets in the messages): the "shm" rows.
 *
 * The TypeScript and gRPC time does not depend on the backend, the native time does: beside the
 * CPU shares measured here, the same absolute overhead is set against the GPU step times
 * measured on the H200 (bench/results/gpu-*.json), labelled as a projection. For Generate the
 * projection adds the sampling cost at the Llama-3 vocabulary (128256, timed here with the
 * service's Sampler), because the built-in model's vocabulary is tiny, and also shows the step
 * without sampling in TypeScript; for the Attention path it scales the per-layer overhead to the
 * 32 layers of the GPU model. FREEKV_BACKEND=cuda in the environment runs the services on the GPU
 * (with FREEKV_MODEL for a model of real size; the in-process Generate reference follows both).
 *
 * Medians over many steps, and the load average before and after, because the machine may be
 * busy with other work.
 *
 *   npm run build:ts && npm run bench:overhead [-- --gen-tokens 200 --att-steps 40 --att-layers 4
 *                                              --att-context 512 --wire f32,bf16
 *                                              --windows 200,0 --transports bytes,shm]
 *
 * Writes bench/results/overhead-<date>.json (machine, git commit, date, node version, results).
 */
import { execSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import { Client, credentials, Metadata, Server, ServerCredentials, type ServerDuplexStream, type ServiceDefinition, type ServiceError } from "@grpc/grpc-js";
import { AttentionStream } from "../tools/client/attention-stream.js";
import { loadAddon, type Engine, type ShmSegment } from "../native/binding.js";
import { DType, GroupCombine, RecallMode, RetrievalMode, SummaryKind, type RetrievalConfig, type Tensor } from "../proto/gen/freekv/v1/common.js";
import {
  AttentionRequest,
  AttentionResponse,
  ComputeServiceClient,
  CreateSessionRequest,
  GenerateRequest,
  GenerateResponse,
  SessionKind,
  type CreateSessionResponse,
  type TensorRef,
} from "../proto/gen/freekv/v1/compute.js";
import { resolveRetrieval, toNativeRetrieval } from "../services/common/retrieval.js";
import { readTensor, writeTensor } from "../services/compute/attention/tensor.js";
import { generate, isProgress } from "../services/compute/generate/generation.js";
import { argmaxJs, Sampler } from "../services/compute/generate/sampling.js";
import { ModelScheduler } from "../services/compute/generate/scheduler.js";
import { StopMatcher } from "../services/compute/generate/stop.js";
import { parseConfig } from "../services/common/config.js";
import { computeConfigSchema } from "../services/compute/config.js";
import { defaultModelDir, loadModelAsync, type LoadedModel } from "../services/compute/model/loader.js";
import { createLocalSession, modelGeometry, type LocalSession } from "../services/compute/model/localHost.js";
import { startTiers, type Tiers } from "../tools/dev/launch.js";
import { gaussianF32 as gaussianOf, mulberry32 } from "../tools/reference/prng.js";

const here = dirname(fileURLToPath(import.meta.url));
const repo = here.split(/[\\/]/).includes("dist") ? join(here, "..", "..") : join(here, "..");

// ---------------------------------------------------------------------------------------------
// Small helpers

const prng = mulberry32;

/** n gaussian float32 values from a seed: the same seed gives the same array. */
const gaussianF32 = (n: number, seed: number, scale = 1): Float32Array => gaussianOf(n, prng(seed), scale);

const seedOf = (...xs: number[]) => xs.reduce((h, x) => Math.imul(h ^ (x + 0x9e3779b9), 0x85ebca6b) >>> 0, 0x12345678);

/** The compute service's configuration of this environment (the services this program starts read the same). */
function serviceConfig() {
  return parseConfig(computeConfigSchema);
}

function quantile(xs: number[], q: number): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const i = (s.length - 1) * q;
  const lo = Math.floor(i);
  return s[lo] + (s[Math.min(lo + 1, s.length - 1)] - s[lo]) * (i - lo);
}
const median = (xs: number[]) => quantile(xs, 0.5);
const r3 = (x: number) => Math.round(x * 1000) / 1000;

function f32Tensor(data: Float32Array, shape: number[], wire: "f32" | "bf16"): Tensor {
  // writeTensor is the service's own encoder; the client of a disaggregated engine does the same.
  return writeTensor(data, shape, wire === "bf16" ? DType.D_TYPE_BFLOAT16 : DType.D_TYPE_FLOAT32);
}

async function scrape(port: number): Promise<string> {
  const r = await fetch(`http://127.0.0.1:${port}/metrics`);
  if (!r.ok) throw new Error(`/metrics: HTTP ${r.status}`);
  return r.text();
}

/** Sum of the values of `name` lines whose labels contain `labels`. */
function metric(text: string, name: string, labels = ""): number {
  let total = 0;
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const sp = line.lastIndexOf(" ");
    const key = line.slice(0, sp);
    if (key.replace(/\{.*\}$/, "") !== name) continue;
    if (labels && !key.includes(labels)) continue;
    total += Number(line.slice(sp + 1));
  }
  return total;
}

function unary<Res>(client: ComputeServiceClient, method: "createSession" | "closeSession", req: unknown): Promise<Res> {
  return new Promise((resolve, reject) => {
    const fn = (client as unknown as Record<string, (...a: unknown[]) => unknown>)[method];
    fn.call(client, req, new Metadata(), { deadline: Date.now() + 60_000 }, (err: ServiceError | null, res: Res) => (err ? reject(err) : resolve(res)));
  });
}

function machine() {
  const cpus = os.cpus();
  return {
    hostname: os.hostname(),
    cpu: cpus[0]?.model ?? "unknown",
    cores: cpus.length,
    memory_GiB: r3(os.totalmem() / 2 ** 30),
    platform: `${os.platform()} ${os.release()}`,
    node: process.version,
  };
}

function gitCommit(): string {
  // A copy of the tree without .git (another machine) is told its commit by the caller (--commit).
  if (opt.commit) return opt.commit;
  try {
    const head = execSync("git rev-parse --short=12 HEAD", { cwd: repo }).toString().trim();
    const dirty = execSync("git status --porcelain --untracked-files=no", { cwd: repo }).toString().trim();
    return dirty ? `${head}+local-changes` : head;
  } catch {
    return "unknown";
  }
}

// ---------------------------------------------------------------------------------------------
// Options

const { values: opt } = parseArgs({
  options: {
    batch: { type: "string", default: "16" },
    "gen-tokens": { type: "string", default: "200" },
    "gen-prompt": { type: "string", default: "48" },
    "att-steps": { type: "string", default: "40" },
    "att-layers": { type: "string", default: "4" },
    "att-context": { type: "string", default: "512" },
    wire: { type: "string", default: "f32,bf16" },
    /** HTTP/2 flow-control window of the bench's client channel (0: grpc-js default, 64 KiB). */
    "client-window": { type: "string", default: "0" },
    windows: { type: "string", default: "200,0" },
    /** How the Attention path's tensors travel: in the messages (bytes) or the stream's shared-memory exchange (shm). */
    transports: { type: "string", default: "bytes,shm" },
    "gpu-results": { type: "string" },
    "gpu-layers": { type: "string", default: "32" },
    "gpu-vocab": { type: "string", default: "128256" },
    skip: { type: "string", default: "" },
    out: { type: "string" },
    /** The commit to record, where the tree has no .git (the GPU machine's copy). */
    commit: { type: "string" },
  },
});
const B = Number(opt.batch);
const GEN_TOKENS = Number(opt["gen-tokens"]);
const GEN_PROMPT = Number(opt["gen-prompt"]);
const ATT_STEPS = Number(opt["att-steps"]);
const ATT_LAYERS = Number(opt["att-layers"]);
const ATT_CONTEXT = Number(opt["att-context"]);
type Wire = "f32" | "bf16";
const WIRES = opt.wire!.split(",").filter(Boolean) as Wire[];
const CLIENT_WINDOW = Number(opt["client-window"]);
const WINDOWS = opt.windows!.split(",").filter(Boolean).map(Number);
type Transport = "bytes" | "shm";
const TRANSPORTS = opt.transports!.split(",").filter(Boolean) as Transport[];
const GPU_LAYERS = Number(opt["gpu-layers"]);
const GPU_VOCAB = Number(opt["gpu-vocab"]);
const SKIP = new Set(opt.skip!.split(",").filter(Boolean));
for (const [k, v] of Object.entries({ batch: B, "gen-tokens": GEN_TOKENS, "gen-prompt": GEN_PROMPT, "att-steps": ATT_STEPS, "att-layers": ATT_LAYERS, "att-context": ATT_CONTEXT, "gpu-layers": GPU_LAYERS, "gpu-vocab": GPU_VOCAB })) {
  if (!Number.isInteger(v) || v < 1) {
    console.error(`--${k} must be an integer >= 1, got ${v}`);
    process.exit(2);
  }
}
if (!WIRES.length || WIRES.some((w) => w !== "f32" && w !== "bf16")) {
  console.error(`--wire must be f32, bf16 or both (comma-separated), got ${opt.wire}`);
  process.exit(2);
}
if (!TRANSPORTS.length || TRANSPORTS.some((t) => t !== "bytes" && t !== "shm")) {
  console.error(`--transports must be bytes, shm or both (comma-separated), got ${opt.transports}`);
  process.exit(2);
}
if (!Number.isInteger(CLIENT_WINDOW) || CLIENT_WINDOW < 0) {
  console.error(`--client-window must be an integer >= 0 (bytes), got ${opt["client-window"]}`);
  process.exit(2);
}
if (WINDOWS.some((w) => !Number.isInteger(w) || w < 0)) {
  console.error(`--windows must be integers >= 0 (microseconds), got ${opt.windows}`);
  process.exit(2);
}
/** Steps at the start of each timed run left out of the medians (first calls, page faults). */
const WARM = 5;
const QUIET = { FREEKV_LOG_LEVEL: "warn", FREEKV_SHUTDOWN_GRACE_MS: "3000" };

// ---------------------------------------------------------------------------------------------
// Generate path

interface StreamTrace {
  prompt: number[];
  tokens: number[];
  /** Arrival time (ms, performance.now) of each chunk with a token, its step_ms and batch_size. */
  at: number[];
  stepMs: number[];
  batch: number[];
}

interface Step {
  /** Ordinal of the batch in the run. */
  k: number;
  /** Time from the previous step's first chunk to this step's first chunk, at the client. */
  periodMs: number;
  /** The native Model.decode call of this step, as the scheduler timed it. */
  nativeMs: number;
  /** The context after this step filled a page: the service commits pages to the kvstore. */
  commits: boolean;
}

/**
 * Decode steps at full batch. The chunks of one batch carry the same step_ms (the scheduler
 * times the batch once), so step_ms names the batch (streams need not be at the same chunk
 * index: their prompts are prefilled one after another). A step counts when all B streams got
 * their chunk from it and from the batch before. Its time at the client is taken from the first
 * chunk of each batch to arrive, which is least disturbed by the client's own work on the others.
 */
function stepsOf(traces: StreamTrace[], pageSize: number): Step[] {
  const groups = new Map<string, { first: number; nativeMs: number; ks: Map<number, number> }>();
  traces.forEach((t, stream) => {
    for (let k = 1; k < t.at.length; k++) {
      if (t.batch[k] !== B) continue;
      const key = String(t.stepMs[k]);
      const g = groups.get(key) ?? { first: Infinity, nativeMs: t.stepMs[k], ks: new Map<number, number>() };
      g.first = Math.min(g.first, t.at[k]);
      g.ks.set(stream, k);
      groups.set(key, g);
    }
  });
  const ordered = [...groups.values()].sort((x, y) => x.first - y.first);
  const steps: Step[] = [];
  for (let j = 1 + WARM; j < ordered.length; j++) {
    const a = ordered[j - 1];
    const b = ordered[j];
    if (a.ks.size !== B || b.ks.size !== B) continue;
    if ([...b.ks].some(([stream, k]) => a.ks.get(stream) !== k - 1)) continue;
    const commits = [...b.ks.values()].some((k) => (GEN_PROMPT + k) % pageSize === 0);
    steps.push({ k: j, periodMs: b.first - a.first, nativeMs: b.nativeMs, commits });
  }
  return steps;
}

/**
 * Overhead per step: the median over steps away from page commits (robust to the machine's
 * other load), plus the commits' cost spread over all steps (their excess over that median in
 * the steps that commit and the two after, where the kvstore's replies are handled).
 */
function overheadOf(steps: Step[]) {
  const near = (s: Step) => steps.some((c) => c.commits && s.k >= c.k && s.k <= c.k + 2);
  const plain = steps.filter((s) => !near(s)).map((s) => s.periodMs - s.nativeMs);
  const base = median(plain);
  const excess = steps.filter(near).reduce((a, s) => a + (s.periodMs - s.nativeMs - base), 0);
  const commitsPerStep = steps.length ? excess / steps.length : 0;
  return { base, commitsPerStep, total: base + commitsPerStep, plain };
}

function promptFor(seed: number, vocab: number): number[] {
  const r = prng(seed);
  // Below the built-in model's special ids (507..511): plain byte-level tokens.
  const top = Math.min(vocab, 500);
  return Array.from({ length: GEN_PROMPT }, () => Math.floor(r() * top));
}

async function runLocal(loaded: LoadedModel, engine: Engine, prompts: number[][], maxTokens: number): Promise<{ traces: StreamTrace[]; finish: string[] }> {
  const native = loaded.spec.native;
  const retrieval = toNativeRetrieval(resolveRetrieval(undefined, native.layers));
  const maxContext = 32768; // FREEKV_MAX_CONTEXT_TOKENS default: the service's model sessions
  const scheduler = new ModelScheduler(loaded.model, { maxBatch: 64 });
  const stopIds = loaded.spec.eosTokenIds.filter((t) => t < loaded.model.vocabSize);
  const sessions: LocalSession[] = prompts.map(() => createLocalSession(engine, modelGeometry(native, engine.backend === "cuda" ? DType.D_TYPE_BFLOAT16 : DType.D_TYPE_FLOAT32), retrieval, maxContext));
  try {
    const runs = prompts.map(async (prompt, i) => {
      const trace: StreamTrace = { prompt, tokens: [], at: [], stepMs: [], batch: [] };
      const it = generate(loaded.model, scheduler, loaded.codec, { session: sessions[i].session, contextTokens: 0, maxContextTokens: maxContext }, {
        prompt,
        maxTokens,
        sampling: { temperature: 0, topP: 0, topK: 0, seed: 0n },
        stopTokenIds: stopIds,
        stopStrings: [],
      });
      for (;;) {
        const r = await it.next();
        if (r.done) return { trace, finish: r.value.finishReason as string };
        if (isProgress(r.value) || !r.value.tokenIds.length) continue;
        trace.at.push(performance.now());
        trace.tokens.push(...r.value.tokenIds);
        trace.stepMs.push(r.value.stepMs);
        trace.batch.push(r.value.batchSize);
      }
    });
    const done = await Promise.all(runs);
    return { traces: done.map((d) => d.trace), finish: done.map((d) => d.finish) };
  } finally {
    for (const s of sessions) await s.close();
  }
}

async function runService(tiers: Tiers, prompts: number[][], maxTokens: number) {
  const client = new ComputeServiceClient(tiers.compute.address, credentials.createInsecure());
  const one = (prompt: number[], n: number): Promise<StreamTrace> =>
    new Promise((resolve, reject) => {
      const trace: StreamTrace = { prompt, tokens: [], at: [], stepMs: [], batch: [] };
      const call = client.generate(GenerateRequest.fromPartial({ prompt: { $case: "tokens", value: { ids: prompt } }, maxTokens: n, sampling: { temperature: 0 } }), {
        deadline: Date.now() + 600_000,
      });
      call.on("data", (m: GenerateResponse) => {
        if (m.event?.$case !== "chunk" || !m.event.value.tokenIds.length) return;
        trace.at.push(performance.now());
        trace.tokens.push(...m.event.value.tokenIds);
        trace.stepMs.push(m.event.value.stepMs);
        trace.batch.push(m.event.value.batchSize);
      });
      call.on("error", reject);
      call.on("end", () => resolve(trace));
    });
  await one(prompts[0], 4); // warm-up: model pages, first session, connection
  const before = await scrape(tiers.compute.metricsPort);
  const t0 = performance.now();
  const traces = await Promise.all(prompts.map((p) => one(p, maxTokens)));
  const wallMs = performance.now() - t0;
  const after = await scrape(tiers.compute.metricsPort);
  client.close();
  const d = (name: string) => metric(after, name) - metric(before, name);
  return {
    traces,
    wallMs,
    metrics: {
      native_calls: d("freekv_compute_model_step_seconds_count"),
      native_mean_ms: (1000 * d("freekv_compute_model_step_seconds_sum")) / d("freekv_compute_model_step_seconds_count"),
      mean_batch: d("freekv_compute_decode_batch_size_sum") / d("freekv_compute_decode_batch_size_count"),
    },
  };
}

/**
 * Sampling for B sessions at vocabulary V, as the service does it per step (the service's
 * Sampler): wall time and this process's CPU time (the CPU time is what the work costs; wall
 * time also holds waits for a core on a busy machine).
 */
function timeSampling(vocab: number, reps: number) {
  const logits = gaussianF32(B * vocab, seedOf(7, vocab), 3);
  const greedy = new Sampler({ temperature: 0, topP: 0, topK: 0, seed: 1n });
  const nucleus = new Sampler({ temperature: 0.7, topP: 0.9, topK: 0, seed: 1n });
  const time = (s: Sampler) => {
    const wall: number[] = [];
    const cpu: number[] = [];
    let sink = 0;
    for (let r = 0; r < reps; r++) {
      const c0 = process.cpuUsage();
      const t0 = performance.now();
      for (let b = 0; b < B; b++) sink += s.sample(logits, b * vocab, vocab);
      wall.push(performance.now() - t0);
      const c = process.cpuUsage(c0);
      cpu.push((c.user + c.system) / 1000);
    }
    if (sink < 0) console.log(sink);
    return { wall_ms: r3(median(wall.slice(1))), cpu_ms: r3(median(cpu.slice(1))) };
  };
  // The service's JavaScript argmax (argmaxJs: its fallback where the addon's argmaxF32 is
  // absent) beside the greedy path, to show how much of the greedy time is the loop's form
  // rather than the bytes it reads.
  const plain = { sample: (l: Float32Array, offset: number, n: number) => argmaxJs(l, offset, n) } as unknown as Sampler;
  return { vocab, greedy: time(greedy), top_p_0_9_temperature_0_7: time(nucleus), reference_argmax_local_best: time(plain) };
}

/** Chunk encoding and stop matching / detokenizing for B streams (the built-in tokenizer). */
function timeChunkPieces(loaded: LoadedModel, reps: number) {
  const enc: number[] = [];
  const stop: number[] = [];
  const r = prng(99);
  const matchers = Array.from({ length: B }, () => new StopMatcher(new Set([508, 511]), [], loaded.codec ? (ids) => loaded.codec!.decode(ids) : undefined));
  const ids: number[][] = Array.from({ length: B }, () => []);
  for (let k = 0; k < reps; k++) {
    for (const x of ids) x.push(Math.floor(r() * 500));
    let t0 = performance.now();
    const texts = matchers.map((m, b) => m.push(ids[b]).text);
    stop.push(performance.now() - t0);
    t0 = performance.now();
    let bytes = 0;
    for (let b = 0; b < B; b++) bytes += GenerateResponse.encode({ event: { $case: "chunk", value: { tokenIds: [ids[b][k]], text: texts[b], stepMs: 1.5, batchSize: B } } }).finish().length;
    enc.push(performance.now() - t0);
    if (bytes < 0) console.log(bytes);
  }
  return { stop_and_detokenize_ms_per_step: r3(median(stop.slice(WARM))), chunk_encode_ms_per_step: r3(median(enc.slice(WARM))) };
}

// ---------------------------------------------------------------------------------------------
// Attention path

const QH = 32;
const KVH = 8;
const HD = 128;
const ATT_RETRIEVAL: RetrievalConfig = {
  pageSize: 32,
  sinkTokens: 64,
  windowTokens: 64,
  selectTokens: 128,
  tau: 0.9,
  tauSet: true,
  summary: SummaryKind.SUMMARY_KIND_MAX_MIN,
  combine: GroupCombine.GROUP_COMBINE_SOFTMAX_MEAN,
  mode: RetrievalMode.RETRIEVAL_MODE_FREEKV,
  recall: RecallMode.RECALL_MODE_GATHER,
  denseLayers: [],
};
const PREFILL_CHUNK = 256;

const prefillKV = (session: number, layer: number, part: number, n: number, which: 0 | 1) => gaussianF32(n * KVH * HD, seedOf(1, session, layer, part, which));
const decodeIn = (step: number, layer: number, session: number, which: 0 | 1 | 2) => gaussianF32((which === 0 ? QH : KVH) * HD, seedOf(2, step, layer, session, which));

/**
 * The client's side of the stream's tensor exchange: q/k/v bytes are copied into the mapping
 * (inside the timed round trip: it replaces the client's protobuf encoding of the tensors) and
 * the outputs are read where the service wrote them.
 */
class BenchExchange {
  readonly bytes: Uint8Array;
  private next = 0;
  constructor(readonly seg: ShmSegment) {
    this.bytes = new Uint8Array(seg.buffer());
  }
  reset(): void {
    this.next = 0;
  }
  alloc(n: number): number {
    const off = this.next;
    this.next += Math.ceil(n / 16) * 16;
    if (this.next > this.seg.size) throw new Error("exchange too small for one message");
    return off;
  }
  put(t: Tensor): TensorRef {
    const offset = this.alloc(t.data.length);
    this.bytes.set(t.data, offset);
    return { offset, dtype: t.dtype, shape: t.shape };
  }
}

async function runAttentionService(tiers: Tiers, WIRE: Wire, TRANSPORT: Transport = "bytes") {
  const client = new ComputeServiceClient(tiers.compute.address, credentials.createInsecure(), {
    "grpc.max_receive_message_length": 64 << 20,
    "grpc.max_send_message_length": 64 << 20,
    ...(CLIENT_WINDOW ? { "grpc-node.flow_control_window": CLIENT_WINDOW } : {}),
  });
  const ids: string[] = [];
  for (let s = 0; s < B; s++) {
    const res = await unary<CreateSessionResponse>(
      client,
      "createSession",
      CreateSessionRequest.fromPartial({
        sessionId: `overhead-${process.pid}-${s}`,
        kind: SessionKind.SESSION_KIND_ATTENTION,
        geometry: { layers: ATT_LAYERS, queryHeads: QH, kvHeads: KVH, headDim: HD, kvDtype: DType.D_TYPE_BFLOAT16 },
        retrieval: ATT_RETRIEVAL,
        maxContextTokens: ATT_CONTEXT + ATT_STEPS + 64,
      }),
    );
    ids.push(res.session!.sessionId);
  }
  const stream = new AttentionStream(client);
  for (let s = 0; s < B; s++)
    for (let l = 0; l < ATT_LAYERS; l++)
      for (let p = 0, part = 0; p < ATT_CONTEXT; p += PREFILL_CHUNK, part++) {
        const n = Math.min(PREFILL_CHUNK, ATT_CONTEXT - p);
        await stream.send({
          op: { $case: "prefill", value: { sessionId: ids[s], layer: l, k: f32Tensor(prefillKV(s, l, part, n, 0), [n, KVH, HD], "f32"), v: f32Tensor(prefillKV(s, l, part, n, 1), [n, KVH, HD], "f32") } },
        });
      }
  let exchange: BenchExchange | undefined;
  if (TRANSPORT === "shm") {
    const r = await stream.send({ op: { $case: "openExchange", value: { sizeBytes: 4 << 20 } } });
    if (r.result?.$case !== "exchange") throw new Error("open_exchange: no exchange result");
    exchange = new BenchExchange(loadAddon().ShmSegment.open(r.result.value.segmentName));
  }
  const rtt: number[][] = [];
  /** Per timed message, from the service's histograms scraped around it: engine call, handler. */
  const engineMs: number[] = [];
  const handlerMs: number[] = [];
  const batchSizes: number[] = [];
  const counters = (t: string) => ({
    engine: metric(t, "freekv_compute_decode_layer_seconds_sum"),
    handler: metric(t, "freekv_compute_attention_seconds_sum", 'op="decode"'),
    batch: metric(t, "freekv_compute_decode_batch_size_sum"),
  });
  let before = "";
  let requestBytes = 0;
  let responseBytes = 0;
  const outputs: Float32Array[] = [];
  for (let step = 0; step < ATT_STEPS; step++) {
    if (step === WARM) before = await scrape(tiers.compute.metricsPort);
    const row: number[] = [];
    for (let l = 0; l < ATT_LAYERS; l++) {
      // Inputs are made before the clock starts: the model that produces them is not ours.
      const items = ids.map((sessionId, s) => ({
        sessionId,
        q: f32Tensor(decodeIn(step, l, s, 0), [QH, HD], WIRE),
        k: f32Tensor(decodeIn(step, l, s, 1), [KVH, HD], WIRE),
        v: f32Tensor(decodeIn(step, l, s, 2), [KVH, HD], WIRE),
      }));
      // Scraping between messages keeps /metrics work out of the timed round trips.
      const c0 = step >= WARM ? counters(await scrape(tiers.compute.metricsPort)) : undefined;
      const t0 = performance.now();
      let res: AttentionResponse;
      if (exchange) {
        exchange.reset();
        const refs = items.map((it) => ({ sessionId: it.sessionId, qRef: exchange.put(it.q), kRef: exchange.put(it.k), vRef: exchange.put(it.v), outputOffset: exchange.alloc(it.q.data.length) }));
        res = await stream.send({ op: { $case: "decode", value: { layer: l, items: refs } } });
      } else res = await stream.send({ op: { $case: "decode", value: { layer: l, items } } });
      row.push(performance.now() - t0);
      if (c0) {
        const c1 = counters(await scrape(tiers.compute.metricsPort));
        engineMs.push(1000 * (c1.engine - c0.engine));
        handlerMs.push(1000 * (c1.handler - c0.handler));
        batchSizes.push(c1.batch - c0.batch);
      }
      if (res.result?.$case !== "decode") throw new Error(`decode of layer ${l} at step ${step}: no decode result`);
      if (step === ATT_STEPS - 1 && l === ATT_LAYERS - 1) {
        responseBytes = AttentionResponse.encode(res).finish().length;
        if (exchange) {
          exchange.reset();
          const refs = items.map((it) => ({ sessionId: it.sessionId, qRef: exchange.put(it.q), kRef: exchange.put(it.k), vRef: exchange.put(it.v), outputOffset: exchange.alloc(it.q.data.length) }));
          requestBytes = AttentionRequest.encode(AttentionRequest.fromPartial({ requestId: 1, op: { $case: "decode", value: { layer: l, items: refs } } })).finish().length;
          items.forEach((it, i) => {
            const off = res.result?.$case === "decode" ? res.result.value.outputOffsets[i] : 0;
            const t: Tensor = { dtype: it.q.dtype, shape: [QH, HD], data: Buffer.from(exchange.bytes.slice(off, off + it.q.data.length)) };
            outputs.push(readTensor(t, "output", [QH, HD]).data);
          });
        } else {
          requestBytes = AttentionRequest.encode(AttentionRequest.fromPartial({ requestId: 1, op: { $case: "decode", value: { layer: l, items } } })).finish().length;
          for (const o of res.result.value.outputs) outputs.push(readTensor(o, "output", [QH, HD]).data);
        }
      }
    }
    rtt.push(row);
  }
  const after = await scrape(tiers.compute.metricsPort);
  exchange?.seg.close();
  void stream.close();
  for (const id of ids) await unary(client, "closeSession", { sessionId: id }).catch(() => undefined);
  client.close();
  const d = (name: string, labels = "") => metric(after, name, labels) - metric(before, name, labels);
  const requests = d("freekv_compute_attention_seconds_count", 'op="decode"');
  return {
    rtt,
    engineMs,
    handlerMs,
    batchSizes,
    requestBytes,
    responseBytes,
    outputs,
    metrics: {
      requests,
      handler_mean_ms: (1000 * d("freekv_compute_attention_seconds_sum", 'op="decode"')) / requests,
      engine_calls: d("freekv_compute_decode_layer_seconds_count"),
      engine_mean_ms: (1000 * d("freekv_compute_decode_layer_seconds_sum")) / d("freekv_compute_decode_layer_seconds_count"),
      mean_batch: d("freekv_compute_decode_batch_size_sum") / d("freekv_compute_decode_batch_size_count"),
    },
  };
}

/** The same sessions, prefill and decode inputs through an engine of this process. */
async function runAttentionNative(engine: Engine, WIRE: Wire) {
  const addon = loadAddon();
  const { createHostSegments } = await import("../tools/fidelity/host-segments.js");
  const geometry = { layers: ATT_LAYERS, qHeads: QH, kvHeads: KVH, headDim: HD, kvDtype: DType.D_TYPE_BFLOAT16 };
  const retrieval = toNativeRetrieval(resolveRetrieval(ATT_RETRIEVAL, ATT_LAYERS));
  const capacity = Math.ceil((ATT_CONTEXT + ATT_STEPS + 64) / retrieval.pageSize) + 1;
  const segs = Array.from({ length: B }, () => createHostSegments(addon, geometry, retrieval, capacity, "overhead"));
  const sessions = segs.map((s) => engine.createSession(geometry, retrieval, s.host, false));
  try {
    for (let s = 0; s < B; s++)
      for (let l = 0; l < ATT_LAYERS; l++)
        for (let p = 0, part = 0; p < ATT_CONTEXT; p += PREFILL_CHUNK, part++) {
          const n = Math.min(PREFILL_CHUNK, ATT_CONTEXT - p);
          await engine.prefill(sessions[s], l, prefillKV(s, l, part, n, 0), prefillKV(s, l, part, n, 1), n);
        }
    const ms: number[][] = [];
    // Per item, the service gets q, k, v through readTensor (bf16 wire: rounded); so do we.
    const asWire = (x: Float32Array, shape: number[]) => readTensor(f32Tensor(x, shape, WIRE), "x", shape).data;
    let last: Float32Array[] = [];
    for (let step = 0; step < ATT_STEPS; step++) {
      const row: number[] = [];
      for (let l = 0; l < ATT_LAYERS; l++) {
        const items = sessions.map((session, s) => ({
          session,
          q: asWire(decodeIn(step, l, s, 0), [QH, HD]),
          k: asWire(decodeIn(step, l, s, 1), [KVH, HD]),
          v: asWire(decodeIn(step, l, s, 2), [KVH, HD]),
        }));
        const t0 = performance.now();
        last = await engine.decode(l, items);
        row.push(performance.now() - t0);
      }
      ms.push(row);
    }
    return { ms, outputs: last };
  } finally {
    for (const s of sessions) engine.closeSession(s);
    for (const s of segs) s.release();
  }
}

/** Encoded sizes of one 16-item decode message and of its answer. */
function attentionMessageBytes(WIRE: Wire): { request: number; response: number } {
  const items = Array.from({ length: B }, (_, s) => ({
    sessionId: `overhead-${process.pid}-${s}`,
    q: f32Tensor(decodeIn(0, 0, s, 0), [QH, HD], WIRE),
    k: f32Tensor(decodeIn(0, 0, s, 1), [KVH, HD], WIRE),
    v: f32Tensor(decodeIn(0, 0, s, 2), [KVH, HD], WIRE),
  }));
  const request = AttentionRequest.encode(AttentionRequest.fromPartial({ requestId: 1, op: { $case: "decode", value: { layer: 0, items } } })).finish().length;
  const outputs = items.map((it) => it.q);
  const response = AttentionResponse.encode({ requestId: 1, result: { $case: "decode", value: { outputs, outputOffsets: [] } } }).finish().length;
  return { request, response };
}

/** Handler-side TypeScript of one 16-item decode message, timed alone: protobuf and tensors. */
function timeAttentionPieces(reps: number, WIRE: Wire) {
  const dec: number[] = [];
  const read: number[] = [];
  const write: number[] = [];
  const enc: number[] = [];
  for (let k = 0; k < reps; k++) {
    const items = Array.from({ length: B }, (_, s) => ({
      sessionId: `s${s}`,
      q: f32Tensor(decodeIn(k, 0, s, 0), [QH, HD], WIRE),
      k: f32Tensor(decodeIn(k, 0, s, 1), [KVH, HD], WIRE),
      v: f32Tensor(decodeIn(k, 0, s, 2), [KVH, HD], WIRE),
    }));
    const wire = AttentionRequest.encode(AttentionRequest.fromPartial({ requestId: 1, op: { $case: "decode", value: { layer: 0, items } } })).finish();
    let t0 = performance.now();
    const req = AttentionRequest.decode(wire);
    dec.push(performance.now() - t0);
    if (req.op?.$case !== "decode") throw new Error("decode message expected");
    t0 = performance.now();
    const outs = req.op.value.items.map((it) => {
      readTensor(it.k, "k", [KVH, HD]);
      readTensor(it.v, "v", [KVH, HD]);
      return readTensor(it.q, "q", [QH, HD]).data;
    });
    read.push(performance.now() - t0);
    t0 = performance.now();
    const tensors = outs.map((o) => writeTensor(o, [QH, HD], WIRE === "bf16" ? DType.D_TYPE_BFLOAT16 : DType.D_TYPE_FLOAT32));
    write.push(performance.now() - t0);
    t0 = performance.now();
    AttentionResponse.encode({ requestId: 1, result: { $case: "decode", value: { outputs: tensors, outputOffsets: [] } } }).finish();
    enc.push(performance.now() - t0);
  }
  const m = (xs: number[]) => r3(median(xs.slice(2)));
  return { request_decode_ms: m(dec), read_tensors_ms: m(read), write_tensors_ms: m(write), response_encode_ms: m(enc) };
}

// ---------------------------------------------------------------------------------------------
// Transport ceiling: grpc-js alone

const ECHO_PATH = "/freekv.bench.Echo/Echo";
const identity = (b: Buffer) => b;

/**
 * In a worker thread (its own event loop and heap, like a second process): a bidirectional method
 * that answers every message with `responseBytes` bytes. No protobuf, no validation, no engine.
 */
async function echoServer(responseBytes: number, window: number): Promise<void> {
  const server = new Server({ "grpc.max_receive_message_length": 256 << 20, "grpc.max_send_message_length": 256 << 20, ...(window ? { "grpc-node.flow_control_window": window } : {}) });
  const reply = Buffer.alloc(responseBytes, 7);
  const definition = {
    Echo: { path: ECHO_PATH, requestStream: true, responseStream: true, requestSerialize: identity, requestDeserialize: identity, responseSerialize: identity, responseDeserialize: identity, originalName: "Echo" },
  } as unknown as ServiceDefinition;
  server.addService(definition, {
    Echo: (call: ServerDuplexStream<Buffer, Buffer>) => {
      call.on("data", () => call.write(reply));
      call.on("end", () => call.end());
    },
  });
  const port = await new Promise<number>((resolve, reject) => server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))));
  parentPort!.postMessage(port);
}

/**
 * The round trip of a message of the Attention request's size answered with the response's size
 * through grpc-js alone: what the transport costs before any of our code runs. Median of `reps`.
 */
async function echoRoundTrip(requestBytes: number, responseBytes: number, window: number, reps: number): Promise<number> {
  const worker = new Worker(new URL(import.meta.url), { workerData: { echo: true, responseBytes, window }, argv: process.argv.slice(2) });
  try {
    const port = await new Promise<number>((resolve, reject) => {
      worker.once("message", resolve);
      worker.once("error", reject);
    });
    const client = new Client(`127.0.0.1:${port}`, credentials.createInsecure(), {
      "grpc.max_receive_message_length": 256 << 20,
      "grpc.max_send_message_length": 256 << 20,
      ...(window ? { "grpc-node.flow_control_window": window } : {}),
    });
    const call = client.makeBidiStreamRequest<Buffer, Buffer>(ECHO_PATH, identity, identity);
    const request = Buffer.alloc(requestBytes, 3);
    let pending: (() => void) | undefined;
    call.on("data", () => pending?.());
    const times: number[] = [];
    for (let r = 0; r < reps; r++) {
      const t0 = performance.now();
      await new Promise<void>((resolve) => {
        pending = resolve;
        call.write(request);
      });
      times.push(performance.now() - t0);
    }
    await new Promise<void>((resolve) => {
      call.on("error", () => resolve());
      call.on("status", () => resolve());
      call.end();
    });
    client.close();
    return median(times.slice(WARM));
  } finally {
    await worker.terminate();
  }
}

// ---------------------------------------------------------------------------------------------
// GPU step times (for the projection)

function gpuSteps(): { file: string; date: string; rows: Array<{ context: number; mode: string; ms: number }> } | undefined {
  let file = opt["gpu-results"];
  if (!file) {
    const dir = join(repo, "bench", "results");
    const found = existsSync(dir) ? readdirSync(dir).filter((f) => /^gpu-.*\.json$/.test(f)).sort() : [];
    if (!found.length) return undefined;
    file = join(dir, found[found.length - 1]);
  }
  const j = JSON.parse(readFileSync(file, "utf8")) as { date_utc?: string; step?: { cases?: Array<{ context: number; batch: number; mode: string; ms?: number }> } };
  const rows = (j.step?.cases ?? [])
    .filter((c) => c.batch === B && typeof c.ms === "number" && ["sparse", "freekv_gather", "dense"].includes(c.mode))
    .map((c) => ({ context: c.context, mode: c.mode, ms: c.ms! }));
  return { file: file.replace(repo + "/", ""), date: j.date_utc ?? "", rows };
}

// ---------------------------------------------------------------------------------------------

async function main(): Promise<number> {
  const started = new Date();
  const load = [os.loadavg()];
  const addon = loadAddon();
  console.log(`machine: ${os.cpus()[0]?.model} x${os.cpus().length}, load average ${os.loadavg().map((x) => x.toFixed(2)).join(" ")}`);
  const result: Record<string, unknown> = {
    benchmark: "TypeScript + gRPC share of a decode step (bench/overhead.ts)",
    git_commit: gitCommit(),
    date_utc: started.toISOString(),
    machine: machine(),
    // The services inherit this process's environment: FREEKV_BACKEND=cuda runs them on the GPU
    // The in-process Generate reference uses the same backend and FREEKV_MODEL (so that both sides
    // run the same steps); the in-process Attention reference always uses the CPU backend.
    service_backend: serviceConfig().FREEKV_BACKEND,
    model_dir: serviceConfig().FREEKV_MODEL || "built-in",
    options: { batch: B, gen_tokens: GEN_TOKENS, gen_prompt: GEN_PROMPT, att_steps: ATT_STEPS, att_layers: ATT_LAYERS, att_context: ATT_CONTEXT, wires: WIRES, client_flow_control_window: CLIENT_WINDOW || "grpc-js default", windows_us: WINDOWS, transports: TRANSPORTS, warm_steps_left_out: WARM },
  };
  let genProjection: { baseUs: number; commitsUs: number; layers: number; sampling: ReturnType<typeof timeSampling>[] } | undefined;
  const table: Array<{ path: string; what: string; native_us: number; ts_us: number; grpc_us: number; overhead_us: number; step_us: number; share: number }> = [];

  // ---- Generate: in process, then through the services ------------------------------------------
  if (!SKIP.has("generate")) {
    const engine = new addon.Engine({ backend: serviceConfig().FREEKV_BACKEND });
    const loaded = await loadModelAsync(serviceConfig().FREEKV_MODEL || defaultModelDir(), { engine });
    console.log(`Generate reference: ${engine.backend} engine, model layers on ${loaded.model.device}`);
    const V = loaded.model.vocabSize;
    // Prompts whose greedy continuation does not hit an end-of-sequence token within the run, so
    // all 16 streams stay in every batch.
    const prompts: number[][] = [];
    for (let seed = 1; prompts.length < B && seed < 40 * B; seed += B) {
      const cand = Array.from({ length: B }, (_, i) => promptFor(seed + i, V));
      const probe = await runLocal(loaded, engine, cand, GEN_TOKENS);
      probe.finish.forEach((f, i) => f === "length" && prompts.length < B && prompts.push(cand[i]));
    }
    if (prompts.length < B) throw new Error(`found only ${prompts.length} prompts that generate ${GEN_TOKENS} tokens without an end-of-sequence token`);
    console.log(`Generate: ${B} prompts of ${GEN_PROMPT} tokens, ${GEN_TOKENS} greedy tokens each (model ${loaded.dir}, vocab ${V}, ${loaded.spec.native.layers} layers)`);
    const local = await runLocal(loaded, engine, prompts, GEN_TOKENS);
    const pageSize = toNativeRetrieval(resolveRetrieval(undefined, loaded.spec.native.layers)).pageSize;
    const loc = stepsOf(local.traces, pageSize);

    const tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET } });
    let svc: Awaited<ReturnType<typeof runService>>;
    try {
      svc = await runService(tiers, prompts, GEN_TOKENS);
    } finally {
      await tiers.stop();
    }
    const srv = stepsOf(svc.traces, pageSize);
    if (srv.length < 20) throw new Error(`only ${srv.length} Generate steps ran at batch ${B}; cannot measure`);
    const same = svc.traces.every((t, i) => t.tokens.length === local.traces[i].tokens.length && t.tokens.every((x, k) => x === local.traces[i].tokens[k]));

    const so = overheadOf(srv);
    const lo = overheadOf(loc);
    const nativeMs = median(srv.map((x) => x.nativeMs));
    const periodMs = median(srv.map((x) => x.periodMs));
    const tsMs = Math.max(0, lo.base);
    const grpcMs = so.total - tsMs;
    const sampling = [timeSampling(V, 40), timeSampling(GPU_VOCAB, 8)];
    const pieces = timeChunkPieces(loaded, 200);
    const dist = (xs: number[]) => ({ median: r3(median(xs)), p10: r3(quantile(xs, 0.1)), p90: r3(quantile(xs, 0.9)) });
    result.generate = {
      model: loaded.dir.replace(repo + "/", ""),
      vocab: V,
      layers: loaded.spec.native.layers,
      same_tokens_in_process_and_service: same,
      service: {
        steps_counted: srv.length,
        step_period_ms: dist(srv.map((x) => x.periodMs)),
        native_model_decode_ms: dist(srv.map((x) => x.nativeMs)),
        overhead_ms_steps_without_commits: dist(so.plain),
        page_commits_ms_per_step: r3(so.commitsPerStep),
        overhead_ms_per_step: r3(so.total),
        // The mean over all counted steps is the run's wall time less its native time per step
        // (periods add up): immune to when single chunks arrive, but it keeps load spikes.
        overhead_ms_mean_all_steps: r3(srv.reduce((a, x) => a + x.periodMs - x.nativeMs, 0) / srv.length),
        wall_ms: r3(svc.wallMs),
        metrics: { ...svc.metrics, native_mean_ms: r3(svc.metrics.native_mean_ms), mean_batch: r3(svc.metrics.mean_batch) },
      },
      in_process: {
        steps_counted: loc.length,
        step_period_ms: r3(median(loc.map((x) => x.periodMs))),
        native_model_decode_ms: r3(median(loc.map((x) => x.nativeMs))),
        typescript_ms: r3(tsMs),
      },
      typescript_pieces_ms_per_step: { sampling, ...pieces },
      note:
        "per decode step at full batch: overhead = time between the first chunks of consecutive batches at the client minus the native Model.decode of the step (step_ms); median over steps away from page commits, plus the commits' excess spread over all steps; typescript = the same measured in process through generate()/ModelScheduler (no gRPC); grpc = overhead - typescript (chunk serialisation, HTTP/2, the client, page commits to the kvstore)",
    };
    table.push({
      path: "Generate",
      what: `${B} streams, built-in model (${loaded.spec.native.layers} layers, vocab ${V})`,
      native_us: Math.round(nativeMs * 1000),
      ts_us: Math.round(tsMs * 1000),
      grpc_us: Math.round(grpcMs * 1000),
      overhead_us: Math.round(so.total * 1000),
      step_us: Math.round((nativeMs + so.total) * 1000),
      share: so.total / (nativeMs + so.total),
    });
    genProjection = { baseUs: so.base * 1000, commitsUs: so.commitsPerStep * 1000, layers: loaded.spec.native.layers, sampling };
    console.log(
      `  ${srv.length} steps; in process: period ${median(loc.map((x) => x.periodMs)).toFixed(3)} ms, native ${median(loc.map((x) => x.nativeMs)).toFixed(3)} ms; service: period ${periodMs.toFixed(3)} ms, native ${nativeMs.toFixed(3)} ms; tokens identical: ${same}`,
    );
    load.push(os.loadavg());
  }

  // ---- Attention: per layer, 16 sessions in one message -----------------------------------------
  const attRows: Array<{ label: string; overheadPerLayerUs: number }> = [];
  if (!SKIP.has("attention")) {
    const engine = new addon.Engine({ backend: "cpu" });
    const runs: Record<string, unknown>[] = [];
    for (const WIRE of WIRES) {
      const nat = await runAttentionNative(engine, WIRE);
      const nativeAll = nat.ms.slice(WARM).flat();
      const pieces = timeAttentionPieces(30, WIRE);
      const sizes = attentionMessageBytes(WIRE);
      const ceiling = {
        request_bytes: sizes.request,
        response_bytes: sizes.response,
        grpc_js_echo_round_trip_ms: r3(await echoRoundTrip(sizes.request, sizes.response, 0, 60)),
        grpc_js_echo_round_trip_ms_16MiB_flow_control_window: r3(await echoRoundTrip(sizes.request, sizes.response, 16 << 20, 60)),
        small_messages_echo_round_trip_ms: r3(await echoRoundTrip(64, 64, 0, 60)),
      };
      console.log(
        `  transport alone (grpc-js echo, ${sizes.request} B -> ${sizes.response} B): ${ceiling.grpc_js_echo_round_trip_ms} ms; 16 MiB window: ${ceiling.grpc_js_echo_round_trip_ms_16MiB_flow_control_window} ms; 64 B: ${ceiling.small_messages_echo_round_trip_ms} ms`,
      );
      for (const [w, transport] of WINDOWS.flatMap((w) => TRANSPORTS.map((t) => [w, t] as const))) {
        const tiers = await startTiers({ kvstoreEnv: QUIET, computeEnv: { ...QUIET, FREEKV_DECODE_BATCH_WINDOW_US: String(w) } });
        let svc: Awaited<ReturnType<typeof runAttentionService>>;
        try {
          svc = await runAttentionService(tiers, WIRE, transport);
        } finally {
          await tiers.stop();
        }
        const rtt = svc.rtt.slice(WARM).flat();
        const overhead = rtt.map((r, i) => r - svc.engineMs[i]);
        const ts = svc.handlerMs.map((h, i) => h - svc.engineMs[i]);
        const grpc = rtt.map((r, i) => r - svc.handlerMs[i]);
        const full = svc.batchSizes.every((b) => b === B);
        // Same inputs, same engine code: the outputs agree (bf16 KV storage on both sides).
        let maxDiff = 0;
        svc.outputs.forEach((o, s) => o.forEach((x, i) => (maxDiff = Math.max(maxDiff, Math.abs(x - nat.outputs[s][i])))));
        const m = { rtt: median(rtt), engine: median(svc.engineMs), overhead: median(overhead), ts: median(ts), grpc: median(grpc) };
        const dist = (xs: number[]) => ({ median: r3(median(xs)), p10: r3(quantile(xs, 0.1)), p90: r3(quantile(xs, 0.9)) });
        runs.push({
          wire_dtype: WIRE,
          tensor_transport: transport === "shm" ? "shared-memory exchange (offsets in the messages)" : "bytes in the messages",
          batch_window_us: w,
          layer_messages_counted: rtt.length,
          every_engine_call_held_all_sessions: full,
          round_trip_ms: dist(rtt),
          engine_call_ms_service: dist(svc.engineMs),
          overhead_ms: dist(overhead),
          typescript_in_handler_ms: dist(ts),
          grpc_outside_handler_ms: dist(grpc),
          request_bytes: svc.requestBytes,
          response_bytes: svc.responseBytes,
          max_abs_output_difference_vs_in_process: maxDiff,
          engine_call_in_process_same_inputs_ms: { median: r3(median(nativeAll)), p10: r3(quantile(nativeAll, 0.1)), p90: r3(quantile(nativeAll, 0.9)) },
          typescript_pieces_per_message_ms: pieces,
          transport_ceiling: ceiling,
        });
        table.push({
          path: `Attention ${WIRE}${transport === "shm" ? " shm" : ""} (window ${w} us)`,
          what: `${B} sessions in 1 message per layer, ${ATT_LAYERS} layers, ${QH}/${KVH}x${HD}, ${WIRE} tensors ${transport === "shm" ? "through the shared-memory exchange" : "in the messages"}`,
          native_us: Math.round(m.engine * 1000 * ATT_LAYERS),
          ts_us: Math.round(m.ts * 1000 * ATT_LAYERS),
          grpc_us: Math.round(m.grpc * 1000 * ATT_LAYERS),
          overhead_us: Math.round(m.overhead * 1000 * ATT_LAYERS),
          step_us: Math.round(m.rtt * 1000 * ATT_LAYERS),
          share: m.overhead / m.rtt,
        });
        attRows.push({ label: `${WIRE}${transport === "shm" ? " shm" : ""} (window ${w} us)`, overheadPerLayerUs: m.overhead * 1000 });
        console.log(
          `Attention, ${WIRE}, ${transport}, window ${w} us: round trip ${m.rtt.toFixed(3)} ms/layer, engine call ${m.engine.toFixed(3)} ms (in process ${median(nativeAll).toFixed(3)}), TS ${m.ts.toFixed(3)}, gRPC ${m.grpc.toFixed(3)}; outputs max |diff| ${maxDiff.toExponential(2)}`,
        );
        load.push(os.loadavg());
      }
    }
    result.attention = {
      geometry: { layers: ATT_LAYERS, query_heads: QH, kv_heads: KVH, head_dim: HD, kv_dtype: "bf16" },
      retrieval: { page: 32, sink: 64, window: 64, select: 128, mode: "freekv" },
      context_tokens: ATT_CONTEXT,
      runs,
      note:
        "per layer message of 16 items, per message: overhead = client round trip minus the service's engine.decode call (from its histogram, scraped around each message); typescript = handler time minus engine call (validation, tensor decoding, batching window, locks); grpc = round trip minus handler time (protobuf at both ends, HTTP/2, the client, output tensors); medians over messages; the in-process engine call with identical inputs is given as a cross-check",
    };
  }

  // ---- Projection onto the H200 step times --------------------------------------------------------
  const gpu = gpuSteps();
  const projection: Array<Record<string, unknown>> = [];
  if (gpu) {
    for (const g of gpu.rows) {
      if (genProjection) {
        const { baseUs, commitsUs, layers, sampling } = genProjection;
        const [small, large] = sampling;
        for (const kind of ["none", "greedy", "top_p_0_9_temperature_0_7"] as const) {
          // Sampling at the real vocabulary replaces the built-in model's (CPU time: its cost on a
          // dedicated node); "none" is the step without sampling in TypeScript (token ids chosen
          // on the device). The page commits do not scale with the layers: a step that fills a
          // page commits every layer of a session in one CommitPages call.
          void layers;
          const extra = kind === "none" ? -small.greedy.cpu_ms * 1000 : (large[kind].cpu_ms - small[kind].cpu_ms) * 1000;
          const us = baseUs + commitsUs + extra;
          const label = kind === "top_p_0_9_temperature_0_7" ? "top_p" : kind;
          projection.push({ path: "Generate", sampling: label, context: g.context, gpu_mode: g.mode, gpu_step_ms: r3(g.ms), overhead_us: Math.round(us), share: r3(us / (g.ms * 1000 + us)) });
        }
      }
      for (const a of attRows) {
        const us = a.overheadPerLayerUs * GPU_LAYERS;
        projection.push({ path: `Attention ${a.label}`, context: g.context, gpu_mode: g.mode, gpu_step_ms: r3(g.ms), overhead_us: Math.round(us), share: r3(us / (g.ms * 1000 + us)) });
      }
    }
    result.projection = {
      label: "PROJECTION: the TypeScript + gRPC time measured here on the CPU machine, set against GPU step times measured on the H200; not a GPU measurement",
      gpu_results: gpu.file,
      gpu_date: gpu.date,
      assumptions: [
        "the TypeScript + gRPC time per step does not depend on the backend (same processes, same messages); the native time does",
        `Generate: the overhead measured with the built-in model (its page commits as measured: one CommitPages call per session and filled page, whatever the layers) and its sampling replaced by the service's Sampler at vocabulary ${GPU_VOCAB} (CPU time, ${B} sessions)`,
        `Attention: the per-layer overhead (Llama-3.1-8B head shape, batch ${B}) times ${GPU_LAYERS} layers; the share is of the GPU step plus that overhead, since the per-layer path puts every round trip on the critical path`,
        "the overhead was measured on a shared 2-core machine under other load: a dedicated node's cores would give less",
      ],
      rows: projection,
    };
  }
  load.push(os.loadavg());
  result.load_average = load.map((l) => l.map((x) => r3(x)));
  result.table = table.map((t) => ({ ...t, share: r3(t.share) }));

  // ---- Print -----------------------------------------------------------------------------------
  console.log(`\nTypeScript + gRPC per decode step at batch ${B}, this machine, services on the ${serviceConfig().FREEKV_BACKEND} backend (medians; microseconds)`);
  console.log(`${"path".padEnd(32)}   native      TS    gRPC  TS+gRPC     step   share`);
  for (const t of table)
    console.log(
      `${t.path.padEnd(32)} ${String(t.native_us).padStart(8)} ${String(t.ts_us).padStart(7)} ${String(t.grpc_us).padStart(7)} ${String(t.overhead_us).padStart(8)} ${String(t.step_us).padStart(8)} ${(100 * t.share).toFixed(1).padStart(6)}%`,
    );
  if (projection.length) {
    console.log(`\nPROJECTION onto H200 step times (${gpu!.file}), batch ${B}: same TS+gRPC microseconds, GPU native time`);
    console.log(`${"path".padEnd(32)} sampling  context  GPU mode         GPU ms  TS+gRPC us   share`);
    for (const p of projection)
      console.log(
        `${String(p.path).padEnd(32)} ${String(p.sampling ?? "-").padEnd(9)} ${String(p.context).padStart(7)}  ${String(p.gpu_mode).padEnd(14)} ${String(p.gpu_step_ms).padStart(7)} ${String(p.overhead_us).padStart(11)} ${(100 * (p.share as number)).toFixed(1).padStart(6)}%`,
      );
  }
  console.log(`load average: ${load.map((l) => l.map((x) => x.toFixed(2)).join(" ")).join(" | ")}`);

  const out = opt.out ?? join(repo, "bench", "results", `overhead-${started.toISOString().slice(0, 16).replace(/[-:]/g, "").replace("T", "-")}.json`);
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, JSON.stringify(result, null, 2) + "\n");
  console.log(`wrote ${out}`);
  return 0;
}

if (!isMainThread && (workerData as { echo?: boolean } | undefined)?.echo) {
  const w = workerData as { responseBytes: number; window: number };
  void echoServer(w.responseBytes, w.window);
} else {
  main().then(
    (code) => process.exit(code),
    (e: unknown) => {
      console.error((e as Error).stack ?? e);
      process.exit(1);
    },
  );
}
