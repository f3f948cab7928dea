/**
 * Engine.closeSessionAsync: the engine's part of closing a session on a worker thread. While it
 * runs the session takes no calls and its segments stay pinned (an unmap under it is refused);
 * once it resolved the segments unmap, the session is gone, and the other sessions of the
 * engine were served meanwhile with outputs equal to a run without the close.
 */
import { describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import type { PolicyConfig } from "../../tools/reference/policy.js";
import { Prng, testSeed } from "./reference/prng.js";
import { createHost, geometryOf, retrievalOf } from "./reference/harness.js";

const seed = testSeed();
const backends = loadAddon().backendInfo().backends;

describe(`engine closeSessionAsync (seed ${seed})`, () => {
  it.each(backends)("%s: closes off the JS thread; the session refuses calls meanwhile; the others are unaffected", async (backend) => {
    const rng = new Prng(seed);
    const P = 8;
    const c: PolicyConfig = {
      qHeads: 4, kvHeads: 2, headDim: 16, pageSize: P, sinkTokens: P, windowTokens: 2 * P, selectTokens: 2 * P,
      tau: 0.9, summary: "maxmin", combine: "softmax_mean", mode: "freekv", dtype: backend === "cuda" ? "bf16" : "f32",
    };
    const layers = 2;
    const g = geometryOf(c, layers);
    const r = retrievalOf(c, { recall: 1 });
    const Engine = loadAddon().Engine;
    const make = () => new Engine(backend === "cuda" ? { backend } : { backend, threads: 2 });
    const qn = c.qHeads * c.headDim, kvn = c.kvHeads * c.headDim;
    const ctx = 5 * P + 3;
    const K = rng.normals(ctx * kvn), V = rng.normals(ctx * kvn);
    const steps = Array.from({ length: 6 }, () => ({ q: rng.normals(qn), k: rng.normals(kvn), v: rng.normals(kvn) }));
    // The other session's outputs, alone on an engine of its own.
    const run = async (withClose: boolean) => {
      const engine = make();
      const hostA = createHost(g, r, 16), hostB = createHost(g, r, 16);
      const a = engine.createSession(g, r, hostA.segments, false);
      const b = engine.createSession(g, r, hostB.segments, false);
      const outs: number[][] = [];
      try {
        for (const s of [a, b]) for (let l = 0; l < layers; l++) await engine.prefill(s, l, K, V, ctx);
        let closing: Promise<void> | undefined;
        for (const [i, st] of steps.entries()) {
          if (withClose && i === 2) {
            closing = engine.closeSessionAsync(a);
            // Closing: no calls, no second close, and its store may not be unmapped under it.
            expect(() => engine.filledPages(a, 0)).toThrow(/not open/);
            expect(() => engine.closeSessionAsync(a)).toThrow(/not open/);
            expect(() => engine.closeSession(a)).toThrow(/not open/);
            await expect((async () => engine.decode(0, [{ session: a, ...st }]))()).rejects.toThrow(/not open/);
            expect(() => hostA.segments.store.close()).toThrow(/in use/);
          }
          for (let l = 0; l < layers; l++) outs.push(Array.from((await engine.decode(l, [{ session: b, ...st }]))[0]));
        }
        if (closing) {
          await closing;
          // Let go: unmapping works now; the id is gone.
          expect(() => engine.filledPages(a, 0)).toThrow(/not open/);
        } else engine.closeSession(a);
        await hostA.dispose();
      } finally {
        engine.closeSession(b);
        await hostB.dispose();
      }
      return outs;
    };
    const alone = await run(false);
    const closed = await run(true);
    expect(closed).toEqual(alone);
  });
});
