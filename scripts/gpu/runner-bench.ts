/**
 * The service's own decode step on the GPU: Model.decode with a CUDA engine, i.e. the GPU model
 * runner (native/src/model/cuda/forward_cuda.cu) and the engine's device step, at Llama-3.1-8B shapes.
 *
 * 1. Writes a Hugging Face folder with random bf16 weights (32 layers, hidden 4096, 32 query / 8
 *    KV heads of 128, FFN 14336, vocabulary 128256, Llama-3.1 rope scaling) unless it exists, and
 *    loads it through the same loader and Model.load the compute service uses (bf16 on the device).
 * 2. Per (batch, context, mode): sessions in shared memory (createLocalSession, as the service
 *    makes them), their context filled through engine.prefill with random K/V, then greedy decode
 *    steps through Model.decode; median wall time of a step (the promise included) and the
 *    engine's counters (correction rate, recalled bytes per step).
 * 3. At the largest batch in freekv mode, the same steps driven through the compute service's
 *    ModelScheduler and greedy Sampler (the TypeScript of a Generate step, without gRPC; greedy
 *    batches run through Model.decodeArgmax, as in the service): the time per step outside the
 *    native call is the TypeScript share of the step.
 *
 * Budget: 512 sink + 1024 selected + 512 window tokens, pages of 32 (the issue's defaults).
 *
 * Calibrated workloads ("<mode>@<rho>", e.g. freekv@0.8): with random weights consecutive
 * queries are unrelated (greedy decoding jumps between random embeddings), so FreeKV corrects
 * nearly every KV group. A trained model's queries move more slowly. The folder's embedding
 * therefore ends in CALIBRATION_BANDS bands of BAND_ROWS tokens whose rows share a common
 * direction: two tokens of the band with correlation rho have embeddings of cosine ~rho. A point
 * "<mode>@<rho>" feeds, instead of the argmax, a seeded random token of that band at every step,
 * so the layers' queries move by an amount set by rho (the rest of each layer's input, its
 * attention output over the same context, moves less still). Each point reports what the engine
 * measured of those queries: per layer the adjacent-query cosine (mean, share below tau), the
 * step-to-step top-k overlap and the correction rate, the same statistics `freekv eval` prints
 * for the trained model (models/retrieval-8m), so a band is chosen by matching them, not assumed.
 *
 * --backend cpu: the same steps on the CPU engine (with --shape attn8b or small): the bands' query
 * dynamics without the GPU; its step times are not the product's.
 * --shape qwen7b: Qwen2.5-7B's shapes instead (28 layers, hidden 3584, 28 query / 4 KV heads of 128,
 * FFN 18944, vocabulary 152064; written as a Llama-architecture folder without the q/k/v biases,
 * which do not change the step's cost), in --dir /tmp/freekv-qwen7b by default.
 * --grow B:C1/C2/..,B2:..: long sessions instead of fresh ones per point: B sessions filled through
 * the engine's prefill up to C1 tokens, the decode step timed there with hierarchical selection
 * off, then on (engine.setHierarchicalSelection), then filled on to C2, and so on; with the
 * mean combine (the CUDA engine's hierarchical selection takes mean and max; softmax-mean with
 * several query heads per KV head always scans every page). The keys have structure (16 random
 * centres, each chunk of 4096 tokens drawn around one of them, as real keys drift), so that the
 * group bounds can prune; --grow-keys iid draws every key independently (nothing prunes);
 * --grow-band RHO feeds seeded tokens of calibration band RHO instead of the argmax (queries that
 * move as the trained model's do, where the argmax of random weights corrects ~90% of the groups
 * at every step); a list (argmax,0.95) times every feed at every checkpoint, on the same sessions.
 * --grow-hier picks the hierarchical settings timed (default off,on); --grow-env "A=0;A=1" times
 * every checkpoint in each environment, and --grow-rounds N repeats the lot (ABAB, so drift shows).
 * --layers N (fewer than the shape's) writes and loads its own folder (<dir>-<N>l): the per-layer
 * step at a host memory per token the machine can hold for larger batches. Beside
 * each checkpoint: /dev/shm bytes per token, the process's page tables (VmPTE) and RSS.
 *
 *   node .gpu/runner-bench.mjs [--dir /tmp/freekv-8b] [--layers 32] [--points 1:32768,4:32768,16:8192]
 *                              [--modes freekv,oracle,dense] [--steps 16] [--warmup 32] [--out DIR]
 *                              [--hbm-gbps 4290] [--profile-steps N] [--side-timing]
 *                              [--prefill 8192,32768] [--prefill-chunk 512,2048] [--prefill-gathered 8192]
 *                              [--profile-prefill-chunk K] [--prefill-env "A=1;A=2"] [--prefill-rounds N]
 *                              [--sweep freekv@0.5,freekv@0.8,...] [--match-cosine 0.68 --calibrated freekv,dense]
 *                              [--tau 0.9] [--dense-layers 0] [--keys iid|topics[:A]]
 * --keys: the decode points' context keys, drawn around 64 topics a layer (topics[:A], the default;
 * A the centres' amplitude, 0.2 by default: pages that share content, which a query leaves and
 * comes back to about as often as the trained model's at 8K and less often at 32K and beyond, the
 * device pool's worst case there; see fillContext) or independent (iid: the pages a query leaves
 * come back far more often than the model's, the pool's best case; the workload of the figures
 * before bench/results/topics-gpu-20261206/).
 * --tau, --dense-layers: every session's correction threshold and dense layers (the engine's
 * defaults otherwise), e.g. the setting `freekv eval` shows the trained model keeps its accuracy at.
 * --modes: retrieval modes (freekv, oracle, dense, speculative, sink_window, resident_sparse: every
 * page on the GPU, the current query's selection read in place, the GPU-resident sparse attention
 * FreeKV is measured against), each optionally -direct (graphs off), -serial (both streams waited
 * for inside the step), -pagecopy (recall one head-page per cudaMemcpyAsync: oracle-pagecopy is the
 * ArkVale-style baseline), then -pool<N> (sessions made with FREEKV_RESIDENT_FACTOR=N; without it,
 * the process's setting or the default, 4; -pool1 is the paper's pool of one selection), then @band
 * (calibration band).
 * --sweep: modes run at the first point before the others; --match-cosine C --calibrated MODES:
 * the sweep's band whose measured mean adjacent-query cosine is nearest C (e.g. the trained
 * model's, from `freekv eval`) is chosen and MODES run at every point on it (as MODE@band).
 * --hbm-gbps: the HBM bandwidth of the floors (bench/gpu/run.sh passes the copy bandwidth it has
 * just measured); --profile-steps N: the first N timed steps of the first point inside a profiler
 * collection range (run under `ncu --profile-from-start off` for per-kernel device times).
 * --prefill L1,L2: before the decode points, the time of a prompt of each length through
 * Model.prefill on a FreeKV session, in chunks of --prefill-chunk tokens (a list: each is timed)
 * as Generate feeds it (the native part of the time to first token: projections, RoPE, prefill
 * attention, offload), with the model FLOPs achieved; --prefill-gathered L also times prompts up
 * to L tokens on an engine that reads the earlier context back from the host store at every
 * chunk (prefillContextBytes 1), the path every prefill took before the context stayed resident.
 * --prefill-env: each prefill point once per environment (settings the addon reads at every call,
 * e.g. FREEKV_PREFILL_GATE_UP), --prefill-rounds N times over (ABAB): an A/B in one process.
 */
import { execSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statfsSync, writeFileSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { loadAddon, type DeviceStepStats, type Engine, type Model, type Retrieval } from "../../native/binding.js";
import { DType } from "../../proto/gen/freekv/v1/common.js";
import { nativeSettings } from "../../services/common/config.js";
import { withEnv } from "../../test/helpers/env.js";
import { RETRIEVAL_NAMES, retrievalDefaults, validateRetrieval, type ModeName } from "../../services/common/retrieval.js";
import { ModelScheduler } from "../../services/compute/generate/scheduler.js";
import { Sampler } from "../../services/compute/generate/sampling.js";
import { parseModelConfig } from "../../services/compute/model/config.js";
import { createLocalSession, type LocalSession } from "../../services/compute/model/localHost.js";
import { writeSafetensors, type TensorToWrite } from "../../services/compute/model/safetensors.js";
import { collectTensorRefs } from "../../services/compute/model/weights.js";

const { values: args } = parseArgs({
  options: {
    dir: { type: "string", default: "" },
    layers: { type: "string", default: "" },
    shape: { type: "string", default: "llama8b" },
    /** cuda (the product's speed), or cpu: the same steps on the CPU engine, for the small shape (the query dynamics, not speed). */
    backend: { type: "string", default: "cuda" },
    grow: { type: "string", default: "" },
    "grow-keys": { type: "string", default: "structured" },
    /** The decode points' context keys: iid (independent), or topics (pages that share content; see fillContext). */
    keys: { type: "string", default: "topics" },
    /** --grow fed with tokens of this calibration band (e.g. 0.95) instead of the argmax: queries that move as a trained model's do. */
    "grow-band": { type: "string", default: "" },
    /** --grow: the hierarchical selection settings timed at every checkpoint (off, on, auto). */
    "grow-hier": { type: "string", default: "off,on" },
    /** --grow: environments every checkpoint is timed in (as --prefill-env: ';' between them; settings the addon reads at every decode, e.g. FREEKV_SPEC_REUSE). */
    "grow-env": { type: "string", default: "" },
    /** --grow: rounds over the feeds, settings and environments at every checkpoint (ABAB). */
    "grow-rounds": { type: "string", default: "1" },
    points: { type: "string", default: "1:32768,4:32768,16:8192" },
    modes: { type: "string", default: "freekv,oracle,dense" },
    steps: { type: "string", default: "16" },
    /** Steps run before the timed ones at every point: a pool of several selections (the default four, or -pool<N>) fills over tens of steps, and its steady state is what a long generation sees. */
    warmup: { type: "string", default: "32" },
    out: { type: "string", default: "." },
    "hbm-gbps": { type: "string", default: "4290" },
    "profile-steps": { type: "string", default: "0" },
    /** Prompt lengths whose prefill through Model.prefill is timed (the time to first token's native part). */
    prefill: { type: "string", default: "" },
    /** Tokens per Model.prefill call, as Generate feeds a prompt (FREEKV_PREFILL_CHUNK_TOKENS' default). */
    "prefill-chunk": { type: "string", default: "512" },
    /** Environments the --prefill points run in, ';' between them, NAME=VALUE pairs separated by spaces (e.g. "FREEKV_PREFILL_GATE_UP=f32;FREEKV_PREFILL_GATE_UP=bf16"): every point once per environment, the addon reading them at each call. */
    "prefill-env": { type: "string", default: "" },
    /** Rounds over the --prefill points and environments (ABAB, so a drift between them shows). */
    "prefill-rounds": { type: "string", default: "1" },
    /** Prompts up to this length are also timed with the prefill context read back from the host at every chunk. */
    "prefill-gathered": { type: "string", default: "0" },
    /** The Model.prefill call of this chunk index (of the first --prefill length and chunk) inside a profiler range (ncu --profile-from-start off). */
    "profile-prefill-chunk": { type: "string", default: "" },
    /** The engine's side-stream timing diagnostic (EngineOptions.sideTiming). */
    "side-timing": { type: "boolean", default: false },
    /** Modes run at the first point only, before the others: e.g. a sweep of calibration bands. */
    sweep: { type: "string", default: "" },
    /**
     * With --sweep and --calibrated: the band of the sweep whose measured mean query cosine is
     * nearest this value is chosen, and every --calibrated mode runs at every point on it.
     */
    "match-cosine": { type: "string", default: "" },
    calibrated: { type: "string", default: "" },
    /** The correction threshold of every session (the engine's default when empty). */
    tau: { type: "string", default: "" },
    /** Layers every session keeps dense (comma-separated, e.g. 0), as `freekv eval --dense-layers`. */
    "dense-layers": { type: "string", default: "" },
  },
});
const SHAPES = {
  llama8b: { layers: 32, H: 4096, I: 14336, HQ: 32, HKV: 8, D: 128, V: 128256, dir: "/tmp/freekv-8b", ropeTheta: 500000.0, llama3Rope: true },
  qwen7b: { layers: 28, H: 3584, I: 18944, HQ: 28, HKV: 4, D: 128, V: 152064, dir: "/tmp/freekv-qwen7b", ropeTheta: 1000000.0, llama3Rope: false },
  /**
   * For the CPU backend (--backend cpu), where the calibration bands' query dynamics can be
   * studied off the GPU: attn8b has the 8B's depth, width and attention heads with a 4096-wide MLP
   * and an 8K vocabulary (about 1 s a step on 2 cores); small is a 4-layer toy.
   */
  attn8b: { layers: 32, H: 4096, I: 4096, HQ: 32, HKV: 8, D: 128, V: 8192, dir: "/tmp/freekv-attn8b", ropeTheta: 500000.0, llama3Rope: true },
  small: { layers: 4, H: 1024, I: 2816, HQ: 16, HKV: 4, D: 64, V: 32768, dir: "/tmp/freekv-small", ropeTheta: 500000.0, llama3Rope: false },
} as const;
/** The addon's settings in this process's environment (e.g. FREEKV_RESIDENT_FACTOR), written beside the figures. */
const addonSettings = nativeSettings();
if (Object.keys(addonSettings).length) console.log(`environment: ${Object.entries(addonSettings).map(([k, v]) => `${k}=${v}`).join(" ")}`);
if (args.backend !== "cuda" && args.backend !== "cpu") throw new RangeError(`--backend must be cuda or cpu (got ${args.backend})`);
const BACKEND = args.backend as "cuda" | "cpu";
if (!(args.shape! in SHAPES)) throw new RangeError(`--shape must be one of ${Object.keys(SHAPES).join(", ")} (got ${args.shape})`);
const SHAPE = SHAPES[args.shape as keyof typeof SHAPES];
// --keys topics[:A]: A is the topics' centre amplitude (uniform(-A, A) per channel, beside the
// keys' own uniform(-0.5, 0.5)); 0 is iid keys.
const keysMatch = /^(iid|topics)(?::([0-9]*\.?[0-9]+))?$/.exec(args.keys!);
if (!keysMatch || (keysMatch[1] === "iid" && keysMatch[2] !== undefined)) throw new RangeError(`--keys must be iid, topics or topics:A (got ${args.keys})`);
const KEYS = keysMatch[1] as "iid" | "topics";
// 0.2 by default: at the 8B shapes (attn8b on the CPU engine, band 0.95, 1 x 8K) it recalls 0.54 /
// 0.092 of a selection a step at pools 1 / 4 with a top-k overlap of 47%, against the trained
// model's 0.42 / 0.08 and 56% (iid keys: 0.35 / 0.018, 66%; 0.1: 0.48 / 0.056, 52%; 1.5: 0.61 /
// 0.15, 39%; bench/results/feed-return-rate-cpu-20261206/). No amplitude matches all three: this
// one matches what the default pool recalls at 8K. At 32K its pages move far more than the model's
// can be expected to (0.40 of a selection at pool 4): a worst case there, as iid keys are the best.
const TOPIC_AMPLITUDE = keysMatch[2] === undefined ? 0.2 : Number(keysMatch[2]);
const LAYERS = args.layers ? Number(args.layers) : SHAPE.layers;
// A folder per layer count: a folder written with other layers would load with its own count.
args.dir ||= LAYERS === SHAPE.layers ? SHAPE.dir : `${SHAPE.dir}-${LAYERS}l`;
const STEPS = Number(args.steps);
const WARMUP = Number(args.warmup);
const HBM_GBPS = Number(args["hbm-gbps"]);
const profileSteps = Number(args["profile-steps"]);
for (const [name, v] of [["--layers", LAYERS], ["--steps", STEPS], ["--warmup", WARMUP], ["--hbm-gbps", HBM_GBPS], ["--profile-steps", profileSteps]] as const)
  if (!Number.isFinite(v) || v < 0 || (name !== "--profile-steps" && v === 0) || (name !== "--hbm-gbps" && !Number.isInteger(v)))
    throw new RangeError(`${name} must be a positive ${name === "--hbm-gbps" ? "number" : "integer"} (got ${v})`);
// Timed steps' logits of the first run of each (batch, context, base mode), for the comparisons.
const logitsOf = new Map<string, { mode: string; logits: Float32Array[] }>();
let profiled = false;
const { H, I, HQ, HKV, D, V } = SHAPE;
/** Calibration bands at the end of the vocabulary: BAND_ROWS tokens each, embedding correlation rho. */
const CALIBRATION_BANDS = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99] as const;
const BAND_ROWS = 512;
const bandStart = (rho: number): number => {
  const i = CALIBRATION_BANDS.indexOf(rho as (typeof CALIBRATION_BANDS)[number]);
  if (i < 0) throw new RangeError(`calibration band ${rho} is not one of ${CALIBRATION_BANDS.join(", ")}`);
  return V - (CALIBRATION_BANDS.length - i) * BAND_ROWS;
};
const log = (s: string) => console.log(s);

