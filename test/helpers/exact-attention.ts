/**
 * Exact attention in float64, the reference the Attention stream is checked against:
 * out[h] = softmax(q[h] . K[:, g(h)] / sqrt(D)) V[:, g(h)], g(h) = h / (Hq / Hkv) (GQA).
 */
export function exactAttention(q: Float32Array, keys: Float32Array[], values: Float32Array[], qHeads: number, kvHeads: number, headDim: number): Float64Array {
  const out = new Float64Array(qHeads * headDim);
  const group = qHeads / kvHeads;
  const scale = 1 / Math.sqrt(headDim);
  const n = keys.length;
  const logits = new Float64Array(n);
  for (let h = 0; h < qHeads; h++) {
    const g = Math.floor(h / group);
    let max = -Infinity;
    for (let t = 0; t < n; t++) {
      let dot = 0;
      for (let d = 0; d < headDim; d++) dot += q[h * headDim + d] * keys[t][g * headDim + d];
      logits[t] = dot * scale;
      if (logits[t] > max) max = logits[t];
    }
    let z = 0;
    for (let t = 0; t < n; t++) {
      logits[t] = Math.exp(logits[t] - max);
      z += logits[t];
    }
    for (let t = 0; t < n; t++) {
      const p = logits[t] / z;
      for (let d = 0; d < headDim; d++) out[h * headDim + d] += p * values[t][g * headDim + d];
    }
  }
  return out;
}

/** ||a - b|| / ||b||. */
export function relativeError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}
