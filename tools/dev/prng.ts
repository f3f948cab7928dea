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