// ---- 1. the model folder -------------------------------------------------------------------

/** A xorshift32 stream of uniform(-1, 1) numbers from `seed` (0 starts at 1): every random input here. */
function uniformStream(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return (x / 4294967296) * 2 - 1;
  };
}

/** Uniform(-a, a) bf16 words from a xorshift stream; never exactly zero. */
function randomBf16(n: number, a: number, seed: number): Uint16Array {
  const out = new Uint16Array(n);
  const f = new Float32Array(1), u = new Uint32Array(f.buffer);
  const next = uniformStream((seed * 2654435761) >>> 0);
  // A template of T words repeated (writing 8 billion fresh values would take minutes). T is
  // prime, so the rows of a matrix (a power-of-two or other multiple-of-64 length) start at
  // distinct offsets of it and no two rows are equal. With T = 65536, a 4096-wide matrix had only
  // 16 distinct rows (the embedding and every q/k/v/gate/up projection of the 8B shape): rank 16,
  // every head's query the same 16 numbers repeated: the per-layer query cosines jumped between
  // layers and the argmax steps, which should be unrelated, measured 0.19
  // (bench/results/runner-bands-cpu-20261203). Timing never depended on it; the dynamics do.
  const T = 65521, tpl = new Uint16Array(T);
  for (let i = 0; i < T; i++) {
    f[0] = next() * a || a / 2;
    tpl[i] = u[0] >>> 16;
  }
  for (let i = 0; i < n; i += T) out.set(tpl.subarray(0, Math.min(T, n - i)), i);
  return out;
}

/**
 * Rows of the calibration bands: row = sqrt(rho) * c_band + sqrt(1 - rho) * n_row with c_band and
 * n_row independent uniform(-1, 1) vectors (a proper xorshift stream per row, not the template),
 * so two rows of a band have expected cosine rho.
 */
function writeCalibrationBands(embed: Uint16Array): void {
  const f = new Float32Array(1), u = new Uint32Array(f.buffer);
  const next = uniformStream(0x9e3779b9);
  const c = new Float32Array(H);
  for (const rho of CALIBRATION_BANDS) {
    for (let j = 0; j < H; j++) c[j] = next();
    const a = Math.sqrt(rho), b = Math.sqrt(1 - rho), start = bandStart(rho);
    for (let r = 0; r < BAND_ROWS; r++)
      for (let j = 0; j < H; j++) {
        f[0] = a * c[j] + b * next() || 1e-3;
        embed[(start + r) * H + j] = u[0] >>> 16;
      }
  }
}

function writeModel(dir: string): void {
  mkdirSync(dir, { recursive: true });
  const cfg = {
    architectures: ["LlamaForCausalLM"], model_type: "llama", hidden_size: H, intermediate_size: I,
    num_hidden_layers: LAYERS, num_attention_heads: HQ, num_key_value_heads: HKV, head_dim: D, vocab_size: V,
    rms_norm_eps: 1e-5, max_position_embeddings: SHAPE.llama3Rope ? 131072 : 1048576 + 4096, tie_word_embeddings: false, attention_bias: false,
    rope_theta: SHAPE.ropeTheta,
    ...(SHAPE.llama3Rope ? { rope_scaling: { rope_type: "llama3", factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 } } : {}),
    bos_token_id: Math.min(128000, V - 2), eos_token_id: Math.min(128001, V - 1), torch_dtype: "bfloat16",
  };
  const weightMap: Record<string, string> = {};
  const ones = (n: number) => new Uint16Array(n).fill(0x3f80);
  const dense = (rows: number, cols: number, seed: number): TensorToWrite => ({ dtype: "BF16", shape: [rows, cols], data: randomBf16(rows * cols, Math.sqrt(3 / cols), seed) });
  const put = (file: string, t: Record<string, TensorToWrite>) => {
    writeSafetensors(join(dir, file), t, { format: "pt" });
    for (const k of Object.keys(t)) weightMap[k] = file;
  };
  const embed = randomBf16(V * H, 1, 1);
  writeCalibrationBands(embed);
  put("model-embed.safetensors", {
    "model.embed_tokens.weight": { dtype: "BF16", shape: [V, H], data: embed },
    "model.norm.weight": { dtype: "BF16", shape: [H], data: ones(H) },
  });
  put("model-head.safetensors", { "lm_head.weight": dense(V, H, 2) });
  for (let l = 0; l < LAYERS; l++) {
    const p = `model.layers.${l}.`;
    put(`model-layer-${String(l).padStart(3, "0")}.safetensors`, {
      [p + "input_layernorm.weight"]: { dtype: "BF16", shape: [H], data: ones(H) },
      [p + "post_attention_layernorm.weight"]: { dtype: "BF16", shape: [H], data: ones(H) },
      [p + "self_attn.q_proj.weight"]: dense(HQ * D, H, 10 * l + 3),
      [p + "self_attn.k_proj.weight"]: dense(HKV * D, H, 10 * l + 4),
      [p + "self_attn.v_proj.weight"]: dense(HKV * D, H, 10 * l + 5),
      [p + "self_attn.o_proj.weight"]: dense(H, HQ * D, 10 * l + 6),
      [p + "mlp.gate_proj.weight"]: dense(I, H, 10 * l + 7),
      [p + "mlp.up_proj.weight"]: dense(I, H, 10 * l + 8),
      [p + "mlp.down_proj.weight"]: dense(H, I, 10 * l + 9),
    });
  }
  writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: {}, weight_map: weightMap }));
  writeFileSync(join(dir, "config.json"), JSON.stringify(cfg, null, 2));
}

// ---- 2. timing ------------------------------------------------------------------------------

/** --tau and --dense-layers, checked once by the engine's own validator before any session is made. */
const SESSION_OVERRIDES: Partial<Retrieval> = {
  ...(args.tau ? { tau: Number(args.tau) } : {}),
  ...(args["dense-layers"] ? { denseLayers: args["dense-layers"].split(",").map(Number) } : {}),
};
{
  const bad = validateRetrieval({ ...retrievalDefaults(), ...SESSION_OVERRIDES }, LAYERS);
  if (bad) throw new RangeError(`--${bad.field === "tau" ? "tau" : "dense-layers"}: ${bad.message}`);
}

function retrieval(mode: string, pageCopy = false): Retrieval {
  return {
    ...retrievalDefaults(),
    ...SESSION_OVERRIDES,
    mode: RETRIEVAL_NAMES.mode[mode as ModeName],
    ...(pageCopy ? { recall: RETRIEVAL_NAMES.recall.double_buffer } : {}),
  };
}
/** The budget, tau and dense layers every session of the run shares (printed, written, and in the floor). */
const SESSION = retrieval("freekv");

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor(s.length / 2)] : NaN;
}

/**
 * The step's floor: the bytes a step must read from HBM (every layer's weights and the LM head in
 * bf16, plus the K/V each sequence attends: the sessions' budget (512 + 1024 + 512 tokens by
 * default), the whole context when dense and in the --dense-layers, sink + window only in
 * sink_window) over the HBM bandwidth of --hbm-gbps (default: the H200's measured copy bandwidth,
 * 4.29 TB/s, bench/results/gpu-*.json ceilings).
 */
