/** Seeded random numbers for tests (mulberry32 + Box-Muller): fresh but reproducible inputs. */
export { mulberry32 as prng } from "../../tools/dev/prng.js";

export function gaussian(rand: () => number): () => number {
  return () => {
    const u = Math.max(rand(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rand());
  };
}

export function randomF32(n: number, rand: () => number, scale = 1): Float32Array {
  const g = gaussian(rand);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = g() * scale;
  return out;
}

export function randomBytes(n: number, rand: () => number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(rand() * 256);
  return out;
}
