/**
 * Exact attention in float64: the yardstick the engine, the Attention stream, the demo and the
 * fidelity replay are measured against.
 */

/** Float64 attention of one query head: softmax(q.k / sqrt(D)) v over a set of token rows. */
export function attend(q: ArrayLike<number>, keys: ArrayLike<number>[], values: ArrayLike<number>[]): Float64Array {
  const D = q.length;
  const scale = 1 / Math.sqrt(D);
  const s = keys.map((k) => {
    let a = 0;
    for (let d = 0; d < D; d++) a += q[d] * k[d];
    return a * scale;
  });
  const m = Math.max(...s);
  let z = 0;
  const w = s.map((x) => {
    const e = Math.exp(x - m);
    z += e;
    return e;
  });
  const out = new Float64Array(D);
  values.forEach((v, t) => {
    for (let d = 0; d < D; d++) out[d] += (w[t] / z) * v[d];
  });
  return out;
}

/**
 * All query heads of one token with GQA: out[h] = attend(q[h], K[:, g(h)], V[:, g(h)]) with
 * g(h) = h / (Hq / Hkv); q is [Hq][D], each key/value row [Hkv][D] (NHD).
 */
export function exactAttention(q: Float32Array, keys: Float32Array[], values: Float32Array[], qHeads: number, kvHeads: number, headDim: number): Float64Array {
  const out = new Float64Array(qHeads * headDim);
  const group = qHeads / kvHeads;
  for (let h = 0; h < qHeads; h++) {
    const g = Math.floor(h / group);
    const head = (row: Float32Array) => row.subarray(g * headDim, (g + 1) * headDim);
    out.set(attend(q.subarray(h * headDim, (h + 1) * headDim), keys.map(head), values.map(head)), h * headDim);
  }
  return out;
}

/** Relative L2 error ||a - b|| / ||b||, with a read from `aOffset` (b is the reference). */
export function relError(a: ArrayLike<number>, b: ArrayLike<number>, aOffset = 0): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[aOffset + i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / Math.max(den, 1e-300));
}