function floorMs(batch: number, context: number, mode: string): number {
  const weights = 2 * (LAYERS * (H * (HQ + 2 * HKV) * D + HQ * D * H + 3 * H * I) + V * H);
  const r = SESSION;
  const budget = r.sinkTokens + r.selectTokens + r.windowTokens;
  const sparse = mode === "sink_window" ? Math.min(context, r.sinkTokens + r.windowTokens) : Math.min(context, budget);
  const denseLayers = mode === "dense" ? LAYERS : r.denseLayers.length;
  const kv = batch * HKV * D * 2 * 2 * (denseLayers * context + (LAYERS - denseLayers) * sparse);
  return ((weights + kv) / (HBM_GBPS * 1e9)) * 1e3;
}

/** --keys topics: the number of topics a layer's pages are drawn from, and the page length they follow. */
const KEY_TOPICS = 64, TOPIC_PAGE = 32;

/**
 * Random K/V for `n` tokens of every layer, through the engine's prefill (no model pass).
 * keys "iid": every key uniform(-1, 1) and independent. "topics": each 32-token page of a layer
 * belongs to one of KEY_TOPICS topics (by a hash of page and layer, so a topic's pages are spread
 * over the context and recur), and its keys are the topic's centre (uniform(-A, A) per channel,
 * TOPIC_AMPLITUDE) plus half the independent noise: pages that share content, as a trained
 * model's do. With iid keys the pages a query leaves come back far more often than the trained
 * model's (README, "How far the pooled figures carry"); with topics they come back about as often
 * (bench/results/feed-return-rate-cpu-20261206/).
 */
async function fillContext(engine: Engine, session: number, n: number, seed: number, keys: "iid" | "topics"): Promise<void> {
  const chunk = 4096, row = HKV * D;
  const pool = new Float32Array(chunk * row * 2 + 7919);
  const u = uniformStream(seed);
  for (let i = 0; i < pool.length; i++) pool[i] = u();
  const centres = new Float32Array(keys === "topics" ? KEY_TOPICS * row : 0);
  for (let i = 0; i < centres.length; i++) centres[i] = TOPIC_AMPLITUDE * u();
  const k = new Float32Array(keys === "topics" ? chunk * row : 0);
  for (let l = 0; l < LAYERS; l++)
    for (let t = 0; t < n; t += chunk) {
      const m = Math.min(chunk, n - t), off = (l * 31 + t / chunk) % 7919;
      let kc = pool.subarray(off, off + m * row);
      if (keys === "topics") {
        for (let i = 0; i < m; i++) {
          const page = Math.floor((t + i) / TOPIC_PAGE), c = (Math.imul(page + l * 7919, 2654435761) >>> 0) % KEY_TOPICS;
          for (let j = 0; j < row; j++) k[i * row + j] = centres[c * row + j] + 0.5 * kc[i * row + j];
        }
        kc = k.subarray(0, m * row);
      }
      await engine.prefill(session, l, kc, pool.subarray(off + chunk * row, off + chunk * row + m * row), m);
    }
}

interface Point { batch: number; context: number; mode: string; floorMs?: number; stepMs?: number; minMs?: number; drainMs?: number; throughputMs?: number; sameAs?: string; correctionRate?: number; recallMBPerStep?: number; batchRecallMBPerStep?: number; graph?: string; error?: string; ts?: Record<string, number>; dynamics?: Dynamics; memory?: PointMemory }

/**
 * What a point's sessions hold once filled: device memory (nvidia-smi's used, the whole device's)
 * and /dev/shm bytes, each as the rise over the same reading before the sessions were made, per
 * session; and how many such sessions the free device memory and the free /dev/shm left at the
 * start would hold (the concurrency a node of this machine's sizes allows, KV on the host against
 * KV resident on the device).
 */
interface PointMemory { deviceMiBPerSession: number; shmMiBPerSession: number; deviceFreeMiB: number; shmFreeMiB: number; sessionsByDevice: number; sessionsByHost: number }

/** Device memory in use and free, MiB (nvidia-smi; null where it cannot be read). */
function deviceMiB(): { used: number; free: number } | null {
  try {
    const [used, free] = execSync("nvidia-smi --query-gpu=memory.used,memory.free --format=csv,noheader,nounits -i 0").toString().trim().split(",").map(Number);
    return Number.isFinite(used) && Number.isFinite(free) ? { used, free } : null;
  } catch {
    return null;
  }
}

function shmMiB(): { used: number; free: number } {
  const st = statfsSync("/dev/shm");
  return { used: ((st.blocks - st.bfree) * st.bsize) / 2 ** 20, free: (st.bavail * st.bsize) / 2 ** 20 };
}


/** What the engine measured of the queries (sessions[0]'s per-layer statistics over all its steps). */
interface Dynamics {
  cosMean: number;
  belowTauPct: number;
  overlapPct: number;
  layers: { layer: number; cosMean: number; cosStd: number; belowTauPct: number; overlapPct: number; correctionRate: number }[];
}

function dynamicsOf(st: ReturnType<Engine["stats"]>): Dynamics {
  let n = 0, sum = 0, below = 0, ov = 0, ovBase = 0;
  const layers = st.layers.map((l, layer) => {
    n += l.cosineSamples; sum += l.cosineSum; below += l.cosineBelowTau; ov += l.overlapPages; ovBase += l.overlapBase;
    const m = l.cosineSamples ? l.cosineSum / l.cosineSamples : NaN;
    return {
      layer,
      cosMean: m,
      cosStd: l.cosineSamples ? Math.sqrt(Math.max(0, l.cosineSumSq / l.cosineSamples - m * m)) : NaN,
      belowTauPct: l.cosineSamples ? (100 * l.cosineBelowTau) / l.cosineSamples : NaN,
      overlapPct: l.overlapBase ? (100 * l.overlapPages) / l.overlapBase : NaN,
      correctionRate: l.selections ? l.corrections / l.selections : NaN,
    };
  });
  return { cosMean: n ? sum / n : NaN, belowTauPct: n ? (100 * below) / n : NaN, overlapPct: ovBase ? (100 * ov) / ovBase : NaN, layers };
}

