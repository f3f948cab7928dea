/**
 * The Wilson interval against an independent float64 reference: the interval is the set of p
 * that the score test does not reject, (phat - p)^2 <= z^2 p (1 - p) / n, whose ends are found
 * here by bisection instead of the closed form. Random (k, n) from a seed printed on failure.
 */
import { describe, expect, it } from "vitest";
import { wilsonInterval, Z95 } from "../../tools/eval/wilson.js";
import { Prng, testSeed } from "../unit/reference/prng.js";

/** Ends of {p : (phat - p)^2 <= z^2 p (1 - p) / n} by bisection (the set is one interval). */
function scoreTestInterval(k: number, n: number, z: number): [number, number] {
  const phat = k / n;
  const g = (p: number) => (phat - p) * (phat - p) - (z * z * p * (1 - p)) / n; // <= 0 inside
  const bisect = (inside: number, outside: number) => {
    for (let i = 0; i < 200; i++) {
      const mid = (inside + outside) / 2;
      if (g(mid) <= 0) inside = mid;
      else outside = mid;
    }
    return (inside + outside) / 2;
  };
  const lo = g(0) <= 0 ? 0 : bisect(phat, 0);
  const hi = g(1) <= 0 ? 1 : bisect(phat, 1);
  return [lo, hi];
}

describe("wilsonInterval", () => {
  it("z is the 0.975 normal quantile", () => {
    // Phi(z) = (1 + erf(z / sqrt 2)) / 2, erf by Simpson's rule on exp(-t^2).
    const erf = (x: number) => {
      const m = 20000;
      const h = x / m;
      let s = 1 + Math.exp(-x * x);
      for (let i = 1; i < m; i++) s += (i % 2 ? 4 : 2) * Math.exp(-(i * h) * (i * h));
      return ((2 / Math.sqrt(Math.PI)) * s * h) / 3;
    };
    expect(0.5 * (1 + erf(Z95 / Math.SQRT2))).toBeCloseTo(0.975, 12);
  });

  it("matches the score-test inversion on random (k, n)", () => {
    const seed = testSeed();
    const rng = new Prng(seed);
    for (let i = 0; i < 500; i++) {
      const n = 1 + rng.int(i < 250 ? 30 : 5000);
      const k = rng.int(n + 1);
      const z = i % 3 === 0 ? 1 + 2 * rng.next() : Z95;
      const [lo, hi] = wilsonInterval(k, n, z);
      const [rlo, rhi] = scoreTestInterval(k, n, z);
      expect(Math.abs(lo - rlo), `seed ${seed} (FREEKV_TEST_SEED), k=${k} n=${n} z=${z}: low`).toBeLessThan(1e-12);
      expect(Math.abs(hi - rhi), `seed ${seed} (FREEKV_TEST_SEED), k=${k} n=${n} z=${z}: high`).toBeLessThan(1e-12);
      expect(lo).toBeLessThanOrEqual(k / n);
      expect(hi).toBeGreaterThanOrEqual(k / n);
    }
  });

  it("known values, the ends, and n = 0", () => {
    const [a, b] = wilsonInterval(5, 10);
    expect(a).toBeCloseTo(0.2366, 4);
    expect(b).toBeCloseTo(0.7634, 4);
    expect(wilsonInterval(0, 10)[0]).toBe(0);
    expect(wilsonInterval(0, 10)[1]).toBeCloseTo(0.2775, 4);
    expect(wilsonInterval(10, 10)[1]).toBe(1);
    expect(wilsonInterval(0, 0)).toEqual([0, 1]);
    expect(() => wilsonInterval(3, 2)).toThrow(RangeError);
    expect(() => wilsonInterval(1.5, 2)).toThrow(RangeError);
  });
});
