/**
 * Re-attach: a fresh Engine over a copy of a session's segments (store, staging, tail, manifest)
 * continues with exactly the outputs the original session produces, for every mode, whether the
 * copy is taken between steps or in the middle of a step (some layers one token ahead), with the
 * partial page coming from the tail or from a page the advanced layer already offloaded.
 */
import { describe, expect, it } from "vitest";
import { loadAddon, type Engine } from "../../native/binding.js";
import type { ModeName, PolicyConfig } from "../../tools/reference/policy.js";
import { Prng, testSeed } from "./reference/prng.js";
import { createHost, geometryOf, retrievalOf, type Host } from "./reference/harness.js";

const seed = testSeed();
const layers = 3;
// A small freekv session (pages of 4 tokens) for the refusals.
const SMALL: PolicyConfig = {
  qHeads: 4, kvHeads: 2, headDim: 16, pageSize: 4, sinkTokens: 4, windowTokens: 8, selectTokens: 8,
  tau: 0.9, summary: "maxmin", combine: "softmax_mean", mode: "freekv", dtype: "f32",
};

interface Step {
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
}

async function decodeLayer(engine: Engine, session: number, l: number, s: Step): Promise<Float32Array> {
  const [o] = await engine.decode(l, [{ session, q: s.q, k: s.k, v: s.v }]);
  return o;
}