async function timePoint(addon: ReturnType<typeof loadAddon>, engine: Engine, model: Model, batch: number, context: number, mode: string): Promise<Point> {
  const geo = { layers: LAYERS, qHeads: HQ, kvHeads: HKV, headDim: D, kvDtype: DType.D_TYPE_BFLOAT16 };
  const sessions: LocalSession[] = [];
  // "<mode>-direct": the same mode with every op of a step launched directly (an engine with
  // cudaGraphs: false, passed in by the caller).
  // "<mode>-serial": every step followed by a wait for both streams (the speculative recall of the
  // step included) inside its timing; its logits must equal the pipelined run's bit for bit.
  // "<mode>@<rho>": tokens from the calibration band rho instead of the argmax (see the header).
  const [modeName, bandText] = mode.split("@");
  const band = bandText === undefined ? undefined : bandStart(Number(bandText));
  let bandSeed = 12345;
  const bandToken = () => band! + (((bandSeed = (Math.imul(bandSeed, 1103515245) + 12345) >>> 0) >>> 16) % BAND_ROWS);
  // "<mode>-pagecopy": the same mode recalling with one cudaMemcpyAsync per head-page through the
  // double buffers (recall double_buffer, the paper's and ArkVale's method; its job list goes
  // through the host, so its steps are not graphed): oracle-pagecopy is the ArkVale-style
  // baseline, the current query's pages recalled page by page before every step.
  // "<mode>-pool<N>" (last, before any @band): the sessions made with FREEKV_RESIDENT_FACTOR=N
  // (a group's device pool of N selections' worth of pages), so one process times the settings
  // side by side on the same warm device.
  const pool = /-pool([1-8])$/.exec(modeName)?.[1];
  const unpooled = modeName.replace(/-pool[1-8]$/, "");
  const serial = unpooled.endsWith("-serial");
  const direct = unpooled.endsWith("-direct");
  const pageCopy = unpooled.endsWith("-pagecopy");
  const base = unpooled.replace(/-(direct|serial|pagecopy)$/, "");
  const point: Point = { batch, context, mode, floorMs: floorMs(batch, context, base) };
  try {
    const dev0 = BACKEND === "cuda" ? deviceMiB() : null, shm0 = shmMiB();
    if (BACKEND === "cuda" && !dev0) log(`b${batch} ctx ${context} ${mode}: nvidia-smi could not be read; no memory per session for this point`);
    const f0 = performance.now();
    for (let b = 0; b < batch; b++) {
      const s = withEnv("FREEKV_RESIDENT_FACTOR", pool, () => createLocalSession(engine, geo, retrieval(base, pageCopy), context + WARMUP + STEPS + 64));
      sessions.push(s);
      await fillContext(engine, s.session, context, 1000 + b, KEYS);
      // Many sessions take minutes to fill: the pace, so that a run cut off still says how far it got.
      if (batch >= 8 && ((b + 1) % 4 === 0 || b + 1 === batch))
        log(`b${batch} ctx ${context} ${mode}: ${b + 1} sessions filled in ${((performance.now() - f0) / 1000).toFixed(1)} s; /dev/shm free ${(shmMiB().free / 1024).toFixed(1)} GiB`);
    }
    const ids = Int32Array.from(sessions.map((s) => s.session));
    let tokens = Int32Array.from(sessions.map((_, b) => (band === undefined ? (b * 7919 + 13) % V : bandToken())));
    let pos = context;
    const times: number[] = [];
    const stepLogits: Float32Array[] = [];
    const warm = WARMUP;
    const g0 = engine.deviceStepStats();
    // The recall counters at the first timed step: the figures below are the timed steps' own
    // (the first decode after the fill recalls a whole selection, and a pool fills over the warm-up).
    let r0 = sessions.map(() => 0), s0 = 0;
    // --profile-steps n: the first n timed steps of the first point inside a profiler range.
    const profile = profileSteps > 0 && !profiled;
    for (let step = 0; step < warm + STEPS; step++) {
      if (step === warm) {
        Object.assign(g0, engine.deviceStepStats());
        r0 = sessions.map((x) => Number(engine.stats(x.session).recallBytes));
        s0 = Number(engine.stats(sessions[0].session).decodeSteps);
      }
      if (profile && step === warm) addon.profilerRange(true);
      const t0 = performance.now();
      const logits = await model.decode(ids, tokens, Int32Array.from(sessions.map(() => pos)));
      if (serial) for (const s of sessions) await engine.sync(s.session);
      const ms = performance.now() - t0;
      if (step >= warm) stepLogits.push(logits);
      if (profile && step === warm + profileSteps - 1) {
        addon.profilerRange(false);
        profiled = true;
      }
      if (step >= warm) times.push(ms);
      pos++;
      const next = new Int32Array(batch);
      if (band !== undefined) for (let b = 0; b < batch; b++) next[b] = bandToken();
      else for (let b = 0; b < batch; b++) {
        let best = 0;
        for (let v = 1; v < V; v++) if (logits[b * V + v] > logits[b * V + best]) best = v;
        next[b] = best;
      }
      tokens = next;
    }
    // What the steps left running (the side stream's speculative work): drained and timed, so
    // the throughput counts every byte the steps recalled.
    const d0 = performance.now();
    for (const s of sessions) await engine.sync(s.session);
    point.drainMs = performance.now() - d0;
    point.throughputMs = (times.reduce((a, b) => a + b, 0) + point.drainMs) / times.length;
    // After the steps: what the sessions hold, their step buffers included.
    const dev1 = dev0 ? deviceMiB() : null, shm1 = shmMiB();
    if (dev0 && dev1) {
      const perDev = (dev1.used - dev0.used) / batch, perShm = (shm1.used - shm0.used) / batch;
      point.memory = {
        deviceMiBPerSession: perDev,
        shmMiBPerSession: perShm,
        deviceFreeMiB: dev0.free,
        shmFreeMiB: shm0.free,
        sessionsByDevice: perDev > 0 ? Math.floor(dev0.free / perDev) : Infinity,
        sessionsByHost: perShm > 0 ? Math.floor(shm0.free / perShm) : Infinity,
      };
    }
    // The same point and base mode run before: every timed step's logits must be identical.
    const key = `${batch}:${context}:${base}${bandText === undefined ? "" : "@" + bandText}`;
    const prev = logitsOf.get(key);
    if (prev) {
      let diffs = 0;
      for (let i = 0; i < Math.min(prev.logits.length, stepLogits.length); i++)
        for (let j = 0; j < stepLogits[i].length; j++) if (!Object.is(prev.logits[i][j], stepLogits[i][j])) diffs++;
      point.sameAs = `${diffs === 0 ? "identical to" : `${diffs} logits differ from`} ${prev.mode} over ${Math.min(prev.logits.length, stepLogits.length)} steps`;
    } else logitsOf.set(key, { mode, logits: stepLogits });
    const g1 = engine.deviceStepStats();
    const perStep = (k: keyof DeviceStepStats) => ((g1[k] - g0[k]) / Math.max(1, g1.steps - g0.steps)).toFixed(2);
    point.graph = `timed steps: ${g1.replays - g0.replays} graph replays, ${g1.captures - g0.captures + g1.updates - g0.updates} captured, ${g1.direct - g0.direct} direct of ${g1.steps - g0.steps} (${g1.ops} ops a step); per step: host ${perStep("hostMs")} ms, device ${perStep("deviceMs")} ms; after issue: side-stream issue ${perStep("sideIssueMs")}, wait ${perStep("waitMs")}, bookkeeping ${perStep("finishMs")}, logits copy ${perStep("resultMs")} ms` +
      (g1.sideSteps > g0.sideSteps ? `; side stream ${((g1.sideMs - g0.sideMs) / (g1.sideSteps - g0.sideSteps)).toFixed(2)} ms a step (${g1.sideSteps - g0.sideSteps} steps)` : "");
    point.stepMs = median(times);
    point.minMs = Math.min(...times);
    const st = engine.stats(sessions[0].session);
    const steps = Number(st.decodeSteps) - s0 || 1;
    point.correctionRate = Number(st.selections) ? Number(st.corrections) / Number(st.selections) : 0;
    // Over the timed steps only.
    point.recallMBPerStep = (Number(st.recallBytes) - r0[0]) / steps / 1e6;
    // The link carries every session's recall: the batch's total beside the first session's.
    point.batchRecallMBPerStep = sessions.reduce((a, s, b) => a + Number(engine.stats(s.session).recallBytes) - r0[b], 0) / steps / 1e6;
    point.dynamics = dynamicsOf(st);

    // 3. The TypeScript of a Generate step (scheduler + greedy sampling), same sessions.
    if (mode === "freekv" && batch === Math.max(...points.map((p) => p.batch))) {
      const native: number[] = [];
      const sched = new ModelScheduler(model, { maxBatch: 64, onStep: (_size, ms) => native.push(ms) });
      const samplers = sessions.map(() => new Sampler({ temperature: 0, topP: 1, topK: 0, seed: 1 }));
      const walls: number[] = [];
      let last = performance.now();
      const seen = native.length;
      let cur = Array.from(tokens);
      for (let step = 0; step < warm + STEPS; step++) {
        // Greedy, as Generate asks for temperature 0: the batch runs through decodeArgmax.
        const res = await Promise.all(sessions.map((s, b) => sched.step(s.session, cur[b], pos, samplers[b].greedy)));
        cur = res.map((r, b) => r.token ?? samplers[b].sample(r.logits, 0, V));
        pos++;
        const now = performance.now();
        if (step >= warm) walls.push(now - last);
        last = now;
      }
      // One native call per step (checked): the step's TypeScript time is its wall time minus its
      // own native call, paired step by step (the step times vary more than the difference).
      const nat = native.slice(seen).slice(warm);
      const diffs = walls.map((w, i) => w - nat[i]);
      const shares = walls.map((w, i) => (100 * (w - nat[i])) / w);
      point.ts = { wallMs: median(walls), nativeMs: median(nat), decodeMs: point.stepMs!, tsMs: median(diffs), sharePct: median(shares), batches: sched.batches, stepsTimed: walls.length, callsTimed: nat.length };
    }
  } catch (e) {
    point.error = (e as Error).message;
  } finally {
    for (const s of sessions) await s.close();
  }
  return point;
}

// ---- main -------------------------------------------------------------------------------------

