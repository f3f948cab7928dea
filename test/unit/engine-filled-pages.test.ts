/**
 * Engine.filledPages: the full pages of a layer whose offload to the host store is complete,
 * the engine's answer to what the compute tier may commit at the kvstore. Checked against the
 * page arithmetic of the tokens appended and against the manifest words in shared memory.
 */
import { describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import type { PolicyConfig } from "../../tools/reference/policy.js";
import { Prng, testSeed } from "./reference/prng.js";
import { createHost, geometryOf, retrievalOf } from "./reference/harness.js";

const seed = testSeed();

// Every backend of this build and machine (the CUDA engine stores K/V in bf16 only).
const backends = loadAddon().backendInfo().backends;

describe(`engine filledPages (seed ${seed})`, () => {
  it.each(backends)("%s: counts each layer's full pages as they fill, as the manifest records them", async (backend) => {
    const rng = new Prng(seed);
    const P = 8;
    const c: PolicyConfig = {
      qHeads: 4, kvHeads: 2, headDim: 16, pageSize: P, sinkTokens: P, windowTokens: 2 * P, selectTokens: 2 * P,
      tau: 0.9, summary: "maxmin", combine: "softmax_mean", mode: "freekv", dtype: backend === "cuda" ? "bf16" : "f32",
    };
    const layers = 3;
    const g = geometryOf(c, layers);
    const r = retrievalOf(c, { recall: 1, denseLayers: [2] });
    const host = createHost(g, r, 16);
    const engine = new (loadAddon().Engine)(backend === "cuda" ? { backend } : { backend, threads: 2 });
    const s = engine.createSession(g, r, host.segments, false);
    const qn = c.qHeads * c.headDim;
    const kvn = c.kvHeads * c.headDim;
    // The manifest: a 16-byte header, then per layer [committed pages, tail tokens] as uint32.
    const words = (l: number) => Array.from(new Uint32Array(host.segments.manifest.buffer(), 16 + 8 * l, 2));
    try {
      const tokens = [3 * P + 5, P - 1, 2 * P];
      for (let l = 0; l < layers; l++) await engine.prefill(s, l, rng.normals(tokens[l] * kvn), rng.normals(tokens[l] * kvn), tokens[l]);
      const expectPages = () => {
        for (let l = 0; l < layers; l++) {
          expect(engine.filledPages(s, l)).toBe(Math.floor(tokens[l] / P));
          expect(words(l)).toEqual([Math.floor(tokens[l] / P), tokens[l] % P]);
        }
      };
      expectPages();
      // One decode token in layer 1 fills its first page.
      await engine.decode(1, [{ session: s, q: rng.normals(qn), k: rng.normals(kvn), v: rng.normals(kvn) }]);
      tokens[1]++;
      expectPages();
      expect(() => engine.filledPages(s, layers)).toThrow(/layer/);
    } finally {
      engine.closeSession(s);
      await host.dispose();
    }
  });
});
