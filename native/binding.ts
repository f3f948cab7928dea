/**
 * The whole JavaScript <-> native contract of the `freekv` addon, typed in one place.
 * Nothing else in the project touches the raw addon: import from here.
 *
 * The addon is loaded from `native/build/Release/freekv.node` (or FREEKV_ADDON). Its shared-memory
 * segments and contract functions (native/shm.ts) are also built alone as freekv_shm.node, which
 * is what the kvstore loads. It always has
 * the CPU backend; when it was built with nvcc it also has the CUDA backend, which reports
 * "no CUDA device" cleanly on machines without one (`backendInfo().cuda.reason`).
 */
import { loadNative, type Contract, type Geometry, type Retrieval, type ShmSegment, type ShmSegmentStatic, type TeardownStats } from "./shm.js";

// ---------------------------------------------------------------------------------------------
// Device probe

export interface CudaInfo {
  available: boolean;
  deviceCount: number;
  runtimeVersion?: number;
  driverVersion?: number;
  name?: string;
  computeCapability?: string;
  totalMemory?: number;
  smCount?: number;
  /** Why CUDA is unavailable, starting with "no CUDA device". */
  reason?: string;
}

export interface BackendInfo {
  /** Whether this build contains the CUDA backend. */
  cudaBuilt: boolean;
  cuda: CudaInfo;
  /** Backends usable on this machine now: always "cpu", plus "cuda" when a device is there. */
  backends: Array<"cpu" | "cuda">;
}

// ---------------------------------------------------------------------------------------------
// Shared memory and the contract (native/shm.ts; numeric enums are the proto's)

export type { Contract, EnumNames, Geometry, ManifestState, NativeLayout, Retrieval, RetrievalError, ShmSegment, ShmSegmentStatic } from "./shm.js";

// ---------------------------------------------------------------------------------------------
// Engine

/** The kvstore's segments of one session, mapped in this process. */
export interface HostSegments {
  store: ShmSegment;
  staging: ShmSegment;
  tail: ShmSegment;
  manifest: ShmSegment;
  capacityPages: number;
  /**
   * Pages of each layer's store the kvstore committed memory for (its reservation); appends that
   * would fill a page past it are refused. Left out: capacityPages.
   */
  reservedPages?: number;
}

export interface EngineStats {
  decodeSteps: number;
  selections: number;
  corrections: number;
  pagesSelected: number;
  pagesHit: number;
  pagesRecalled: number;
  recallBytes: number;
  pagesOffloaded: number;
  offloadBytes: number;
  contextTokens: number;
  /** Resident head-pages of the device tier that the attention reads (sink + window + selected; every page of a dense layer); pages kept in the extra slots of FREEKV_RESIDENT_FACTOR are not counted. */
  residentPages: number;
  /** Decode calls whose attention waited for its layer's in-flight speculative recall. */
  recallWaits: number;
  /** Speculative recalls that waited for the current attention to release the slots before writing. */
  guardWaits: number;
  /**
   * Per layer (native/src/engine/RetrievalStats.h); selections .. pagesRecalled above are their
   * sums, recallBytes = pagesRecalled * head-page bytes.
   */
  layers: LayerEngineStats[];
}

/**
 * One layer's retrieval counters and dynamics (native/src/engine/RetrievalStats.h). A decode that
 * is not the first after a prefill samples, per KV head, the adjacent-query cosine (the mean over
 * the group's query heads of cos(q_t, q_{t-1}), every mode and layer) and, on a retrieval layer
 * whose previous decode attended a selection too, the top-k overlap of the selected pages.
 */
export interface LayerEngineStats {
  selections: number;
  corrections: number;
  pagesSelected: number;
  pagesHit: number;
  pagesRecalled: number;
  cosineSamples: number;
  /** Samples below the session's tau (the correction's test, whether or not the layer corrects). */
  cosineBelowTau: number;
  cosineSum: number;
  cosineSumSq: number;
  /** 0 without samples. */
  cosineMin: number;
  /** kCosineBuckets counts; bucket i holds [edges[i-1], edges[i]) of `cosineBucketEdges()`. */
  cosineHistogram: number[];
  /** Of the selected pages attention read (overlapBase), those it also read at the previous step. */
  overlapPages: number;
  overlapBase: number;
}

export interface DecodeInput {
  session: number;
  /** [qHeads * headDim] */
  q: Float32Array;
  /** [kvHeads * headDim] */
  k: Float32Array;
  v: Float32Array;
}