describe(`re-attach continues with identical outputs (seed ${seed})`, () => {
  const cases: Array<{ mode: ModeName; dtype: "f32" | "bf16"; recall: 1 | 2; cut: "between" | "mid-tail" | "mid-page" }> = [
    { mode: "freekv", dtype: "f32", recall: 1, cut: "between" },
    { mode: "freekv", dtype: "bf16", recall: 2, cut: "mid-tail" },
    { mode: "freekv", dtype: "f32", recall: 1, cut: "mid-page" },
    { mode: "speculative", dtype: "f32", recall: 2, cut: "mid-page" },
    { mode: "oracle", dtype: "f32", recall: 1, cut: "mid-tail" },
    { mode: "sink_window", dtype: "bf16", recall: 1, cut: "between" },
    { mode: "dense", dtype: "f32", recall: 1, cut: "mid-page" },
    { mode: "resident_sparse", dtype: "bf16", recall: 2, cut: "mid-page" },
  ];
  for (const [ci, cs] of cases.entries())
    it(`${cs.mode} ${cs.dtype} recall=${cs.recall === 1 ? "gather" : "double_buffer"} cut ${cs.cut}`, async () => {
      const rng = new Prng(seed + ci);
      const addon = loadAddon();
      const P = 8;
      const c: PolicyConfig = {
        qHeads: 8, kvHeads: 2, headDim: 32, pageSize: P, sinkTokens: P, windowTokens: 2 * P, selectTokens: 3 * P,
        tau: 0.9, summary: "maxmin", combine: "softmax_mean", mode: cs.mode, dtype: cs.dtype,
      };
      const g = geometryOf(c, layers);
      const r = retrievalOf(c, { recall: cs.recall, denseLayers: cs.mode === "freekv" ? [0] : [] });
      const qn = c.qHeads * c.headDim,
        kvn = c.kvHeads * c.headDim;
      const hosts: Host[] = [createHost(g, r, 64)];
      const e1 = new addon.Engine({ backend: "cpu", threads: 2 });
      const s1 = e1.createSession(g, r, hosts[0].segments, false);
      let e2: Engine | undefined;
      let s2 = -1;
      try {
        const n = 10 * P + 3;
        for (let l = 0; l < layers; l++)
          await e1.prefillAttend(s1, l, rng.normals(n * qn), rng.normals(n * kvn), rng.normals(n * kvn), n);
        // Queries drift (adjacent cosine ~0.95) with a jump every 6th step, so freekv corrects
        // only some steps and the speculative pages matter.
        let qs = Array.from({ length: layers }, () => rng.normals(qn));
        const steps: Step[][] = Array.from({ length: 2 * P + 4 }, (_, t) => {
          qs = qs.map((q) => q.map((x) => (t % 6 === 5 ? rng.normal() : x + 0.3 * rng.normal())));
          return qs.map((q) => ({ q, k: rng.normals(kvn), v: rng.normals(kvn) }));
        });
        // Cut at the step whose token fills a page ("mid-page") or one that does not.
        const firstFill = (P - (n % P)) - 1; // step index whose append completes a page
        const cutStep = cs.cut === "mid-page" ? firstFill + P : firstFill + 3;
        const original: Float32Array[][] = [];
        for (let t = 0; t < steps.length; t++) {
          original.push([]);
          for (let l = 0; l < layers; l++) {
            if (t === cutStep && l === 1 && cs.cut !== "between") {
              // Process dies here: layer 0 has step t, layers 1.. do not.
              await e1.sync(s1);
              hosts.push(createHost(g, r, 64, hosts[0]));
            }
            original[t].push(await decodeLayer(e1, s1, l, steps[t][l]));
          }
          if (t === cutStep && cs.cut === "between") {
            await e1.sync(s1);
            hosts.push(createHost(g, r, 64, hosts[0]));
          }
        }
        expect(hosts.length).toBe(2);
        e2 = new addon.Engine({ backend: "cpu", threads: 1 });
        s2 = e2.createSession(g, r, hosts[1].segments, true);
        const resume = cs.cut === "between" ? cutStep + 1 : cutStep;
        expect(e2.contextTokens(s2)).toBe(n + resume);
        for (let t = resume; t < steps.length; t++)
          for (let l = 0; l < layers; l++) {
            const o = await decodeLayer(e2, s2, l, steps[t][l]);
            expect(Array.from(o), `step ${t} layer ${l}`).toEqual(Array.from(original[t][l]));
          }
        for (let l = 0; l < layers; l++)
          for (let h = 0; h < c.kvHeads; h++)
            expect(Array.from(e2.lastAttendedTokens(s2, l, h))).toEqual(Array.from(e1.lastAttendedTokens(s1, l, h)));
        expect(e2.contextTokens(s2)).toBe(e1.contextTokens(s1));
        if (cs.mode === "freekv") {
          const st = e1.stats(s1);
          expect(st.corrections).toBeGreaterThan(0);
          expect(st.corrections).toBeLessThan(st.selections);
        }
      } finally {
        e1.closeSession(s1);
        if (e2 && s2 >= 0) e2.closeSession(s2);
        for (const h of hosts) await h.dispose();
      }
    });

  it("refuses segments that hold no session", async () => {
    const addon = loadAddon();
    const c = SMALL;
    const g = geometryOf(c, 2);
    const r = retrievalOf(c);
    const host = createHost(g, r, 16);
    // The kvstore initialises the manifest of a new session; these segments hold none.
    new Uint8Array(host.segments.manifest.buffer()).fill(0);
    const e = new addon.Engine({ backend: "cpu" });
    try {
      expect(() => e.createSession(g, r, host.segments, true)).toThrow(/manifest.*bad magic/);
      const s = e.createSession(g, r, host.segments, false);
      e.closeSession(s);
      expect(() => e.createSession({ ...g, layers: 1 }, r, host.segments, true)).toThrow(/manifest has 2 layers/);
    } finally {
      await host.dispose();
    }
  });

  it("refuses a manifest with more committed pages than the session's reservation", async () => {
    const addon = loadAddon();
    const rng = new Prng(seed);
    const c = SMALL;
    const g = geometryOf(c, 2);
    const r = retrievalOf(c);
    const host = createHost(g, r, 16);
    const e = new addon.Engine({ backend: "cpu" });
    const pages = 3 + rng.int(6);
    const n = pages * c.pageSize + rng.int(c.pageSize);
    const kv = () => rng.normals(n * c.kvHeads * c.headDim);
    try {
      const s = e.createSession(g, r, host.segments, false);
      for (let l = 0; l < 2; l++) await e.prefill(s, l, kv(), kv(), n);
      e.closeSession(s);
      // Its own reservation re-attaches; one page short of what the manifest says was committed does not.
      const again = e.createSession(g, r, { ...host.segments, reservedPages: pages }, true);
      e.closeSession(again);
      expect(() => e.createSession(g, r, { ...host.segments, reservedPages: pages - 1 }, true)).toThrow(
        new RegExp(`has ${pages} committed pages, more than the session's reservation of ${pages - 1}`),
      );
    } finally {
      await host.dispose();
    }
  });
});
