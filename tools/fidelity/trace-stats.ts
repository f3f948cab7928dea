/**
 * Facts about a trace that decide whether a fidelity run can tell the modes apart:
 *  - adjacent-query cosine per KV group (what correction compares against tau);
 *  - peakedness: the softmax mass held by the exact top pages at a small budget. If exact page
 *    selection at ~8% of the context does not hold most of the mass, no selection policy can
 *    do well and the harness measures nothing;
 *  - needle mass: how much of a needle query's attention lands on its page.
 */
import { cosine, exactProbabilities } from "./attention.js";
import type { TraceShape } from "./trace.js";


/** Mean over the group's query heads of cos(q_t, q_{t-1}); [kvHead][t] for t >= 1 (t = 0 is NaN). */
export function groupAdjacentCosines(tr: TraceShape): Float64Array[] {
  const { steps: T, qHeads: Hq, kvHeads: Hkv, headDim: D, q } = tr;
  const group = Hq / Hkv;
  const out: Float64Array[] = [];
  for (let h = 0; h < Hkv; h++) {
    const c = new Float64Array(T).fill(NaN);
    for (let t = 1; t < T; t++) {
      let s = 0;
      for (let j = 0; j < group; j++) {
        const qh = h * group + j;
        s += cosine(q, (t * Hq + qh) * D, q, ((t - 1) * Hq + qh) * D, D);
      }
      c[t] = s / group;
    }
    out.push(c);
  }
  return out;
}

/** Page masses of one step and query head: [pages] with the partial last page included. */
export function pageMasses(p: Float64Array, pageSize: number): Float64Array {
  const pages = Math.ceil(p.length / pageSize);
  const m = new Float64Array(pages);
  for (let s = 0; s < p.length; s++) m[Math.floor(s / pageSize)] += p[s];
  return m;
}

export interface Peakedness {
  /** Fraction of pages kept. */
  fraction: number;
  /** Mean over steps and query heads of the mass on the exact top pages. */
  meanMass: number;
  /** The smallest per-(step, head) value. */
  minMass: number;
}

/**
 * Exact per-head top-page mass at `fraction` of the pages, for every `stride`-th step (the
 * exact softmax over the whole context is the expensive part).
 */
export function topPageMass(tr: TraceShape, pageSize: number, fraction: number, stride = 1): Peakedness {
  const { promptLen: N, steps: T, qHeads: Hq, kvHeads: Hkv, headDim: D, q, k } = tr;
  const group = Hq / Hkv;
  let sum = 0;
  let n = 0;
  let min = Infinity;
  for (let t = 0; t < T; t += stride) {
    const len = N + t + 1;
    for (let qh = 0; qh < Hq; qh++) {
      const p = exactProbabilities(q, (t * Hq + qh) * D, k, { kvHeads: Hkv, headDim: D }, Math.floor(qh / group), len);
      const m = Array.from(pageMasses(p, pageSize)).sort((a, b) => b - a);
      const keep = Math.max(1, Math.round(fraction * m.length));
      let mass = 0;
      for (let i = 0; i < keep; i++) mass += m[i];
      sum += mass;
      n++;
      if (mass < min) min = mass;
    }
  }
  return { fraction, meanMass: sum / n, minMass: min };
}

export interface CosineSummary {
  mean: number;
  /** 10th and 90th percentiles over (group, step), jump steps included. */
  p10: number;
  p90: number;
  /** Fraction of (group, step) below `tau`. */
  belowTau: number;
}

export function summarizeCosines(c: Float64Array[], tau: number): CosineSummary {
  const all: number[] = [];
  for (const row of c) for (const x of row) if (!Number.isNaN(x)) all.push(x);
  all.sort((a, b) => a - b);
  if (all.length === 0) return { mean: NaN, p10: NaN, p90: NaN, belowTau: NaN };
  const pct = (p: number) => all[Math.min(all.length - 1, Math.floor(p * all.length))];
  return {
    mean: all.reduce((a, b) => a + b, 0) / all.length,
    p10: pct(0.1),
    p90: pct(0.9),
    belowTau: all.filter((x) => x < tau).length / all.length,
  };
}