export interface EngineOptions {
  backend: "cpu" | "cuda";
  /** CPU worker threads (default: all cores but one, which the background recall thread uses). */
  threads?: number;
  /** CUDA device ordinal (default 0). */
  device?: number;
  /**
   * CUDA backend: the GPU model runner's decode steps become CUDA graphs, replayed once their
   * shape repeats (default true). false issues every op of a step directly: the same operations
   * in the same order, bit-identical results (parity and benchmarks compare the two).
   */
  cudaGraphs?: boolean;
  /**
   * CUDA backend, a diagnostic (default false): time each graphed step's side-stream work
   * (DeviceStepStats.sideMs). The host then waits for the previous step's side-stream work
   * before issuing the next, so step times change.
   */
  sideTiming?: boolean;
  /**
   * CUDA backend: device memory (bytes) that the prompts being prefilled may keep resident (each
   * layer's whole context, so a chunk attends to the earlier chunks without reading them back
   * from the host store). A prefill that does not fit reads its earlier pages back from the host
   * store at every chunk instead (slower, same result). 0 or absent: a quarter of the device.
   */
  prefillContextBytes?: number;
  /**
   * Page selection through the hierarchical page summaries (groups of 32 pages with their own
   * bounds; branch and bound over them): "auto" (default; the CPU backend goes hierarchical from
   * 4096 candidate pages per KV head on, the CUDA backend above 16384, where each is faster than
   * scanning every page), "on" or "off" (scan every candidate page). With the mean and max
   * combines, and softmax_mean with one query head per KV head, the selected pages are exactly the
   * flat scan's; softmax_mean with several query heads weighs the heads by the softmax over the
   * group bounds instead of over every page on the CPU backend, and scans every page on the CUDA
   * backend (native/src/engine/Hierarchy.h).
   */
  hierarchicalSelection?: "auto" | "on" | "off";
  /**
   * Tests only (CPU backend): every background recall sleeps this long before writing the
   * slots, to show that attention never reads a slot that a recall is writing.
   */
  debugRecallDelayMs?: number;
  /**
   * Tests only (CPU backend): every decode sleeps this long while it holds its layer's slots,
   * before reading them, so a recall that did not wait for attention would overwrite them.
   */
  debugAttendDelayMs?: number;
  /**
   * Tests only (CPU backend): every this-many-th background recall fails after planning its slots
   * and before writing them (0: none). The decode that meets such a failure makes the selection
   * itself and recalls it, blocking (the same pages attended); the failure is reported through
   * takeBackgroundFailures.
   */
  debugRecallFailEvery?: number;
}

/**
 * The FreeKV engine. All methods that compute return promises (native work runs off the event
 * loop); calls on one engine are serialised natively. Invalid arguments throw TypeError /
 * RangeError synchronously or reject with an Error whose message names the argument.
 */
export interface Engine {
  readonly backend: "cpu" | "cuda";
  /**
   * Creates a session over the kvstore's segments (kept referenced while the session lives; close
   * the session before closing them). With `reattach`, the session is rebuilt from the store's
   * committed pages, tail and manifest and continues with the outputs the previous process
   * would have produced. Retrieval fields left out take the engine defaults.
   */
  createSession(geometry: Geometry, retrieval: Retrieval, host: HostSegments, reattach: boolean): number;
  /** Waits for the session's background recalls, then frees it. */
  closeSession(session: number): void;
  /**
   * closeSession with the engine's work (waiting for the device, unregistering the host store)
   * on a worker thread; the session takes no calls meanwhile and its segments stay pinned until
   * the promise resolves.
   */
  closeSessionAsync(session: number): Promise<void>;
  /**
   * The kvstore's reservation of the session grew to `reservedPages` pages per layer: those pages
   * may now be written (the CUDA backend registers the new range). Never shrinks; at most the
   * session's capacityPages (RangeError otherwise).
   */
  reserveStore(session: number, reservedPages: number): void;
  /** Appends n tokens: k, v are [n][kvHeads][headDim] float32. */
  prefill(session: number, layer: number, k: Float32Array, v: Float32Array, n: number): Promise<void>;
  /** Appends n tokens and returns exact causal attention of q ([n][qHeads][headDim]). */
  prefillAttend(session: number, layer: number, q: Float32Array, k: Float32Array, v: Float32Array, n: number): Promise<Float32Array>;
  /** One decode step of one layer for a batch of sessions; one output [qHeads*headDim] per item. */
  decode(layer: number, items: DecodeInput[]): Promise<Float32Array[]>;
  /** Waits for a session's background recalls. */
  sync(session: number): Promise<void>;
  stats(session: number): EngineStats;
  /**
   * How the GPU model runner's decode steps on this engine were issued: one CUDA graph launch
   * (replays), captured (captures, or updates of a cached graph of the same op sequence), or op by
   * op (direct). All zero on the CPU backend. EngineOptions.cudaGraphs = false turns graphs off.
   */
  deviceStepStats(): DeviceStepStats;
  /**
   * Failures of the engine's background work that no call was answered with, since the last call:
   * the newest 64, and how many more were not kept. A registration of a prompt's host store ahead
   * of its chunks (CUDA), a speculative recall of a session that closed, a speculative recall that
   * failed (CPU: the next decode, sync or prefill of that layer forgets the layer's slots, and a
   * decode makes the same selection itself and recalls it, blocking, so its output is unchanged).
   */
  takeBackgroundFailures(): { failures: Array<{ session: number; message: string }>; dropped: number };
  contextTokens(session: number): number;
  /** Switches hierarchical page selection (EngineOptions.hierarchicalSelection) for the selections from now on. */
  setHierarchicalSelection(mode: "auto" | "on" | "off"): void;
  /**
   * Full pages of a layer whose offload to the host store is complete (the session manifest's
   * committed pages of the layer): what may be committed at the kvstore.
   */
  filledPages(session: number, layer: number): number;
  /** Token positions attended at the latest decode step of (layer, kvHead), sorted. */
  lastAttendedTokens(session: number, layer: number, kvHead: number): Int32Array;
}

