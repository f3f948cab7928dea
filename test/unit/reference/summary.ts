/**
 * Page summaries (float64): per channel an upper and a lower bound of a page's keys.
 * maxmin (Quest): hi = max, lo = min. cuboid (ArkVale's cuboid-mean): center c = (max+min)/2,
 * radius r = mean |k - c|, hi = c + r, lo = c - r.
 */
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
    for (let d = 0; d < D; d++) {
      const c = (hi[d] + lo[d]) / 2;
      let r = 0;
      for (const k of rows) r += Math.abs(k[d] - c);
      r /= rows.length;
      hi[d] = c + r;
      lo[d] = c - r;
    }
  }
  return { hi, lo };
}

/** Score of a page for one query head: sum_i max(q_i * hi_i, q_i * lo_i). */
export function scorePage(q: ArrayLike<number>, s: PageSummary): number {
  let acc = 0;
  for (let d = 0; d < s.hi.length; d++) acc += Math.max(q[d] * s.hi[d], q[d] * s.lo[d]);
  return acc;
}
