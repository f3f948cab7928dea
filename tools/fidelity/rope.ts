/**
 * Rotary position embedding as Llama applies it (the "rotate half" pairing: channel i with
 * channel i + D/2, frequency theta^(-2i/D)). Traces hold post-RoPE queries and keys, exactly what
 * the engine scores and attends with, so the synthesiser rotates every vector by its position.
 *
 * Why it matters for fidelity: after RoPE, q.k depends on the distance between the two
 * positions. Low-frequency pairs (i near D/2) barely turn over a long context, so they carry the
 * "what is this about" signal; high-frequency pairs turn quickly and only line up for nearby
 * tokens, which gives real heads their recency bias.
 */
export function ropeFrequencies(headDim: number, theta: number): Float64Array {
  if (headDim % 2 !== 0) throw new RangeError(`headDim must be even for RoPE (got ${headDim})`);
  const half = headDim / 2;
  const f = new Float64Array(half);
  for (let i = 0; i < half; i++) f[i] = Math.pow(theta, (-2 * i) / headDim);
  return f;
}

/** Rotates `x` (length D) for position `pos` into `out` (may alias `x`). */
export function applyRope(x: ArrayLike<number>, pos: number, freqs: Float64Array, out: Float32Array | Float64Array, outOffset = 0): void {
  const half = freqs.length;
  for (let i = 0; i < half; i++) {
    const a = pos * freqs[i];
    const c = Math.cos(a);
    const s = Math.sin(a);
    const x1 = x[i];
    const x2 = x[i + half];
    out[outOffset + i] = x1 * c - x2 * s;
    out[outOffset + i + half] = x2 * c + x1 * s;
  }
}
