/**
 * The sampler's partial sorts pick exactly what a plain full sort would: a straightforward
 * reference (stable sort of the whole vocabulary by logit, top-k, then top-p) drawn with the same
 * seeded uniform must choose the same token, on random logits of several shapes.
 */
import { describe, expect, it } from "vitest";
import { partialSortDesc, Sampler, SeededRandom } from "../../services/compute/generate/sampling.js";
import { Prng, testSeed } from "./reference/prng.js";

function referenceSample(logits: Float32Array, temperature: number, topK: number, topP: number, u: number): number {
  let max = -Infinity;
  for (const x of logits) max = Math.max(max, x);
  const cut = max - 40 * temperature;
  let ids = Array.from(logits.keys()).filter((i) => logits[i] >= cut);
  if (topK > 0 || (topP > 0 && topP < 1)) ids.sort((a, b) => logits[b] - logits[a] || a - b);
  if (topK > 0 && topK < ids.length) ids = ids.slice(0, topK);
  const p = ids.map((i) => Math.exp((logits[i] - max) / temperature));
  let sum = p.reduce((a, b) => a + b, 0);
  let keep = p.length;
  if (topP > 0 && topP < 1) {
    let acc = 0;
    for (let i = 0; i < p.length; i++) {
      acc += p[i] / sum;
      if (acc >= topP) {
        keep = i + 1;
        break;
      }
    }
    sum = p.slice(0, keep).reduce((a, b) => a + b, 0);
  }
  let r = u * sum;
  for (let i = 0; i < keep; i++) {
    r -= p[i];
    if (r < 0) return ids[i];
  }
  return ids[keep - 1];
}

const rng = new Prng(testSeed());

describe("sampler vs a full-sort reference", () => {
  it("partialSortDesc puts the m largest first, in (value desc, id asc) order", () => {
    for (const [n, m] of [[1, 1], [10, 3], [1000, 1000], [5000, 17], [4096, 256]]) {
      const values = new Float32Array(n);
      // Few distinct values so ties are common.
      for (let i = 0; i < n; i++) values[i] = rng.int(7) - 3 + (rng.int(2) ? 0.5 : 0);
      const ids = Int32Array.from({ length: n }, (_, i) => i);
      partialSortDesc(ids, n, values, 0, m);
      const ref = Array.from({ length: n }, (_, i) => i).sort((a, b) => values[b] - values[a] || a - b);
      expect(Array.from(ids.subarray(0, m))).toEqual(ref.slice(0, m));
      expect(new Set(ids).size).toBe(n);
    }
  });

  it("picks the reference's token for temperature, top-k and top-p", () => {
    const cases = [
      { vocab: 50, temperature: 0.7, topK: 0, topP: 0.9 },
      { vocab: 3000, temperature: 1.0, topK: 40, topP: 0 },
      { vocab: 3000, temperature: 1.3, topK: 0, topP: 0.95 },
      { vocab: 20000, temperature: 0.5, topK: 500, topP: 0.8 },
      { vocab: 20000, temperature: 2.0, topK: 0, topP: 0.99 },
      { vocab: 777, temperature: 0.9, topK: 0, topP: 0 },
    ];
    for (const c of cases) {
      for (let trial = 0; trial < 6; trial++) {
        const logits = rng.normals(c.vocab, 1 + trial);
        const seed = BigInt(1 + rng.int(1e9));
        const sampler = new Sampler({ temperature: c.temperature, topK: c.topK, topP: c.topP, seed });
        const u = new SeededRandom(seed).next();
        expect(sampler.sample(logits, 0, c.vocab)).toBe(referenceSample(logits, c.temperature, c.topK, c.topP, u));
      }
    }
  });
});

describe("argmax", () => {
  it("the native loop agrees with the TypeScript one, ties and NaN included", async () => {
    const { argmax, argmaxJs } = await import("../../services/compute/generate/sampling.js");
    const { loadAddon } = await import("../../native/binding.js");
    const addon = loadAddon();
    for (const vocab of [4096, 5000, 128256]) {
      const rows = 3;
      const x = rng.normals(vocab * rows);
      // A tie for the maximum in row 1 (the first one wins), a NaN at the start of row 2.
      x[vocab + 10] = 9;
      x[vocab + 20] = 9;
      x[2 * vocab] = Number.NaN;
      for (let r = 0; r < rows; r++) {
        const js = argmaxJs(x, r * vocab, vocab);
        expect(addon.argmaxF32(x, r * vocab, vocab)).toBe(js);
        expect(argmax(x, r * vocab, vocab)).toBe(js);
      }
      expect(argmaxJs(x, vocab, vocab)).toBe(10);
    }
    expect(() => addon.argmaxF32(new Float32Array(4), 2, 3)).toThrow(/past the end/);
    expect(() => addon.argmaxF32(new Float64Array(4) as never, 0, 1)).toThrow(/Float32Array/);
  });
});
