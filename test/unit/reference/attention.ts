/** Float64 attention: softmax(q.k / sqrt(D)) v over a set of token rows. */
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

/** Relative L2 error ||a - b|| / ||b||. */
export function relError(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / Math.max(den, 1e-300));
}
