/** Seeded random numbers for tests (mulberry32 + Box-Muller): fresh but reproducible inputs. */
export { mulberry32 as prng, gaussian, gaussianF32 as randomF32 } from "../../tools/reference/prng.js";

export function randomBytes(n: number, rand: () => number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(rand() * 256);
  return out;
}