export interface DeviceStepStats {
  steps: number;
  direct: number;
  captures: number;
  updates: number;
  replays: number;
  /** Stream operations of the latest step. */
  ops: number;
  /** Host milliseconds spent capturing and instantiating or updating graphs, in total. */
  captureMs: number;
  /** Host milliseconds from BeginDeviceStep until each step was issued (direct: launches included), summed. */
  hostMs: number;
  /** Device milliseconds from each step's first to last main-stream operation, summed (direct: idle gaps included). */
  deviceMs: number;
  /** Host milliseconds issuing the side stream's speculative work after each graph launch, summed. */
  sideIssueMs: number;
  /** Host milliseconds waiting for each step's main stream (EndDeviceStep), summed. */
  waitMs: number;
  /** Host milliseconds of each step's bookkeeping after that wait (manifests, query records), summed. */
  finishMs: number;
  /** Host milliseconds copying each step's logits out of pinned memory (Model.decode), summed. */
  resultMs: number;
  /** EngineOptions.sideTiming only: device ms of each graphed step's side-stream work (issue to last op), summed over sideSteps. */
  sideMs: number;
  sideSteps: number;
}

export interface EngineStatic {
  new (options: EngineOptions): Engine;
}

// ---------------------------------------------------------------------------------------------
// Model runner

export interface ModelConfigNative {
  /** "llama" | "mistral" | "qwen2" (all decoder-only, RMSNorm, RoPE, SwiGLU, GQA). */
  architecture: string;
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  rmsNormEps: number;
  ropeTheta: number;
  /** Llama-3 style scaling ("llama3"), "linear", or none. */
  ropeScaling?: { type: "llama3" | "linear"; factor: number; lowFreqFactor?: number; highFreqFactor?: number; originalMaxPositionEmbeddings?: number };
  /**
   * Rotary frequencies after scaling, headDim / 2 values (services/compute/model/rope.ts computes
   * them from ropeTheta and ropeScaling; the native side uses them as given).
   */
  ropeInvFreq: Float32Array | number[];
  tieWordEmbeddings: boolean;
  /** q/k/v projections carry a bias (Qwen2). */
  attentionBias: boolean;
}

/** Where one weight tensor lies in a safetensors file (the native side maps the file). */
export interface TensorRef {
  name: string;
  file: string;
  /** Absolute byte offset of the data in the file. */
  offset: number;
  byteLength: number;
  dtype: "F32" | "F16" | "BF16";
  shape: number[];
}

export interface ModelOptions {
  config: ModelConfigNative;
  tensors: TensorRef[];
  /**
   * Attention runs through this engine's sessions. Without it the model keeps a dense KV cache
   * per session number itself (the reference path of the tests; releaseSession frees it).
   */
  engine?: Engine;
  threads?: number;
  /**
   * With a CUDA engine the whole model runs on the GPU (weights uploaded once; a decode step waits
   * for the device once, for its logits). Weight type there: "auto" (default) keeps fp32
   * checkpoints in fp32 (exact fp32 GEMMs) and puts bf16/f16 ones in bf16; "bf16" or "f32" force it.
   */
  deviceWeights?: "auto" | "bf16" | "f32";
}

