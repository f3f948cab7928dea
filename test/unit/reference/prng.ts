import { gaussian, gaussianF32, mulberry32 } from "../../../tools/reference/prng.js";

/** Seeded PRNG (mulberry32) with normal samples, so every test run draws fresh but reproducible data. */
export class Prng {
  private u: () => number;
  private g: () => number;
  constructor(seed: number) {
    this.u = mulberry32(seed >>> 0 || 1);
    this.g = gaussian(this.u);
  }
  /** Uniform in [0, 1). */
  next(): number {
    return this.u();
  }
  /** Standard normal (Box-Muller). */
  normal(): number {
    return this.g();
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  /** Float32Array of n normals times scale. */
  normals(n: number, scale = 1): Float32Array {
    return gaussianF32(n, this.u, scale);
  }
}

/** A seed that differs per run unless FREEKV_TEST_SEED pins it (printed by the tests on failure). */
export function testSeed(): number {
  const env = process.env.FREEKV_TEST_SEED;
  return env ? Number(env) : (Date.now() ^ (process.pid << 8)) >>> 0;
}
