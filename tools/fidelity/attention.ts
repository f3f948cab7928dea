/**
 * Exact attention in float64: the yardstick every retrieval mode is measured against. For one
 * query head it gives the softmax probabilities over the whole context (scale 1/sqrt(D), as the
 * engine) and the output, so mass recall and relative error are computed from the same numbers.
 *
 * Layouts follow the trace: q [T][Hq][D], k and v [tokens][Hkv][D] (token-major, NHD).
 */
export interface HeadView {
  kvHeads: number;
  headDim: number;
}

/** Softmax probabilities of query `q[qOff .. qOff+D)` over tokens 0..len-1 of KV head `kvHead`. */
export function exactProbabilities(q: ArrayLike<number>, qOff: number, k: Float32Array, view: HeadView, kvHead: number, len: number): Float64Array {
  const { kvHeads, headDim: d } = view;
  const scale = 1 / Math.sqrt(d);
  const p = new Float64Array(len);
  const qv = new Float64Array(d);
  for (let i = 0; i < d; i++) qv[i] = q[qOff + i];
  let max = -Infinity;
  const stride = kvHeads * d;
  for (let s = 0; s < len; s++) {
    const base = s * stride + kvHead * d;
    let dot = 0;
    for (let i = 0; i < d; i++) dot += qv[i] * k[base + i];
    const l = dot * scale;
    p[s] = l;
    if (l > max) max = l;
  }
  let sum = 0;
  for (let s = 0; s < len; s++) {
    const e = Math.exp(p[s] - max);
    p[s] = e;
    sum += e;
  }
  for (let s = 0; s < len; s++) p[s] /= sum;
  return p;
}

/** Output sum_s p[s] v[s] over all tokens with p (already normalised). */
export function weightedValues(p: Float64Array, v: Float32Array, view: HeadView, kvHead: number): Float64Array {
  const { kvHeads, headDim: d } = view;
  const out = new Float64Array(d);
  const stride = kvHeads * d;
  for (let s = 0; s < p.length; s++) {
    const w = p[s];
    if (w === 0) continue;
    const base = s * stride + kvHead * d;
    for (let i = 0; i < d; i++) out[i] += w * v[base + i];
  }
  return out;
}

/** Sum of p over `tokens`: the softmax mass a mode kept. */
export function massOn(p: Float64Array, tokens: ArrayLike<number>): number {
  let m = 0;
  for (let j = 0; j < tokens.length; j++) m += p[tokens[j]];
  return m;
}

export function cosine(a: ArrayLike<number>, aOff: number, b: ArrayLike<number>, bOff: number, d: number): number {
  let ab = 0;
  let aa = 0;
  let bb = 0;
  for (let i = 0; i < d; i++) {
    ab += a[aOff + i] * b[bOff + i];
    aa += a[aOff + i] * a[aOff + i];
    bb += b[bOff + i] * b[bOff + i];
  }
  return aa === 0 || bb === 0 ? 0 : ab / Math.sqrt(aa * bb);
}
