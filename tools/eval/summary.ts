/**
 * Aggregation of scored results: accuracy with its 95% Wilson interval per family x context
 * length x mode (and over all families per context, and per mode overall), and per mode the
 * retrieval counters the service returns with each Generate, summed over the mode's requests.
 */
import type { RetrievalStats } from "../../proto/gen/freekv/v1/common.js";
import type { ModeName } from "../../services/common/retrieval.js";
import type { TaskResult } from "./run.js";
import { FAMILIES, type Family } from "./tasks.js";
import { wilsonInterval } from "./wilson.js";

export interface Accuracy {
  /** Tasks run. */
  n: number;
  /** Tasks with every answer found (in order where the family asks). */
  correct: number;
  /** Requests that failed (counted in n, as wrong). */
  errors: number;
  accuracy: number;
  wilson95: [number, number];
  /** Mean over tasks of the fraction of answers found. */
  answer_fraction: number;
}

export interface Cell extends Accuracy {
  family: Family | "all";
  /** The tasks' target length. */
  context_tokens: number;
  mode: ModeName;
  /** Mean real prompt length in the model's tokens. */
  prompt_tokens_mean: number;
}

/** Per mode, what the service reports of its retrieval, summed over the mode's requests. */
export interface RetrievalSummary {
  decode_steps: number;
  selections: number;
  corrections: number;
  /** corrections / selections (per layer and KV head); 0 when nothing was selected. */
  correction_rate: number;
  pages_selected: number;
  pages_hit: number;
  pages_recalled: number;
  recall_bytes: number;
  /** pages_hit / pages_selected. */
  hit_rate: number;
  /** Head-pages recalled per decode step, all layers and KV heads together. */
  pages_recalled_per_step: number;
  recall_bytes_per_step: number;
  pages_offloaded: number;
  offload_bytes: number;
  /** Per layer (RetrievalStats.layers summed over the mode's requests), in layer order. */
  layers: LayerSummary[];
}

/**
 * One layer's retrieval dynamics over a mode's requests (native/src/engine/RetrievalStats.h): the
 * adjacent-query group cosine (sampled in every mode at each decode but the first after a
 * prefill), its fraction below the sessions' tau (freekv's correction test), and the counters.
 */
export interface LayerSummary {
  layer: number;
  cosine_samples: number;
  /** 0 without samples (and the std, min too). */
  cosine_mean: number;
  cosine_std: number;
  cosine_min: number;
  cosine_below_tau: number;
  /** cosine_below_tau / cosine_samples. */
  cosine_below_tau_fraction: number;
  /** Counts per bucket of `cosine_bucket_edges` (RetrievalStats.cosine_bucket_edges). */
  cosine_histogram: number[];
  cosine_bucket_edges: number[];
  selections: number;
  corrections: number;
  correction_rate: number;
  pages_selected: number;
  pages_recalled: number;
  hit_rate: number;
  /** Of the selected pages attention read, the fraction it also read at the previous step. */
  topk_overlap: number;
}

export function layersOf(rs: readonly TaskResult[]): LayerSummary[] {
  interface Acc {
    samples: number;
    sum: number;
    sq: number;
    min: number;
    below: number;
    hist: number[];
    edges: number[];
    selections: number;
    corrections: number;
    selected: number;
    hit: number;
    recalled: number;
    overlap: number;
    base: number;
  }
  const acc: Acc[] = [];
  for (const r of rs)
    for (const l of r.stats?.layers ?? []) {
      const a = (acc[l.layer] ??= {
        samples: 0, sum: 0, sq: 0, min: Infinity, below: 0, hist: [],
        edges: (r.stats?.cosineBucketEdges ?? []).map((e) => Number(e.toPrecision(6))),
        selections: 0, corrections: 0, selected: 0, hit: 0, recalled: 0, overlap: 0, base: 0,
      });
      if (l.cosineSamples > 0) a.min = Math.min(a.min, l.cosineMin);
      a.samples += l.cosineSamples;
      a.sum += l.cosineSum;
      a.sq += l.cosineSumSq;
      a.below += l.cosineBelowTau;
      l.cosineHistogram.forEach((c, b) => (a.hist[b] = (a.hist[b] ?? 0) + c));
      a.selections += l.selections;
      a.corrections += l.corrections;
      a.selected += l.pagesSelected;
      a.hit += l.pagesHit;
      a.recalled += l.pagesRecalled;
      a.overlap += l.overlapPages;
      a.base += l.overlapBase;
    }
  const out: LayerSummary[] = [];
  acc.forEach((a, layer) => {
    const n = a.samples;
    const mean = n ? a.sum / n : 0;
    out.push({
      layer,
      cosine_samples: n,
      cosine_mean: mean,
      cosine_std: n ? Math.sqrt(Math.max(0, a.sq / n - mean * mean)) : 0,
      cosine_min: n ? a.min : 0,
      cosine_below_tau: a.below,
      cosine_below_tau_fraction: n ? a.below / n : 0,
      cosine_histogram: a.hist,
      cosine_bucket_edges: a.edges,
      selections: a.selections,
      corrections: a.corrections,
      correction_rate: a.selections ? a.corrections / a.selections : 0,
      pages_selected: a.selected,
      pages_recalled: a.recalled,
      hit_rate: a.selected ? a.hit / a.selected : 0,
      topk_overlap: a.base ? a.overlap / a.base : 0,
    });
  });
  return out;
}

