/**
 * A speculative recall that fails in the background is its session's alone: the decode that
 * meets it (or a sync before it) reports it through takeBackgroundFailures, forgets the layer's
 * slots (the recall planned slots it never wrote), makes the same selection itself and recalls
 * it, blocking. Every session of the batch then attends exactly what it would have: the outputs
 * and attended tokens equal the float64 policy reference's at every step, and no call fails.
 * Injected with the CPU engine's debugRecallFailEvery (every k-th background recall fails after it
 * planned its slots, before writing them: the selection's new pages are in the slot map, not in
 * the slots).
 */
import { describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import { relError } from "../../tools/reference/attention.js";
import type { PolicyConfig } from "../../tools/reference/policy.js";
import { Prng, testSeed } from "./reference/prng.js";
import { prefilledSessions, quantised } from "./reference/harness.js";

const seed = testSeed();

describe(`a failed speculative recall (seed ${seed})`, () => {
  it("is reported, recalled again by the decode that meets it or after a sync, and changes no output of the batch", async () => {
    const rng = new Prng(seed);
    const addon = loadAddon();
    // Four sessions of two layers queue 8 recalls a step: every 3rd fails, each session's and
    // layer's in turn.
    const EVERY = 3;
    const engine = new addon.Engine({ backend: "cpu", threads: 2, debugRecallFailEvery: EVERY });
    const P = 4;
    const base = { qHeads: 8, kvHeads: 2, headDim: 16, pageSize: P, sinkTokens: P, windowTokens: 2 * P, selectTokens: 3 * P, tau: 0.9, summary: "maxmin", combine: "softmax_mean", dtype: "f32" } as const;
    const configs: PolicyConfig[] = [
      { ...base, mode: "freekv" },
      { ...base, mode: "speculative" }, // recalls through the double buffer (below)
      { ...base, mode: "freekv", tau: -2 }, // never corrects: every step attends the speculative selection
      // A one-page window: the page a step's token fills is not among the speculative candidates.
      { ...base, mode: "freekv", tau: -2, windowTokens: P },
    ];
    const layers = 2;
    const { sessions, refs, close } = await prefilledSessions(engine, configs, layers, rng, 12 * P + 1, (i) => ({ recall: i === 1 ? 2 : 1 }));
    try {
      const qn = base.qHeads * base.headDim,
        kvn = base.kvHeads * base.headDim;
      const reported: Array<{ session: number; message: string }> = [];
      const STEPS = 24;
      for (let t = 0; t < STEPS; t++) {
        for (let l = 0; l < layers; l++) {
          const items = sessions.map((session) => ({ session, q: quantised(rng, qn), k: quantised(rng, kvn), v: quantised(rng, kvn) }));
          const outs = await engine.decode(l, items);
          for (const [i, s] of sessions.entries()) {
            const want = refs[i][l].decode(items[i].q, items[i].k, items[i].v);
            for (let h = 0; h < base.kvHeads; h++) expect(Array.from(engine.lastAttendedTokens(s, l, h)), `session ${i} step ${t} layer ${l} head ${h}`).toEqual(want.attended[h]);
            expect(relError(outs[i], want.out), `session ${i} step ${t} layer ${l}`).toBeLessThan(1e-5);
          }
        }
        // Every third step, a sync of every session meets the failures pending then.
        if (t % 3 === 1) for (const s of sessions) await engine.sync(s);
        reported.push(...engine.takeBackgroundFailures().failures);
      }
      for (const s of sessions) await engine.sync(s);
      reported.push(...engine.takeBackgroundFailures().failures);
      expect(reported).toHaveLength(Math.floor((STEPS * layers * sessions.length) / EVERY));
      for (const f of reported) expect(f.message).toMatch(/^the speculative recall of layer [01] failed \(.*\): injected recall failure/);
      for (const s of sessions) expect(reported.some((f) => f.session === s), `session ${s}`).toBe(true);
      expect(reported.some((f) => /this step made the speculative selection again/.test(f.message))).toBe(true);
      expect(reported.some((f) => /the next selection recalls/.test(f.message))).toBe(true);
      // The recalled pages: the reference counts a speculative recall's pages once; a blocking
      // recall after a failure recalls every selected page again, so the engine recalled more.
      const recalled = sessions.map((s) => engine.stats(s).pagesRecalled);
      const refRecalled = refs.map((r) => r.reduce((a, x) => a + x.counters.pagesRecalled, 0));
      expect(recalled.reduce((a, b) => a + b, 0)).toBeGreaterThan(refRecalled.reduce((a, b) => a + b, 0));
    } finally {
      await close();
    }
  });

  it("counts only the pages that were copied, and a wait for a recall that then failed as a wait", async () => {
    const rng = new Prng(seed ^ 0x5bd1e995);
    const addon = loadAddon();
    // Every background recall fails, after planning its slots, and runs 250 ms first: each decode
    // after the first waits for its layer's recall, which fails, and then selects and recalls
    // itself, blocking, every page of its selection (the slots were forgotten). The delay is long
    // enough that the next decode of the layer arrives while the recall still runs on a loaded
    // machine too (with 20 ms, a recall sometimes failed before its decode came: 7 waits of 8).
    const engine = new addon.Engine({ backend: "cpu", threads: 2, debugRecallFailEvery: 1, debugRecallDelayMs: 250 });
    const P = 4;
    const base = { qHeads: 4, kvHeads: 2, headDim: 16, pageSize: P, sinkTokens: P, windowTokens: 2 * P, selectTokens: 3 * P, tau: 0.9, summary: "maxmin", combine: "mean", dtype: "f32", mode: "speculative" } as const;
    const K = base.selectTokens / P;
    const layers = 2;
    // 12 full pages: 9 or more candidates between the sink and the window at every step, so each
    // selection picks K pages of each KV head.
    const { sessions, refs, close } = await prefilledSessions(engine, [base, base], layers, rng, 12 * P + 1, (i) => ({ recall: i === 1 ? 2 : 1 }));
    try {
      const qn = base.qHeads * base.headDim,
        kvn = base.kvHeads * base.headDim;
      const STEPS = 5;
      for (let t = 0; t < STEPS; t++)
        for (let l = 0; l < layers; l++) {
          const items = sessions.map((session) => ({ session, q: quantised(rng, qn), k: quantised(rng, kvn), v: quantised(rng, kvn) }));
          const outs = await engine.decode(l, items);
          for (const [i] of sessions.entries()) expect(relError(outs[i], refs[i][l].decode(items[i].q, items[i].k, items[i].v).out)).toBeLessThan(1e-5);
        }
      const failures = engine.takeBackgroundFailures().failures;
      expect(failures.length).toBeGreaterThanOrEqual((STEPS - 1) * layers * sessions.length);
      for (const s of sessions) {
        const st = engine.stats(s);
        // What was copied: K pages per KV head and layer at every decode (the first decode's
        // blocking selection, then each failed recall's selection made again), nothing of the
        // recalls that failed; the planned pages of a failed recall were counted before.
        expect(st.pagesRecalled, `session ${s}`).toBe(STEPS * layers * base.kvHeads * K);
        expect(st.pagesHit).toBe(0);
        expect(st.pagesSelected).toBe(st.pagesHit + st.pagesRecalled);
        // Every decode after the first waited for its layer's recall, which then failed.
        expect(st.recallWaits, `session ${s}`).toBe((STEPS - 1) * layers);
      }
    } finally {
      await close();
    }
  });
});