const points = args.points!.split(",").map((p) => {
  const [b, c] = p.split(":").map(Number);
  return { batch: b, context: c };
});
const modes = args.modes!.split(",");
// Mode names and the calibration bands named in them are checked before any work ("" in --modes:
// none, e.g. `--modes=` with --sweep and --calibrated alone).
for (const m of [...modes, ...(args.sweep ? args.sweep.split(",") : []), ...(args.calibrated ? args.calibrated.split(",") : [])]) {
  if (m === "") continue;
  const name = m.split("@")[0].replace(/-pool[1-8]$/, "").replace(/-(direct|serial|pagecopy)$/, "");
  if (!(name in RETRIEVAL_NAMES.mode)) throw new RangeError(`unknown mode ${JSON.stringify(m)} (modes: ${Object.keys(RETRIEVAL_NAMES.mode).join(", ")}, each optionally -direct, -serial or -pagecopy, then -pool1..-pool8, then @band)`);
  if (m.includes("@")) bandStart(Number(m.split("@")[1]));
}
for (const m of args.calibrated ? args.calibrated.split(",") : []) if (m.includes("@")) throw new RangeError(`--calibrated takes plain modes (got ${m})`);
mkdirSync(args.out!, { recursive: true });
const addon = loadAddon();
const info = addon.backendInfo();
log(`date ${new Date().toISOString()}; ${os.cpus()[0]?.model}; backendInfo ${JSON.stringify(info.cuda)}`);
if (BACKEND === "cuda" && !info.cuda.available) {
  log(`CUDA unavailable: ${info.cuda.reason}`);
  process.exit(2);
}
try {
  log(execSync("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader").toString().trim());
} catch {}
log(`/dev/shm free ${(shmMiB().free / 1024).toFixed(1)} GiB; RAM ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB`);