/**
 * A Model call rejects with an Error. When its input checks failed before anything was appended
 * (a token out of range, a position that is not the session's context, a session made for another
 * model's shapes), the error has `refused: true` and the sessions are as they were; any other
 * error may have come after some layers appended to every session of the call.
 *
 * The calls on one session run one at a time: a call that names a session whose earlier call has
 * not settled throws at once ("has a model call in flight"), and claims none of its sessions.
 */
export interface Model {
  /**
   * Runs a prompt chunk through all layers (prefill attention is exact and causal over the
   * session's whole context) and returns logits: for the last position ([vocab]), or for every
   * position ([n][vocab]) when `allLogits`. startPosition must equal the session's context length.
   */
  prefill(session: number, tokens: Int32Array, startPosition: number, allLogits: boolean): Promise<Float32Array>;
  /** One decode step over all layers for a batch: one token per session; logits [batch][vocab]. */
  decode(sessions: Int32Array, tokens: Int32Array, positions: Int32Array): Promise<Float32Array>;
  /**
   * The same step for greedy decoding: each row's argmax (the first largest logit) [batch]. With
   * the GPU runner the pick happens on the device and only the ids come back.
   */
  decodeArgmax(sessions: Int32Array, tokens: Int32Array, positions: Int32Array): Promise<Int32Array>;
  /**
   * Dense fallback only: forgets a session's KV cache (false when there was none or with an
   * engine). Throws while a call on the session is in flight.
   */
  releaseSession(session: number): boolean;
  readonly vocabSize: number;
  /** "engine" (FreeKV engine sessions) or "dense" (the model's own KV cache). */
  readonly attention: "engine" | "dense";
  /** Where the layers run: "cuda" (the GPU runner, with a CUDA engine) or "cpu". */
  readonly device: "cpu" | "cuda";
  /**
   * Prompt tokens whose prefill attention fills every SM of the device once (the GPU runner's
   * tensor-core kernel: one CTA per 128 query-head rows of one KV head); a prefill chunk of a
   * multiple of it leaves no SM idle in its last wave. 1 where it does not matter (the CPU).
   * Optional for test doubles: unset means 1.
   */
  readonly prefillWaveTokens?: number;
}

export interface ModelStatic {
  /** Maps and converts the weights (synchronously). Throws naming the tensor or config field. */
  new (options: ModelOptions): Model;
  /** The same, with the weights mapped and converted off the event loop. */
  load(options: ModelOptions): Promise<Model>;
}

// ---------------------------------------------------------------------------------------------

export interface Addon extends Contract {
  backendInfo(): BackendInfo;
  /** Opens (true) or closes a CUDA profiler collection range (for `ncu --profile-from-start off`); false without a CUDA device. */
  profilerRange(on: boolean): boolean;
  ShmSegment: ShmSegmentStatic;
  /** As in native/shm.ts: what closed sessions' teardowns waited for this process's foreground work. */
  teardownStats(): TeardownStats;
  Engine: EngineStatic;
  Model: ModelStatic;
  /** Index (relative to offset) of the first largest of values[offset .. offset + n). */
  argmaxF32(values: Float32Array, offset: number, n: number): number;
  /** The temperature / top-k / top-p draw of sampling.ts's sampleJs with the uniform u in [0, 1) (index relative to offset). */
  sampleF32(values: Float32Array, offset: number, n: number, temperature: number, topK: number, topP: number, u: number): number;
  /**
   * sampleF32 of rows of a batch's logits [batch][vocab], off the main thread and over several
   * threads: params holds [temperature, topK, topP, u] per row. Resolves to the tokens. The rows
   * are read in place, not copied (a batch's logits are megabytes): the logits' buffer must not be
   * transferred (postMessage, structuredClone with transfer) until the promise settles; the array
   * itself is kept alive meanwhile.
   */
  sampleRowsAsync(logits: Float32Array, vocab: number, rows: Int32Array, params: Float64Array): Promise<Int32Array>;
}

let cached: Addon | undefined;

/** Loads the addon once. Throws with the paths tried when it is not built. */
export function loadAddon(): Addon {
  cached ??= loadNative<Addon>("freekv.node", process.env.FREEKV_ADDON);
  return cached;
}
