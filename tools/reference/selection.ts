/** Group combine and top-k (float64 reference of the engine's selection). */
export type CombineName = "softmax_mean" | "mean" | "max";

/** scores[j][i]: query head j of the group, candidate page i. */
export function combineGroup(scores: number[][], how: CombineName): number[] {
  const n = scores[0]?.length ?? 0;
  const out = new Array<number>(n).fill(0);
  if (how === "max") {
    for (let i = 0; i < n; i++) out[i] = Math.max(...scores.map((s) => s[i]));
    return out;
  }
  for (const s of scores) {
    if (how === "mean") {
      for (let i = 0; i < n; i++) out[i] += s[i];
    } else {
      const m = Math.max(...s);
      let z = 0;
      for (const x of s) z += Math.exp(x - m);
      for (let i = 0; i < n; i++) out[i] += Math.exp(s[i] - m) / z;
    }
  }
  return out.map((x) => x / scores.length);
}

/** Indices of the k largest values, best first; ties to the lower index. */
export function topK(values: number[], k: number): number[] {
  const idx = values.map((_, i) => i);
  idx.sort((a, b) => values[b] - values[a] || a - b);
  return idx.slice(0, Math.min(k, idx.length));
}

/**
 * Whether `got` (a set of candidate indices) is a valid top-k of `values` up to float32
 * rounding: same size, and every index in one set but not the other scores within `eps`
 * (relative to the k-th best value's magnitude) of the k-th best value.
 */
export function sameTopK(got: number[], values: number[], k: number, eps = 1e-4): boolean {
  const want = topK(values, k);
  if (got.length !== want.length) return false;
  if (want.length === 0) return true;
  const kth = values[want[want.length - 1]];
  const tol = eps * Math.max(1e-6, Math.abs(kth), ...want.map((i) => Math.abs(values[i])));
  const w = new Set(want);
  const g = new Set(got);
  for (const i of got) if (!w.has(i) && !(values[i] >= kth - tol)) return false;
  for (const i of want) if (!g.has(i) && !(values[i] <= kth + tol)) return false;
  return true;
}
