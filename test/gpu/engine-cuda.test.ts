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

  it("rejects float32 K/V storage with an error naming geometry.kvDtype", async () => {
    const { loadAddon } = await import("../../native/binding.js");
    const addon = loadAddon();
    const engine = new addon.Engine({ backend: "cuda" });
    const geometry = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 128, kvDtype: 1 as const };
    const retrieval = { pageSize: 32, sinkTokens: 64, windowTokens: 96, selectTokens: 256, tau: 0.9, summary: 1 as const, combine: 1 as const, mode: 1 as const, recall: 1 as const, denseLayers: [] };
    const L = addon.Engine.layout(geometry, retrieval, 8);
    const names = ["store", "staging", "tail", "manifest"].map((k) => `/fkv-gpu-f32-${process.pid}-${k}`);
    const sizes = [L.storeBytes, 2 * L.stagingBufferBytes, L.tailBytes, L.manifestBytes];
    const segs = names.map((n, i) => addon.ShmSegment.create(n, sizes[i]));
    try {
      expect(() => engine.createSession(geometry, retrieval, { store: segs[0], staging: segs[1], tail: segs[2], manifest: segs[3], capacityPages: 8 }, false)).toThrow(/kvDtype/);
    } finally {
      segs.forEach((s) => s.close());
      names.forEach((n) => addon.ShmSegment.unlink(n));
    }
  });
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
