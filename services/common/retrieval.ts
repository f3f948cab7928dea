/**
 * Retrieval configuration of a session with the defaults of DESIGN.md section 2 (page 32,
 * sink 512, window 512, select 1024, tau 0.9, max/min summaries, softmax-mean group combine,
 * freekv mode, gather recall), validated with errors naming the field.
 */
import { GroupCombine, RecallMode, RetrievalMode, SummaryKind, type RetrievalConfig } from "../../proto/gen/freekv/v1/common.js";
import type { Retrieval } from "../../native/binding.js";
import { invalidArgument } from "./errors.js";

export const RETRIEVAL_DEFAULTS = {
  pageSize: 32,
  sinkTokens: 512,
  windowTokens: 512,
  selectTokens: 1024,
  tau: 0.9,
} as const;

export const MAX_PAGE_SIZE = 4096;

function enumIn<T extends number>(field: string, v: T, dflt: T, allowed: readonly number[]): T {
  if (v === 0) return dflt;
  if (!allowed.includes(v)) throw invalidArgument(field, `unknown value ${v}`);
  return v;
}

/** Fills defaults and validates; the result has every field set (tau_set = true). */
export function resolveRetrieval(r: RetrievalConfig | undefined, layers: number, prefix = "retrieval"): RetrievalConfig {
  const src: Partial<RetrievalConfig> = r ?? {};
  const pageSize = src.pageSize || RETRIEVAL_DEFAULTS.pageSize;
  if (!Number.isInteger(pageSize) || pageSize < 1 || pageSize > MAX_PAGE_SIZE) {
    throw invalidArgument(`${prefix}.page_size`, `must be in [1, ${MAX_PAGE_SIZE}], got ${pageSize}`);
  }
  const tokens = (name: string, v: number | undefined, dflt: number, min: number): number => {
    const t = v || dflt;
    if (!Number.isInteger(t) || t < min) throw invalidArgument(`${prefix}.${name}`, `must be an integer >= ${min}, got ${t}`);
    if (t % pageSize !== 0) throw invalidArgument(`${prefix}.${name}`, `must be a multiple of page_size (${pageSize}), got ${t}`);
    return t;
  };
  const sinkTokens = tokens("sink_tokens", src.sinkTokens, RETRIEVAL_DEFAULTS.sinkTokens, 0);
  const windowTokens = tokens("window_tokens", src.windowTokens, RETRIEVAL_DEFAULTS.windowTokens, pageSize);
  const selectTokens = tokens("select_tokens", src.selectTokens, RETRIEVAL_DEFAULTS.selectTokens, pageSize);
  const tau = src.tauSet || (src.tau ?? 0) !== 0 ? (src.tau ?? 0) : RETRIEVAL_DEFAULTS.tau;
  if (!Number.isFinite(tau)) throw invalidArgument(`${prefix}.tau`, `must be finite, got ${tau}`);
  const summary = enumIn(`${prefix}.summary`, src.summary ?? 0, SummaryKind.SUMMARY_KIND_MAX_MIN, [1, 2]);
  const combine = enumIn(`${prefix}.combine`, src.combine ?? 0, GroupCombine.GROUP_COMBINE_SOFTMAX_MEAN, [1, 2, 3]);
  const mode = enumIn(`${prefix}.mode`, src.mode ?? 0, RetrievalMode.RETRIEVAL_MODE_FREEKV, [1, 2, 3, 4, 5]);
  const recall = enumIn(`${prefix}.recall`, src.recall ?? 0, RecallMode.RECALL_MODE_GATHER, [1, 2]);
  const denseLayers = [...(src.denseLayers ?? [])];
  const seen = new Set<number>();
  denseLayers.forEach((l, i) => {
    if (!Number.isInteger(l) || l < 0 || l >= layers) throw invalidArgument(`${prefix}.dense_layers[${i}]`, `must be a layer in [0, ${layers - 1}], got ${l}`);
    if (seen.has(l)) throw invalidArgument(`${prefix}.dense_layers[${i}]`, `layer ${l} listed twice`);
    seen.add(l);
  });
  denseLayers.sort((a, b) => a - b);
  return { pageSize, sinkTokens, windowTokens, selectTokens, tau, tauSet: true, summary, combine, mode, recall, denseLayers };
}

export function toNativeRetrieval(r: RetrievalConfig): Retrieval {
  return {
    pageSize: r.pageSize,
    sinkTokens: r.sinkTokens,
    windowTokens: r.windowTokens,
    selectTokens: r.selectTokens,
    tau: r.tau,
    summary: r.summary as number,
    combine: r.combine as number,
    mode: r.mode as number,
    recall: r.recall as number,
    denseLayers: [...r.denseLayers],
  };
}
