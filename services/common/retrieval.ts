/**
 * Retrieval configuration of a session: the names of the enum values (the one table that command
 * lines, the fidelity harness, tests and scripts use), and defaults and validation, which are the
 * native contract's (native/src/engine/Retrieval.h and Validate.cpp, through native/shm.ts): this
 * module only maps between the wire form (proto, 0 = unset) and the binding form.
 */
import { DType, GroupCombine, RecallMode, RetrievalMode, SummaryKind, type RetrievalConfig } from "../../proto/gen/freekv/v1/common.js";
import { loadShm, type Retrieval, type RetrievalError } from "../../native/shm.js";
import { invalidArgument } from "./errors.js";

/** Enum value names (the proto's, without the prefix, lower case) to the proto's numbers. */
export const RETRIEVAL_NAMES = {
  kvDtype: { float32: DType.D_TYPE_FLOAT32, bfloat16: DType.D_TYPE_BFLOAT16, float16: DType.D_TYPE_FLOAT16 },
  summary: { max_min: SummaryKind.SUMMARY_KIND_MAX_MIN, cuboid_mean: SummaryKind.SUMMARY_KIND_CUBOID_MEAN },
  combine: { softmax_mean: GroupCombine.GROUP_COMBINE_SOFTMAX_MEAN, mean: GroupCombine.GROUP_COMBINE_MEAN, max: GroupCombine.GROUP_COMBINE_MAX },
  mode: {
    freekv: RetrievalMode.RETRIEVAL_MODE_FREEKV,
    dense: RetrievalMode.RETRIEVAL_MODE_DENSE,
    oracle: RetrievalMode.RETRIEVAL_MODE_ORACLE,
    speculative: RetrievalMode.RETRIEVAL_MODE_SPECULATIVE,
    sink_window: RetrievalMode.RETRIEVAL_MODE_SINK_WINDOW,
    resident_sparse: RetrievalMode.RETRIEVAL_MODE_RESIDENT_SPARSE,
  },
  recall: { gather: RecallMode.RECALL_MODE_GATHER, double_buffer: RecallMode.RECALL_MODE_DOUBLE_BUFFER },
} as const;

export type ModeName = keyof typeof RETRIEVAL_NAMES.mode;
export type RecallName = keyof typeof RETRIEVAL_NAMES.recall;
export const MODE_NAMES = Object.keys(RETRIEVAL_NAMES.mode) as ModeName[];

/** Largest sink, window or selection a request may ask for (the default FREEKV_MAX_CONTEXT_LIMIT; the native validator's kMaxRetrievalTokens, native/src/engine/Retrieval.h). */
export const MAX_RETRIEVAL_TOKENS = 1 << 20;

let defaults: Readonly<Retrieval> | undefined;

/** The native table of defaults (DESIGN.md section 2: page 32, sink 512, window 512, select 1024, tau 0.9, ...). */
export function retrievalDefaults(): Readonly<Retrieval> {
  defaults ??= Object.freeze(loadShm().retrievalDefaults());
  return defaults;
}

/** The native validator's verdict on a binding-form config; null when valid. */
export function validateRetrieval(r: Partial<Retrieval>, layers: number): RetrievalError | null {
  return loadShm().validateRetrieval(r, layers);
}

/** The wire's name of a binding field ("denseLayers[1]" -> "dense_layers[1]"). */
const wireField = (f: string) => f.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

/**
 * Fills defaults (a proto field left 0 is unset; tau only with tau_set or non-zero) and validates
 * with the native validator; INVALID_ARGUMENT names `<prefix>.<proto field>`. The result has every
 * field set (tau_set = true) and the dense layers sorted. Sink, window and selection above
 * MAX_RETRIEVAL_TOKENS are refused; with `maxContextTokens`, they are capped at the session's
 * capacity (a larger one attends the same tokens).
 */
export function resolveRetrieval(r: RetrievalConfig | undefined, layers: number, prefix = "retrieval", maxContextTokens?: number): RetrievalConfig {
  const src: Partial<RetrievalConfig> = r ?? {};
  const d = retrievalDefaults();
  // Before any memory is sized by them (the engine allocates select/sink/window slots per layer).
  for (const f of ["sinkTokens", "windowTokens", "selectTokens"] as const) {
    const v = src[f] ?? 0;
    if (v > MAX_RETRIEVAL_TOKENS) throw invalidArgument(`${prefix}.${wireField(f)}`, `must be <= ${MAX_RETRIEVAL_TOKENS}, got ${v}`);
  }
  const native: Retrieval = {
    pageSize: src.pageSize || d.pageSize,
    sinkTokens: src.sinkTokens || d.sinkTokens,
    windowTokens: src.windowTokens || d.windowTokens,
    selectTokens: src.selectTokens || d.selectTokens,
    tau: src.tauSet || (src.tau ?? 0) !== 0 ? (src.tau ?? 0) : d.tau,
    summary: src.summary || d.summary,
    combine: src.combine || d.combine,
    mode: src.mode || d.mode,
    recall: src.recall || d.recall,
    denseLayers: [...(src.denseLayers ?? [])],
  };
  // Integers the native validator takes as 32-bit: anything larger is refused here, naming the
  // field (a uint32 page size of 2^32 - 1 would otherwise fail the binding's own range check).
  for (const f of ["pageSize", "summary", "combine", "mode", "recall"] as const)
    if (!(native[f] >= 0 && native[f] <= MAX_RETRIEVAL_TOKENS)) throw invalidArgument(`${prefix}.${wireField(f)}`, `is out of range, got ${native[f]}`);
  native.denseLayers.forEach((l, i) => {
    if (!(l >= 0 && l <= MAX_RETRIEVAL_TOKENS)) throw invalidArgument(`${prefix}.dense_layers[${i}]`, `is out of range, got ${l}`);
  });
  const e = validateRetrieval(native, layers);
  if (e) throw invalidArgument(`${prefix}.${wireField(e.field)}`, e.message);
  if (maxContextTokens !== undefined && Number.isInteger(maxContextTokens) && maxContextTokens >= 1) {
    // A session never holds more than its capacity (max context rounded up to a page): a larger
    // sink, window or selection attends the same tokens and only costs memory.
    const cap = Math.ceil(maxContextTokens / native.pageSize) * native.pageSize;
    native.sinkTokens = Math.min(native.sinkTokens, cap);
    native.windowTokens = Math.min(native.windowTokens, cap);
    native.selectTokens = Math.min(native.selectTokens, cap);
  }
  native.denseLayers.sort((a, b) => a - b);
  return { ...native, tauSet: true };
}

export function toNativeRetrieval(r: RetrievalConfig): Retrieval {
  return {
    pageSize: r.pageSize,
    sinkTokens: r.sinkTokens,
    windowTokens: r.windowTokens,
    selectTokens: r.selectTokens,
    tau: r.tau,
    summary: r.summary,
    combine: r.combine,
    mode: r.mode,
    recall: r.recall,
    denseLayers: [...r.denseLayers],
  };
}
