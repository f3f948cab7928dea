/**
 * Exact attention in float64, for the demo's check of what came back over the wire:
 * out[h] = softmax(q[h] . K[:, g(h)] / sqrt(D)) V[:, g(h)] with g(h) = h / (Hq / Hkv).
 */
export function exactAttention(q: Float32Array, keys: Float32Array[], values: Float32Array[], qHeads: number, kvHeads: number, headDim: number): Float64Array {
  const out = new Float64Array(qHeads * headDim);
  const group = qHeads / kvHeads;
  const scale = 1 / Math.sqrt(headDim);
  const logits = new Float64Array(keys.length);
  for (let h = 0; h < qHeads; h++) {
    const g = Math.floor(h / group);
    let max = -Infinity;
    for (let t = 0; t < keys.length; t++) {
      let dot = 0;
      for (let d = 0; d < headDim; d++) dot += q[h * headDim + d] * keys[t][g * headDim + d];
      logits[t] = dot * scale;
      max = Math.max(max, logits[t]);
    }
    let z = 0;
    for (let t = 0; t < keys.length; t++) z += logits[t] = Math.exp(logits[t] - max);
    for (let t = 0; t < keys.length; t++) {
      const p = logits[t] / z;
      for (let d = 0; d < headDim; d++) out[h * headDim + d] += p * values[t][g * headDim + d];
    }
  }
  return out;
}

export function relativeError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}
