/**
 * The helpers the benchmark programs share (bench/common.ts): the nearest-rank percentile against
 * a direct count, the seeded prompt ids, the results path.
 */
import { describe, expect, it } from "vitest";
import { percentile, randomPromptIds, resultsPath } from "../../bench/common.js";
import { prng } from "../helpers/prng.js";

describe("bench/common", () => {
  it("percentile is the smallest value with at least p of the values at or below it, ignoring non-numbers", () => {
    const rand = prng(20261203);
    for (let trial = 0; trial < 50; trial++) {
      const n = 1 + Math.floor(rand() * 40);
      const xs: (number | undefined | null)[] = Array.from({ length: n }, () => Math.round(rand() * 1000) / 10);
      xs.push(undefined, null, NaN, Infinity);
      const finite = xs.filter((x): x is number => typeof x === "number" && Number.isFinite(x));
      for (const p of [0.01, 0.5, 0.9, 0.99, 1]) {
        const got = percentile(xs, p)!;
        expect(finite).toContain(got);
        expect(finite.filter((x) => x <= got).length).toBeGreaterThanOrEqual(p * finite.length - 1e-9);
        // No smaller value of the set qualifies.
        for (const y of finite) if (y < got) expect(finite.filter((x) => x <= y).length).toBeLessThan(p * finite.length - 1e-9);
      }
    }
    expect(percentile([], 0.5)).toBeNull();
    expect(percentile([undefined, NaN], 0.5)).toBeNull();
  });

  it("randomPromptIds: seeded, inside the vocabulary's ordinary ids", () => {
    const a = randomPromptIds(500, 7, 1000), b = randomPromptIds(500, 7, 1000), c = randomPromptIds(500, 8, 1000);
    expect(a).toEqual(b);
    expect(a).not.toEqual(c);
    expect(Math.min(...a)).toBeGreaterThanOrEqual(16);
    expect(Math.max(...a)).toBeLessThan(900);
    expect(new Set(a).size).toBeGreaterThan(200);
  });

  it("resultsPath stamps the UTC date and minute", () => {
    expect(resultsPath("/r", "serving", new Date("2026-12-03T16:57:31Z"))).toBe("/r/bench/results/serving-20261203-1657.json");
  });
});