const t0 = performance.now();
if (!existsSync(join(args.dir!, "config.json"))) {
  writeModel(args.dir!);
  log(`wrote ${args.dir} in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}
const spec = parseModelConfig(JSON.parse((await import("node:fs")).readFileSync(join(args.dir!, "config.json"), "utf8")));
const sideTiming = args["side-timing"]!;
const engine = new addon.Engine({ backend: BACKEND, sideTiming });
const t1 = performance.now();
const model = await addon.Model.load({ config: spec.native, tensors: collectTensorRefs(args.dir!, spec.native), engine });
log(`Model.load: ${((performance.now() - t1) / 1000).toFixed(1)} s; device ${model.device}; a prefill wave is ${model.prefillWaveTokens ?? 1} tokens`);
// "-direct" modes: a second engine with graphs off and the model loaded on it (when asked for).
let direct: { engine: Engine; model: Model } | undefined;
if (modes.some((m) => m.split("@")[0].replace(/-pool[1-8]$/, "").endsWith("-direct"))) {
  const e = new addon.Engine({ backend: BACKEND, cudaGraphs: false, sideTiming });
  direct = { engine: e, model: await addon.Model.load({ config: spec.native, tensors: collectTensorRefs(args.dir!, spec.native), engine: e }) };
}

interface PrefillPoint { tokens: number; chunk: number; resident: boolean; ms: number; tokensPerS: number; tflops: number; env?: string; error?: string }
const prefillPoints: PrefillPoint[] = [];
const chunks = args["prefill-chunk"].split(",").map(Number);
if (!chunks.every((c) => Number.isInteger(c) && c >= 1)) throw new RangeError(`--prefill-chunk takes positive integers (got ${args["prefill-chunk"]})`);
/** Model FLOPs of a t-token causal prefill: 2 per weight per token (lm head once) + QK^T and PV over the causal triangle. */
const prefillFlops = (t: number) => 2 * t * LAYERS * (H * (HQ + 2 * HKV) * D + HQ * D * H + 3 * H * I) + 2 * H * V + LAYERS * 2 * 2 * HQ * D * (t * (t + 1)) / 2;
/** The same prompt with the prefill context read back from the host store at every chunk (the engine's fallback), for the longest --prefill-gathered lengths. */
const gatheredUpTo = Number(args["prefill-gathered"]);
/** "A=1 B=2;A=3": environments, each a list of NAME=VALUE pairs ("" is one empty environment). */
function parseEnvs(text: string, flag: string): (readonly (readonly [string, string])[])[] {
  return text.split(";").map((e) =>
    e.trim().split(/\s+/).filter(Boolean).map((kv) => {
      const at = kv.indexOf("=");
      if (at < 1) throw new RangeError(`${flag} takes NAME=VALUE pairs (got ${kv})`);
      return [kv.slice(0, at), kv.slice(at + 1)] as const;
    }),
  );
}
const profilePrefillChunk = args["profile-prefill-chunk"] === "" ? -1 : Number(args["profile-prefill-chunk"]);
let prefillProfiled = false;
let gatheredModel: { engine: Engine; model: Model } | null = null;
const prefillEnvs = parseEnvs(args["prefill-env"], "--prefill-env");
const prefillRounds = Number(args["prefill-rounds"]);
if (!Number.isInteger(prefillRounds) || prefillRounds < 1) throw new RangeError(`--prefill-rounds takes a positive integer (got ${args["prefill-rounds"]})`);
const savedEnv = new Map<string, string | undefined>();
for (const env of prefillEnvs) for (const [k] of env) savedEnv.set(k, process.env[k]);
const prefillRuns: { t: number; env: (typeof prefillEnvs)[number] }[] = [];
for (let round = 0; round < prefillRounds; round++)
  for (const t of args.prefill ? args.prefill.split(",").map(Number) : []) for (const env of prefillEnvs) prefillRuns.push({ t, env });
for (const { t, env } of prefillRuns) {
  if (!Number.isInteger(t) || t < 1) throw new RangeError(`--prefill takes prompt lengths (got ${args.prefill})`);
  applyEnv(savedEnv, env);
  const envLabel = env.length ? ` [${env.map(([k, v]) => `${k}=${v}`).join(" ")}]` : "";
  const geo = { layers: LAYERS, qHeads: HQ, kvHeads: HKV, headDim: D, kvDtype: DType.D_TYPE_BFLOAT16 };
  const variants: boolean[] = t <= gatheredUpTo ? [true, false] : [true];
  for (const chunk of chunks)
    for (const resident of variants) {
      if (!resident && !gatheredModel) {
        const e = new addon.Engine({ backend: BACKEND, prefillContextBytes: 1 });
        gatheredModel = { engine: e, model: await addon.Model.load({ config: spec.native, tensors: collectTensorRefs(args.dir!, spec.native), engine: e }) };
      }
      const [eng, mdl] = resident ? [engine, model] : [gatheredModel!.engine, gatheredModel!.model];
      const s = createLocalSession(eng, geo, retrieval("freekv"), t + 64);
      const label = `prefill ${t} tokens in chunks of ${chunk}${resident ? "" : " (context read back from the host every chunk)"}${envLabel}`;
      try {
        let seed = 7 + t;
        const tokens = Int32Array.from({ length: t }, () => (seed = (seed * 1103515245 + 12345) >>> 0) % V);
        const t0 = performance.now();
        for (let i = 0, k = 0; i < t; i += chunk, k++) {
          const prof = profilePrefillChunk === k && !prefillProfiled;
          if (prof) addon.profilerRange(true);
          await mdl.prefill(s.session, tokens.subarray(i, Math.min(t, i + chunk)), i, false);
          if (prof) {
            addon.profilerRange(false);
            prefillProfiled = true;
          }
        }
        const ms = performance.now() - t0;
        const tflops = prefillFlops(t) / (ms / 1000) / 1e12;
        prefillPoints.push({ tokens: t, chunk, resident, ms, tokensPerS: (t / ms) * 1000, tflops, env: envLabel.trim() || undefined });
        log(`${label}: ${ms.toFixed(0)} ms (${((t / ms) * 1000).toFixed(0)} tokens/s, ${tflops.toFixed(0)} model TFLOP/s)`);
      } catch (e) {
        prefillPoints.push({ tokens: t, chunk, resident, ms: NaN, tokensPerS: NaN, tflops: NaN, env: envLabel.trim() || undefined, error: (e as Error).message });
        log(`${label}: error: ${(e as Error).message}`);
      } finally {
        await s.close();
      }
    }
}

applyEnv(savedEnv, []);

// ---- --grow: long sessions, hierarchical selection off and on ----------------------------------

interface GrowPoint { batch: number; context: number; feed: string; hierarchical: string; env?: string; round?: number; stepMs?: number; minMs?: number; maxMs?: number; drainMs?: number; recallMBPerStep?: number; corrections?: number; error?: string }
interface GrowMemory { batch: number; context: number; fillS: number; shmUsedGiB: number; shmBytesPerToken: number; vmPteKiB: number; rssGiB: number }

function procStatusKiB(field: string): number {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync("/proc/self/status", "utf8"));
    return m ? Number(m[1]) : NaN;
  } catch {
    return NaN;
  }
}

/**
 * Key/value rows for --grow: 16 templates of 2 chunks each (a random centre per channel plus
 * noise); chunk c of layer l reads template (l * 7 + c * 13) % 16 from a row offset that varies
 * with (l, c), so no two chunks are the same page for page. "iid": one template of pure noise
 * (no structure: the worst case for pruning).
 */
function growTemplates(chunk: number, iid: boolean): Float32Array[] {
  const row = HKV * D, n = iid ? 1 : 16;
  const out: Float32Array[] = [];
  const u = uniformStream(12345);
  for (let j = 0; j < n; j++) {
    const centre = new Float32Array(row);
    if (!iid) for (let c = 0; c < row; c++) centre[c] = 1.5 * u();
    const t = new Float32Array(2 * chunk * row);
    for (let i = 0; i < t.length; i++) t[i] = centre[i % row] + (iid ? 1 : 0.5) * u();
    out.push(t);
  }
  return out;
}

/** --grow-band: the feeds timed at every checkpoint, "argmax" or a calibration band (checked here, before any fill). */
const growFeeds = (args["grow-band"] || "argmax").split(",").map((f) => f.trim());
for (const f of growFeeds) if (f !== "argmax") bandStart(Number(f));
const growHier = args["grow-hier"].split(",").map((h) => h.trim()) as ("off" | "on" | "auto")[];
for (const h of growHier) if (h !== "off" && h !== "on" && h !== "auto") throw new RangeError(`--grow-hier takes off, on and auto (got ${h})`);
const growEnvs = parseEnvs(args["grow-env"], "--grow-env");
const growRounds = Number(args["grow-rounds"]);
if (!Number.isInteger(growRounds) || growRounds < 1) throw new RangeError(`--grow-rounds takes a positive integer (got ${args["grow-rounds"]})`);
const growSaved = new Map<string, string | undefined>();
for (const env of growEnvs) for (const [k] of env) growSaved.set(k, process.env[k]);
/** Puts the environment back as it was at start, then sets `env` (process.env reaches the addon's getenv). */
function applyEnv(saved: Map<string, string | undefined>, env: readonly (readonly [string, string])[]): void {
  for (const [k, v] of saved) if (v === undefined) delete process.env[k]; else process.env[k] = v;
  for (const [k, v] of env) process.env[k] = v;
}

async function grow(engine: Engine, model: Model, spec: string): Promise<{ points: GrowPoint[]; memory: GrowMemory[] }> {
  const points: GrowPoint[] = [], memory: GrowMemory[] = [];
  const chunk = 4096, row = HKV * D;
  const tpl = growTemplates(chunk, args["grow-keys"] === "iid");
  const geo = { layers: LAYERS, qHeads: HQ, kvHeads: HKV, headDim: D, kvDtype: DType.D_TYPE_BFLOAT16 };
  const r = { ...retrieval("freekv"), combine: RETRIEVAL_NAMES.combine.mean };
  const shmUsed = () => shmMiB().used * 2 ** 20;
  for (const part of spec.split(",")) {
    const [bs, cs] = part.split(":");
    const batch = Number(bs), contexts = cs.split("/").map(Number);
    if (!Number.isInteger(batch) || batch < 1 || !contexts.every((c) => Number.isInteger(c) && c > 0)) throw new RangeError(`--grow: bad part ${part}`);
    const perCheckpoint = growRounds * growEnvs.length * growFeeds.length * growHier.length * (3 + STEPS) + 8;
    const capacity = Math.max(...contexts) + perCheckpoint * contexts.length + 64;
    const sessions: LocalSession[] = [];
    const shm0 = shmUsed();
    try {
      for (let b = 0; b < batch; b++) sessions.push(createLocalSession(engine, geo, r, capacity));
      let growSeed = 12345;
      const growToken = (band: number) => band + (((growSeed = (Math.imul(growSeed, 1103515245) + 12345) >>> 0) >>> 16) % BAND_ROWS);
      let tokens = Int32Array.from(sessions.map((_, b) => (b * 7919 + 13) % V));
      for (const ctx of contexts) {
        // Fill every session to ctx tokens (the decode steps before added some already).
        const f0 = performance.now();
        for (const [b, s] of sessions.entries()) {
          const have = engine.contextTokens(s.session);
          for (let l = 0; l < LAYERS; l++)
            for (let t = have; t < ctx; t += chunk) {
              const m = Math.min(chunk, ctx - t), ci = Math.floor(t / chunk);
              const src = tpl[(l * 7 + ci * 13 + b * 5) % tpl.length];
              const off = ((l * 977 + ci * 131 + b * 17) % chunk) * row;
              const k = src.subarray(off, off + m * row);
              const v = tpl[(l + ci + 1) % tpl.length].subarray(off, off + m * row);
              await engine.prefill(s.session, l, k, v, m);
            }
        }
        for (const s of sessions) await engine.sync(s.session);
        const fillS = (performance.now() - f0) / 1000;
        const used = shmUsed() - shm0;
        const mem: GrowMemory = { batch, context: ctx, fillS, shmUsedGiB: used / 2 ** 30, shmBytesPerToken: used / (batch * ctx), vmPteKiB: procStatusKiB("VmPTE"), rssGiB: procStatusKiB("VmRSS") / 2 ** 20 };
        memory.push(mem);
        log(`grow b${batch} filled to ${ctx} in ${fillS.toFixed(1)} s: /dev/shm +${mem.shmUsedGiB.toFixed(2)} GiB (${mem.shmBytesPerToken.toFixed(0)} B/token), VmPTE ${mem.vmPteKiB} KiB, RSS ${mem.rssGiB.toFixed(2)} GiB`);
        const runs: { round: number; feed: string; hier: (typeof growHier)[number]; env: (typeof growEnvs)[number] }[] = [];
        for (let round = 0; round < growRounds; round++)
          for (const feed of growFeeds) for (const hier of growHier) for (const env of growEnvs) runs.push({ round, feed, hier, env });
        for (const { round, feed, hier, env } of runs) {
          const growBand = feed === "argmax" ? undefined : bandStart(Number(feed));
          const envLabel = env.map(([k, v]) => `${k}=${v}`).join(" ");
          const gp: GrowPoint = { batch, context: ctx, feed, hierarchical: hier, env: envLabel || undefined, round: growRounds > 1 ? round : undefined };
          try {
            applyEnv(growSaved, env);
            engine.setHierarchicalSelection(hier);
            const ids = Int32Array.from(sessions.map((s) => s.session));
            const s0 = engine.stats(sessions[0].session);
            const times: number[] = [];
            for (let step = 0; step < 3 + STEPS; step++) {
              const t0 = performance.now();
              const logits = await model.decode(ids, tokens, Int32Array.from(sessions.map((s) => engine.contextTokens(s.session))));
              const ms = performance.now() - t0;
              if (step >= 3) times.push(ms);
              const next = new Int32Array(batch);
              for (let b = 0; b < batch; b++) {
                if (growBand !== undefined) {
                  next[b] = growToken(growBand);
                  continue;
                }
                let best = 0;
                for (let v = 1; v < V; v++) if (logits[b * V + v] > logits[b * V + best]) best = v;
                next[b] = best;
              }
              tokens = next;
            }
            const d0 = performance.now();
            for (const s of sessions) await engine.sync(s.session);
            gp.drainMs = performance.now() - d0;
            const s1 = engine.stats(sessions[0].session);
            gp.stepMs = median(times);
            gp.minMs = Math.min(...times);
            gp.maxMs = Math.max(...times);
            const steps = Math.max(1, Number(s1.decodeSteps) - Number(s0.decodeSteps));
            gp.recallMBPerStep = (Number(s1.recallBytes) - Number(s0.recallBytes)) / steps / 1e6;
            gp.corrections = Number(s1.selections) - Number(s0.selections) ? (Number(s1.corrections) - Number(s0.corrections)) / (Number(s1.selections) - Number(s0.selections)) : 0;
          } catch (e) {
            gp.error = (e as Error).message;
          }
          points.push(gp);
          log(`grow b${batch} ctx ${ctx} ${feed === "argmax" ? "argmax" : "band " + feed} hierarchical ${hier}${envLabel ? " " + envLabel : ""}: ` + (gp.error ? `error: ${gp.error}` : `${gp.stepMs!.toFixed(2)} ms/step (min ${gp.minMs!.toFixed(2)}, max ${gp.maxMs!.toFixed(2)}), drain ${gp.drainMs!.toFixed(2)} ms, recall ${gp.recallMBPerStep!.toFixed(1)} MB/step, corrections ${(100 * gp.corrections!).toFixed(1)}%`));
        }
        engine.setHierarchicalSelection("auto");
        applyEnv(growSaved, []);
        writeFileSync(join(args.out!, "runner-grow.json"), JSON.stringify({ date: new Date().toISOString(), shape: args.shape, layers: LAYERS, steps: STEPS, keys: args["grow-keys"], feeds: growFeeds, points, memory }, null, 2));
      }
    } catch (e) {
      log(`grow b${batch}: error: ${(e as Error).message}`);
      points.push({ batch, context: -1, feed: "", hierarchical: "", error: (e as Error).message });
    } finally {
      for (const s of sessions) await s.close();
    }
  }
  return { points, memory };
}

if (args.grow) {
  const g = await grow(engine, model, args.grow);
  log("");
  // One row per checkpoint, feed and environment: the median over the rounds of each setting.
  log(`| batch | context | feed | environment | ${growHier.map((h) => `hierarchical ${h} ms / step`).join(" | ")} |`);
  log(`| --- | --- | --- | --- | ${growHier.map(() => "---").join(" | ")} |`);
  const rows = new Map<string, GrowPoint[]>();
  for (const p of g.points) {
    const key = `${p.batch}|${p.context}|${p.feed}|${p.env ?? ""}`;
    rows.set(key, [...(rows.get(key) ?? []), p]);
  }
  for (const [key, ps] of rows) {
    const [b, c, feed, env] = key.split("|");
    const cells = growHier.map((h) => {
      const ms = ps.filter((p) => p.hierarchical === h && p.stepMs !== undefined).map((p) => p.stepMs!);
      return ms.length ? median(ms).toFixed(2) + (ms.length > 1 ? ` (${ms.map((m) => m.toFixed(2)).join(", ")})` : "") : (ps.find((p) => p.hierarchical === h)?.error ?? "");
    });
    log(`| ${b} | ${c} | ${feed} | ${env || "-"} | ${cells.join(" | ")} |`);
  }
  writeFileSync(join(args.out!, "runner-grow.json"), JSON.stringify({ date: new Date().toISOString(), shape: args.shape, layers: LAYERS, steps: STEPS, keys: args["grow-keys"], feeds: growFeeds, ...g }, null, 2));
  process.exit(0);
}

const results: Point[] = [];
const plan = [
  ...(args.sweep ? args.sweep.split(",").map((mode) => ({ p: points[0], mode })) : []),
  ...points.flatMap((p) => modes.filter((m) => m !== "").map((mode) => ({ p, mode }))),
];
const matchCosine = args["match-cosine"] ? Number(args["match-cosine"]) : NaN;
if (args.calibrated && !(Number.isFinite(matchCosine) && args.sweep)) throw new RangeError("--calibrated needs --sweep and --match-cosine");
let chosen: { band: string; cosMean: number } | undefined;
for (let i = 0; i < plan.length; i++) {
  const { p, mode } = plan[i];
  const on = mode.split("@")[0].replace(/-pool[1-8]$/, "").endsWith("-direct") ? direct! : { engine, model };
  const r = await timePoint(addon, on.engine, on.model, p.batch, p.context, mode);
  results.push(r);
  log(
    `b${r.batch} ctx ${r.context} ${r.mode}: ` +
      (r.error ? `error: ${r.error}` : `${r.stepMs!.toFixed(2)} ms/step (min ${r.minMs!.toFixed(2)}; with the final drain of ${r.drainMs!.toFixed(2)} ms, ${r.throughputMs!.toFixed(2)} ms a step)${r.sameAs ? `, logits ${r.sameAs}` : ""}, corrections ${(100 * r.correctionRate!).toFixed(1)}%, query cosine ${r.dynamics!.cosMean.toFixed(3)} (${r.dynamics!.belowTauPct.toFixed(1)}% below tau), top-k overlap ${r.dynamics!.overlapPct.toFixed(1)}%, recall ${r.recallMBPerStep!.toFixed(1)} MB/step a session (${r.batchRecallMBPerStep!.toFixed(1)} MB the batch); ${r.graph}`) +
      (r.ts ? `; Generate TS: ${r.ts.tsMs.toFixed(2)} ms of ${r.ts.wallMs.toFixed(2)} ms (${r.ts.sharePct.toFixed(2)}%)` : "") +
      (r.memory
        ? `; memory per session: device ${r.memory.deviceMiBPerSession.toFixed(0)} MiB, host (/dev/shm) ${r.memory.shmMiBPerSession.toFixed(0)} MiB; sessions that fit: ${r.memory.sessionsByDevice} by the free device memory (${(r.memory.deviceFreeMiB / 1024).toFixed(1)} GiB), ${r.memory.sessionsByHost} by the free /dev/shm (${(r.memory.shmFreeMiB / 1024).toFixed(1)} GiB)`
        : ""),
  );
  // The sweep is done: choose the band nearest the target cosine and queue the calibrated modes.
  const sweepEnd = args.sweep ? args.sweep.split(",").length : 0;
  if (args.calibrated && i === sweepEnd - 1) {
    const swept = results.filter((x) => !x.error && x.mode.includes("@") && Number.isFinite(x.dynamics?.cosMean));
    if (swept.length === 0) log("calibration: no sweep point measured a cosine; calibrated modes skipped");
    else {
      const best = swept.reduce((a, b) => (Math.abs(b.dynamics!.cosMean - matchCosine) < Math.abs(a.dynamics!.cosMean - matchCosine) ? b : a));
      chosen = { band: best.mode.split("@")[1], cosMean: best.dynamics!.cosMean };
      log(`calibration: band ${chosen.band} (measured mean query cosine ${chosen.cosMean.toFixed(3)}) is nearest the target ${matchCosine}`);
      for (const pt of points) for (const m of args.calibrated.split(",")) plan.push({ p: pt, mode: `${m}@${chosen.band}` });
    }
  }
}

log("");
log(`sessions: budget ${SESSION.sinkTokens}+${SESSION.selectTokens}+${SESSION.windowTokens}, pages of ${SESSION.pageSize}, tau ${SESSION.tau}, dense layers [${SESSION.denseLayers.join(",")}]`);
log("| batch | context | mode | ms / step (median) | HBM floor ms | x floor | corrections | query cosine (below tau) | top-k overlap | recall MB / step (a session; the batch) |");
log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
for (const r of results)
  log(
    `| ${r.batch} | ${r.context} | ${r.mode} | ${r.error ? "error" : r.stepMs!.toFixed(2)} | ${r.floorMs!.toFixed(2)} | ${r.error ? "" : (r.stepMs! / r.floorMs!).toFixed(1)} | ` +
      `${r.error ? "" : (100 * r.correctionRate!).toFixed(1) + "%"} | ${r.error ? "" : `${r.dynamics!.cosMean.toFixed(3)} (${r.dynamics!.belowTauPct.toFixed(0)}%)`} | ${r.error ? "" : r.dynamics!.overlapPct.toFixed(1) + "%"} | ${r.error ? r.error : `${r.recallMBPerStep!.toFixed(1)}; ${r.batchRecallMBPerStep!.toFixed(1)}`} |`,
  );
writeFileSync(join(args.out!, "runner-bench.json"), JSON.stringify({ date: new Date().toISOString(), shape: args.shape, backend: BACKEND, environment: addonSettings, calibrationBands: { rho: CALIBRATION_BANDS, rows: BAND_ROWS }, keys: args.keys, calibration: chosen ? { matchCosine, ...chosen } : null, layers: LAYERS, steps: STEPS, warmup: WARMUP, retrieval: SESSION, hbmGBps: HBM_GBPS, backendInfo: info, prefill: prefillPoints, results }, null, 2));
process.exit(0);
