/**
 * Replays a trace through one target per mode, in lock step, and scores every step against
 * exact float64 attention (computed once per step and shared by all modes):
 *  - mass_recall: the exact softmax mass on the tokens the mode attended (its KV head's
 *    attended set), mean over steps and query heads;
 *  - rel_error: |o_mode - o_exact| / |o_exact| per (step, query head), mean;
 *  - correction_rate: corrected (step, KV head) groups / (steps x KV heads);
 *  - recall_bytes_per_step: bytes recalled from the host tier during the decode steps / steps
 *    (the first step's blocking selection included).
 */
import { relError } from "../reference/attention.js";
import { exactProbabilities, massOn, weightedValues } from "./attention.js";
import type { ModeName, RetrievalSettings } from "./modes.js";
import type { ReplayTarget } from "./replay-target.js";
import type { TraceTensors } from "./trace.js";

export interface ModeMetrics {
  mass_recall: number;
  rel_error: number;
  correction_rate: number;
  recall_bytes_per_step: number;
}

export interface ReplayResult {
  modes: Partial<Record<ModeName, ModeMetrics>>;
  /** Per mode, per step: mean mass recall over query heads (for tests and plots). */
  perStep: Partial<Record<ModeName, Float64Array>>;
  /**
   * With `budget`: the mass an ideal selection would keep at the same budget (sink + window +
   * each query head's own exact top sel/P pages), mean over steps and heads. No group-consistent,
   * summary-based policy can beat it; the gap to oracle is the price of summaries and sharing.
   */
  idealMass?: number;
}

export type TraceData = Omit<TraceTensors, "name">;

export interface ReplayOptions {
  /** Called after every step with (done, total). */
  onStep?: (done: number, total: number) => void;
  /** Prefill in chunks of this many tokens (bounds the copies the engine makes). */
  prefillChunk?: number;
  /** The retrieval budget, to compute `idealMass`. */
  budget?: RetrievalSettings;
}

export async function replay(trace: TraceData, modes: ModeName[], makeTarget: (mode: ModeName) => Promise<ReplayTarget> | ReplayTarget, opts: ReplayOptions = {}): Promise<ReplayResult> {
  const { promptLen: N, steps: T, qHeads: Hq, kvHeads: Hkv, headDim: D, q, k, v } = trace;
  const group = Hq / Hkv;
  const row = Hkv * D;
  const view = { kvHeads: Hkv, headDim: D };
  const targets = new Map<ModeName, ReplayTarget>();
  try {
    for (const m of modes) targets.set(m, await makeTarget(m));
    const chunk = Math.max(1, opts.prefillChunk ?? 4096);
    for (let s = 0; s < N; s += chunk) {
      const n = Math.min(chunk, N - s);
      const kc = k.subarray(s * row, (s + n) * row);
      const vc = v.subarray(s * row, (s + n) * row);
      for (const t of targets.values()) await t.prefill(kc, vc, n);
    }
    const start = new Map<ModeName, number>();
    for (const [m, t] of targets) start.set(m, t.counters().recallBytes);
    const mass = new Map<ModeName, number>(modes.map((m) => [m, 0]));
    const err = new Map<ModeName, number>(modes.map((m) => [m, 0]));
    const perStep = new Map<ModeName, Float64Array>(modes.map((m) => [m, new Float64Array(T)]));
    let ideal = 0;
    for (let t = 0; t < T; t++) {
      const s = N + t;
      const qt = q.subarray(t * Hq * D, (t + 1) * Hq * D);
      const kt = k.subarray(s * row, (s + 1) * row);
      const vt = v.subarray(s * row, (s + 1) * row);
      const outs = new Map<ModeName, ArrayLike<number>>();
      for (const [m, target] of targets) outs.set(m, await target.decode(qt, kt, vt));
      for (let qh = 0; qh < Hq; qh++) {
        const h = Math.floor(qh / group);
        const p = exactProbabilities(q, (t * Hq + qh) * D, k, view, h, s + 1);
        const exact = weightedValues(p, v, view, h);
        if (opts.budget) ideal += idealMass(p, opts.budget);
        for (const [m, target] of targets) {
          const got = massOn(p, target.attended(h));
          mass.set(m, mass.get(m)! + got);
          perStep.get(m)![t] += got / Hq;
          err.set(m, err.get(m)! + relError(outs.get(m)!, exact, qh * D));
        }
      }
      opts.onStep?.(t + 1, T);
    }
    const result: ReplayResult = { modes: {}, perStep: {} };
    if (opts.budget) result.idealMass = ideal / (T * Hq);
    for (const [m, target] of targets) {
      const c = target.counters();
      result.modes[m] = {
        mass_recall: mass.get(m)! / (T * Hq),
        rel_error: err.get(m)! / (T * Hq),
        correction_rate: c.corrections / (T * Hkv),
        recall_bytes_per_step: (c.recallBytes - start.get(m)!) / T,
      };
      result.perStep[m] = perStep.get(m)!;
    }
    return result;
  } finally {
    for (const t of targets.values()) await t.close().catch(() => undefined);
  }
}

/** Sink + window + the best sel/P full pages in between, by exact mass (one query head). */
function idealMass(p: Float64Array, b: RetrievalSettings): number {
  const P = b.pageSize;
  const len = p.length;
  const full = Math.floor(len / P);
  const sinkPages = Math.min(full, b.sinkTokens / P);
  const end = Math.max(sinkPages, full - (b.windowTokens / P - 1));
  let kept = 0;
  for (let s = 0; s < sinkPages * P; s++) kept += p[s];
  for (let s = end * P; s < len; s++) kept += p[s];
  const pages: number[] = [];
  for (let pg = sinkPages; pg < end; pg++) {
    let m = 0;
    for (let s = pg * P; s < (pg + 1) * P; s++) m += p[s];
    pages.push(m);
  }
  pages.sort((a, c) => c - a);
  const k = Math.min(pages.length, b.selectTokens / P);
  for (let i = 0; i < k; i++) kept += pages[i];
  return kept;
}
