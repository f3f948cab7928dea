/**
 * The CUDA engine against the CPU engine (and float64 references) on fresh random inputs of
 * several shapes and modes: see cases.ts. Runs where a CUDA device is usable; elsewhere the
 * suite is skipped and its title says why. On the GPU machine (no Node.js toolchain there) the
 * same cases run through scripts/gpu/run-checks.ts: see scripts/gpu/README.md.
 */
import { describe, expect, it } from "vitest";
import { CASES, cudaStatus, runCase } from "./cases.js";

const status = cudaStatus();
const title = status.available ? `CUDA engine vs CPU engine on ${status.reason}` : `CUDA engine vs CPU engine (skipped: ${status.reason})`;

if (!status.available) console.warn(`test/gpu: CUDA checks skipped: ${status.reason}`);

describe.skipIf(!status.available)(title, () => {
  for (const spec of CASES) {
    it(spec.name, async () => {
      const r = await runCase(spec, (l) => console.log(l));
      expect(r.failures, r.failures.join("\n")).toEqual([]);
      expect(r.ok).toBe(true);
    }, 300_000);
  }
});

// The harness itself, checked without a GPU: the CPU engine against itself must pass every
// comparison (same inputs, same outputs), so a failure here is a bug of the checks.
describe("CUDA check harness (CPU engine as the candidate)", () => {
  it("passes a small case with the CPU engine as the candidate", async () => {
    const spec = { ...CASES[0], prompts: [300, 211], firstChunk: 150, steps: 6, name: "harness self-check" };
    const r = await runCase(spec, () => {}, "cpu");
    expect(r.failures, r.failures.join("\n")).toEqual([]);
  }, 60_000);
});