export interface ModeSummary extends Accuracy {
  mode: ModeName;
  retrieval: RetrievalSummary;
  prefill_ms_mean: number;
  /** Decode time per generated token after the first. */
  decode_ms_per_token: number;
}

/** What the service did for one task family in one retrieval mode (its counters summed over those requests). */
export interface FamilyRetrieval {
  family: Family;
  mode: ModeName;
  decode_steps: number;
  correction_rate: number;
  pages_recalled_per_step: number;
  recall_bytes_per_step: number;
  hit_rate: number;
}

export interface Summary {
  cells: Cell[];
  modes: ModeSummary[];
  /** Per family and mode that selects pages (oracle, speculative, freekv): where corrections and recalls happen. */
  families: FamilyRetrieval[];
}

export function accuracyOf(rs: readonly TaskResult[]): Accuracy {
  const n = rs.length;
  const correct = rs.filter((r) => r.correct).length;
  return {
    n,
    correct,
    errors: rs.filter((r) => r.error !== undefined).length,
    accuracy: n ? correct / n : 0,
    wilson95: wilsonInterval(correct, n),
    answer_fraction: n ? rs.reduce((a, r) => a + r.fraction, 0) / n : 0,
  };
}

export function retrievalOf(rs: readonly TaskResult[]): RetrievalSummary {
  const sum = (f: (s: RetrievalStats) => number) => rs.reduce((a, r) => a + (r.stats ? f(r.stats) : 0), 0);
  const steps = sum((s) => s.decodeSteps);
  const selections = sum((s) => s.selections);
  const corrections = sum((s) => s.corrections);
  const selected = sum((s) => s.pagesSelected);
  const hit = sum((s) => s.pagesHit);
  const recalled = sum((s) => s.pagesRecalled);
  const bytes = sum((s) => s.recallBytes);
  return {
    decode_steps: steps,
    selections,
    corrections,
    correction_rate: selections ? corrections / selections : 0,
    pages_selected: selected,
    pages_hit: hit,
    pages_recalled: recalled,
    recall_bytes: bytes,
    hit_rate: selected ? hit / selected : 0,
    pages_recalled_per_step: steps ? recalled / steps : 0,
    recall_bytes_per_step: steps ? bytes / steps : 0,
    pages_offloaded: sum((s) => s.pagesOffloaded),
    offload_bytes: sum((s) => s.offloadBytes),
    layers: layersOf(rs),
  };
}

/** Cells sorted by family (the schema's order, then "all"), context length, then `modes`' order. */
export function summarize(results: readonly TaskResult[], modes: readonly ModeName[]): Summary {
  const contexts = [...new Set(results.map((r) => r.context_tokens))].sort((a, b) => a - b);
  const families = FAMILIES.filter((f) => results.some((r) => r.family === f));
  const cells: Cell[] = [];
  const cell = (family: Family | "all", ctx: number, mode: ModeName) => {
    const rs = results.filter((r) => r.mode === mode && r.context_tokens === ctx && (family === "all" || r.family === family));
    if (rs.length === 0) return;
    cells.push({ family, context_tokens: ctx, mode, ...accuracyOf(rs), prompt_tokens_mean: rs.reduce((a, r) => a + r.prompt_tokens, 0) / rs.length });
  };
  for (const f of families) for (const c of contexts) for (const m of modes) cell(f, c, m);
  for (const c of contexts) for (const m of modes) cell("all", c, m);
  const summaries = modes.map((mode): ModeSummary => {
    const rs = results.filter((r) => r.mode === mode);
    const ok = rs.filter((r) => r.error === undefined);
    const decodeTokens = ok.reduce((a, r) => a + Math.max(0, r.completion_tokens - 1), 0);
    return {
      mode,
      ...accuracyOf(rs),
      retrieval: retrievalOf(rs),
      prefill_ms_mean: ok.length ? ok.reduce((a, r) => a + r.prefill_ms, 0) / ok.length : 0,
      decode_ms_per_token: decodeTokens ? ok.reduce((a, r) => a + r.decode_ms, 0) / decodeTokens : 0,
    };
  });
  const perFamily: FamilyRetrieval[] = [];
  for (const family of families)
    for (const mode of modes) {
      const r = retrievalOf(results.filter((x) => x.mode === mode && x.family === family));
      if (r.selections === 0) continue;
      perFamily.push({
        family,
        mode,
        decode_steps: r.decode_steps,
        correction_rate: r.correction_rate,
        pages_recalled_per_step: r.pages_recalled_per_step,
        recall_bytes_per_step: r.recall_bytes_per_step,
        hit_rate: r.hit_rate,
      });
    }
  return { cells, modes: summaries, families: perFamily };
}
