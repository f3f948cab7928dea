/**
 * No slot is overwritten while attention may read it, in both directions of the race:
 * - recalls slowed down (debugRecallDelayMs): the next step of a layer arrives while that
 *   layer's speculative recall is still writing; attention must wait for it (recallWaits);
 * - attention slowed down (debugAttendDelayMs): the next step's speculative selection runs
 *   during this step's attention and must not write the slots before attention released them
 *   (guardWaits).
 * Every output must still be exact attention over the tokens the float64 policy reference
 * selects. Two sessions of different modes share each batched decode call, over two layers.
 */
import { describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import { relError } from "../../tools/reference/attention.js";
import type { PolicyConfig } from "../../tools/reference/policy.js";
import { Prng, testSeed } from "./reference/prng.js";
import { prefilledSessions, quantised } from "./reference/harness.js";

const seed = testSeed();

describe(`recall never overwrites slots under attention (seed ${seed})`, () => {
  it.each([
    ["delayed background recalls: the next step waits", { debugRecallDelayMs: 15 }, "recallWaits"],
    ["delayed attention: the recall waits for the slots", { debugAttendDelayMs: 8 }, "guardWaits"],
  ] as const)("%s, outputs stay exact", async (_name, debug, counter) => {
    const rng = new Prng(seed);
    const addon = loadAddon();
    const engine = new addon.Engine({ backend: "cpu", threads: 2, ...debug });
    const P = 4;
    const base = { qHeads: 8, kvHeads: 2, headDim: 16, pageSize: P, sinkTokens: P, windowTokens: 2 * P, selectTokens: 3 * P, tau: 0.9, summary: "maxmin", combine: "softmax_mean", dtype: "f32" } as const;
    const configs: PolicyConfig[] = [
      { ...base, mode: "freekv" },
      { ...base, mode: "speculative" }, // recalls through the double buffer (below)
    ];
    const layers = 2;
    const { sessions, refs, close } = await prefilledSessions(engine, configs, layers, rng, 12 * P + 1, (i) => ({ recall: i === 1 ? 2 : 1 }));
    try {
      const qn = base.qHeads * base.headDim,
        kvn = base.kvHeads * base.headDim;
      for (let t = 0; t < 20; t++)
        for (let l = 0; l < layers; l++) {
          const items = sessions.map((session) => ({ session, q: quantised(rng, qn), k: quantised(rng, kvn), v: quantised(rng, kvn) }));
          const outs = await engine.decode(l, items);
          for (const [i, s] of sessions.entries()) {
            const want = refs[i][l].decode(items[i].q, items[i].k, items[i].v);
            for (let h = 0; h < base.kvHeads; h++) expect(Array.from(engine.lastAttendedTokens(s, l, h))).toEqual(want.attended[h]);
            expect(relError(outs[i], want.out), `session ${i} step ${t} layer ${l}`).toBeLessThan(1e-5);
          }
        }
      // The background thread serves the sessions in turn: at least the first of each step waited.
      let waits = 0;
      for (const [i, s] of sessions.entries()) {
        await engine.sync(s);
        const st = engine.stats(s);
        waits += st[counter];
        expect(st.pagesRecalled).toBe(refs[i].reduce((a, r) => a + r.counters.pagesRecalled, 0));
        expect(st.pagesHit).toBe(refs[i].reduce((a, r) => a + r.counters.pagesHit, 0));
      }
      expect(waits).toBeGreaterThan(0);
    } finally {
      await close();
    }
  });
});
