/**
 * Page summaries: per channel an upper and a lower bound of a page's keys.
 * maxmin (Quest): hi = max, lo = min. cuboid (ArkVale's cuboid-mean): center c = (max+min)/2,
 * radius r = mean |k - c|, hi = c + r, lo = c - r.
 * The engine keeps summaries as bf16 bounds (hi rounded up, lo rounded down) computed in float32;
 * the reference applies the same storage rounding so that scores compare exactly.
 */
import { bf16Directed } from "./kv.js";
export type SummaryKindName = "maxmin" | "cuboid";

export interface PageSummary {
  hi: Float64Array;
  lo: Float64Array;
}

/** keys: P rows of D (any row accessor). */
export function summarise(rows: ArrayLike<number>[], kind: SummaryKindName): PageSummary {
  const D = rows[0].length;
  const hi = new Float64Array(D).fill(-Infinity);
  const lo = new Float64Array(D).fill(Infinity);
  for (const k of rows)
    for (let d = 0; d < D; d++) {
      hi[d] = Math.max(hi[d], k[d]);
      lo[d] = Math.min(lo[d], k[d]);
    }
  if (kind === "cuboid") {
    const f = Math.fround;
    for (let d = 0; d < D; d++) {
      const c = f(0.5 * f(hi[d] + lo[d]));
      let r = 0;
      for (const k of rows) r += f(Math.abs(k[d] - c));
      const radius = f(r / rows.length);
      hi[d] = f(c + radius);
      lo[d] = f(c - radius);
    }
  }
  for (let d = 0; d < D; d++) {
    hi[d] = bf16Directed(hi[d], "up");
    lo[d] = bf16Directed(lo[d], "down");
  }
  return { hi, lo };
}

/** Score of a page for one query head: sum_i max(q_i * hi_i, q_i * lo_i). */
export function scorePage(q: ArrayLike<number>, s: PageSummary): number {
  let acc = 0;
  for (let d = 0; d < s.hi.length; d++) acc += Math.max(q[d] * s.hi[d], q[d] * s.lo[d]);
  return acc;
}
