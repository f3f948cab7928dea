/**
 * mulberry32: the one seeded generator of the demo, the benchmarks and the tests (each of which
 * shapes its own samples from it), so that the same seed gives the same data everywhere.
 */
export function mulberry32Uint(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/** Uniform in [0, 1) from mulberry32Uint. */
export function mulberry32(seed: number): () => number {
  const u = mulberry32Uint(seed);
  return () => u() / 4294967296;
}

/** Standard normals (Box-Muller) from a uniform source: the first draw sets the radius, the second the angle. */
export function gaussian(rand: () => number): () => number {
  return () => {
    const u = Math.max(rand(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rand());
  };
}

/** n standard normals times `scale`, as float32. */
export function gaussianF32(n: number, rand: () => number, scale = 1): Float32Array {
  const g = gaussian(rand);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = g() * scale;
  return out;
}
