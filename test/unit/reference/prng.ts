import { mulberry32 } from "../../../tools/dev/prng.js";

/** Seeded PRNG (mulberry32) with normal samples, so every test run draws fresh but reproducible data. */
export class Prng {
  private u: () => number;
  constructor(seed: number) {
    this.u = mulberry32(seed >>> 0 || 1);
  }
  /** Uniform in [0, 1). */
  next(): number {
    return this.u();
  }
  /** Standard normal (Box-Muller). */
  normal(): number {
    const u = Math.max(this.next(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.next());
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  /** Float32Array of n normals times scale. */
  normals(n: number, scale = 1): Float32Array {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = this.normal() * scale;
    return a;
  }
}

/** A seed that differs per run unless FREEKV_TEST_SEED pins it (printed by the tests on failure). */
export function testSeed(): number {
  const env = process.env.FREEKV_TEST_SEED;
  return env ? Number(env) : (Date.now() ^ (process.pid << 8)) >>> 0;
}
