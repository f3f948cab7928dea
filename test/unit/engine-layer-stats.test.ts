/**
 * Per-layer retrieval statistics of the CPU engine (native/src/engine/RetrievalStats.h) through
 * the binding: decode steps whose queries turn by a chosen cosine per query head (so the group
 * cosines spread over the histogram's buckets), checked against a float64 computation of the same
 * group cosines from the raw queries (mean over a KV head's query heads of cos(q_t, q_{t-1}),
 * sampled at every decode that is not the first after a prefill), the top-k overlap against the
 * selected pages the engine reports it attended, and the per-layer counters against the totals.
 */
import { describe, expect, it } from "vitest";
import { loadAddon, type EngineStats } from "../../native/binding.js";
import type { ModeName, PolicyConfig } from "../../tools/reference/policy.js";
import { Prng, testSeed } from "./reference/prng.js";
import { openSession, quantised } from "./reference/harness.js";

const seed = testSeed();
const f32 = Math.fround;

/** q_t = c * |q|/|u| * u + s * |q|/|n| * n per head, u = q_{t-1}, n orthogonal to u: cos = c. */
function turn(rng: Prng, prev: Float32Array, heads: number, D: number, cos: (h: number) => number): Float32Array {
  const out = new Float32Array(prev.length);
  for (let h = 0; h < heads; h++) {
    const u = prev.subarray(h * D, (h + 1) * D);
    const n = Array.from({ length: D }, () => rng.normal());
    const uu = u.reduce((a, x) => a + x * x, 0);
    const un = u.reduce((a, x, i) => a + x * n[i], 0);
    for (let i = 0; i < D; i++) n[i] -= (un / uu) * u[i];
    const nn = Math.sqrt(n.reduce((a, x) => a + x * x, 0));
    const c = cos(h),
      s = Math.sqrt(Math.max(0, 1 - c * c));
    const scale = 0.5 + rng.normal() ** 2; // the norm changes too: the cosine must not care
    for (let i = 0; i < D; i++) out[h * D + i] = scale * (c * u[i] + (s * Math.sqrt(uu) * n[i]) / nn);
  }
  return out;
}

/** The engine's group cosine in float64 from the raw float32 queries, rounded to float32 as it is. */
function groupCosine(q: Float32Array, p: Float32Array, kvHead: number, group: number, D: number): number {
  let acc = 0;
  for (let j = 0; j < group; j++) {
    const o = (kvHead * group + j) * D;
    let ab = 0,
      aa = 0,
      bb = 0;
    for (let d = 0; d < D; d++) {
      ab += q[o + d] * p[o + d];
      aa += q[o + d] * q[o + d];
      bb += p[o + d] * p[o + d];
    }
    const den = Math.sqrt(aa) * Math.sqrt(bb);
    acc += den > 0 ? ab / den : 0;
  }
  return f32(acc / group);
}

interface Expected {
  samples: number;
  sum: number;
  sumSq: number;
  min: number;
  hist: number[];
  belowTau: number;
  overlapPages: number;
  overlapBase: number;
}

const modes: ModeName[] = ["freekv", "speculative", "oracle", "dense", "sink_window"];

describe(`per-layer retrieval statistics, CPU engine (seed ${seed})`, () => {
  const addon = loadAddon();
  const edges = addon.cosineBucketEdges();

  it("exports the histogram's bucket edges (tau = 0.8 and 0.9 among them)", () => {
    expect(edges.length).toBe(9);
    for (let i = 1; i < edges.length; i++) expect(edges[i]).toBeGreaterThan(edges[i - 1]);
    expect(edges).toContain(f32(0.8));
    expect(edges).toContain(f32(0.9));
  });

  for (const [mi, mode] of modes.entries())
    it(`${mode}: cosine, overlap and per-layer counters`, async () => {
      const rng = new Prng(seed + 31 * mi);
      const layers = 3,
        qHeads = 8,
        kvHeads = 2,
        D = 16,
        P = 4,
        group = qHeads / kvHeads;
      const c: PolicyConfig = {
        qHeads,
        kvHeads,
        headDim: D,
        pageSize: P,
        summary: "maxmin",
        combine: "softmax_mean",
        sinkTokens: P,
        windowTokens: 2 * P,
        selectTokens: 3 * P,
        tau: 0.9,
        mode,
        dtype: "f32",
      };
      const denseLayers = [2]; // a dense layer samples cosines too
      const es = openSession(c, { layers, capacityPages: 128, retrieval: { denseLayers } });
      const { engine, session } = es;
      try {
        const qn = qHeads * D,
          kvn = kvHeads * D;
        const retrieves = (l: number) => mode !== "dense" && mode !== "sink_window" && !denseLayers.includes(l);
        const exp: Expected[] = Array.from({ length: layers }, () => ({
          samples: 0,
          sum: 0,
          sumSq: 0,
          min: 0,
          hist: new Array(edges.length + 1).fill(0),
          belowTau: 0,
          overlapPages: 0,
          overlapBase: 0,
        }));
        // Per layer: the previous decode's query (null after a prefill) and selected pages.
        const prevQ: (Float32Array | null)[] = new Array(layers).fill(null);
        const prevSel: (number[][] | null)[] = new Array(layers).fill(null);
        const lastQ: Float32Array[] = [];
        let tokens = 0;
        const prefill = async (n: number, withQueries: boolean) => {
          for (let l = 0; l < layers; l++) {
            const k = quantised(rng, n * kvn),
              v = quantised(rng, n * kvn);
            if (withQueries) {
              const q = quantised(rng, n * qn);
              await engine.prefillAttend(session, l, q, k, v, n);
              lastQ[l] = q.slice((n - 1) * qn);
            } else {
              await engine.prefill(session, l, k, v, n);
            }
            prevQ[l] = null;
            prevSel[l] = null;
          }
          tokens += n;
        };
        const decode = async (steps: number) => {
          for (let t = 0; t < steps; t++) {
            tokens += 1;
            const full = Math.floor(tokens / P);
            const sinkEnd = Math.min(c.sinkTokens / P, full);
            const windowBegin = Math.max(sinkEnd, full - (c.windowTokens / P - 1));
            for (let l = 0; l < layers; l++) {
              // Per group a cosine spread over [-0.3, 1), half of them in [0.8, 1) around tau; its
              // query heads turn by that cosine, give or take 0.02.
              const gt = Array.from({ length: kvHeads }, () => (rng.next() < 0.5 ? 0.8 + 0.2 * rng.next() : -0.3 + 1.3 * rng.next()));
              const target = (h: number) => Math.min(1, gt[Math.floor(h / group)] + 0.02 * (rng.next() - 0.5));
              const q = turn(rng, lastQ[l] ?? rng.normals(qn), qHeads, D, target);
              await engine.decode(l, [{ session, q, k: quantised(rng, kvn), v: quantised(rng, kvn) }]);
              const e = exp[l];
              const p = prevQ[l];
              if (p)
                for (let h = 0; h < kvHeads; h++) {
                  const cos = groupCosine(q, p, h, group, D);
                  e.min = e.samples === 0 ? cos : Math.min(e.min, cos);
                  e.samples += 1;
                  e.sum += cos;
                  e.sumSq += cos * cos;
                  e.hist[edges.filter((x) => cos >= x).length] += 1;
                  if (cos < f32(c.tau)) e.belowTau += 1;
                }
              // The selected pages attention read, from the attended tokens.
              const sel: number[][] = [];
              for (let h = 0; h < kvHeads; h++) {
                const pages = new Set(Array.from(engine.lastAttendedTokens(session, l, h), (x) => Math.floor(x / P)));
                sel.push([...pages].filter((pg) => pg >= sinkEnd && pg < windowBegin));
              }
              if (retrieves(l)) {
                if (p && prevSel[l])
                  for (let h = 0; h < kvHeads; h++) {
                    e.overlapBase += sel[h].length;
                    e.overlapPages += sel[h].filter((pg) => prevSel[l]![h].includes(pg)).length;
                  }
                prevSel[l] = sel;
              }
              prevQ[l] = q;
              lastQ[l] = q;
            }
          }
        };
        await prefill(9 * P + 1, true);
        await decode(4 * P + 3);
        await prefill(P + 2, false); // the next decode takes no sample
        await decode(2 * P + 1);
        await engine.sync(session);
        const st: EngineStats = engine.stats(session);

        expect(st.layers.length).toBe(layers);
        const total = (f: (l: EngineStats["layers"][number]) => number) => st.layers.reduce((a, l) => a + f(l), 0);
        expect(total((l) => l.selections)).toBe(st.selections);
        expect(total((l) => l.corrections)).toBe(st.corrections);
        expect(total((l) => l.pagesSelected)).toBe(st.pagesSelected);
        expect(total((l) => l.pagesHit)).toBe(st.pagesHit);
        expect(total((l) => l.pagesRecalled)).toBe(st.pagesRecalled);
        expect(st.recallBytes).toBe(st.pagesRecalled * 2 * P * D * 4);

        for (let l = 0; l < layers; l++) {
          const got = st.layers[l],
            e = exp[l];
          const at = `layer ${l}`;
          expect(e.samples, at).toBe((4 * P + 3 - 1 + 2 * P + 1 - 1) * kvHeads);
          expect(got.cosineSamples, at).toBe(e.samples);
          expect(got.cosineSum, at).toBeCloseTo(e.sum, 9);
          expect(got.cosineSumSq, at).toBeCloseTo(e.sumSq, 9);
          expect(got.cosineMin, at).toBe(e.min);
          expect(got.cosineHistogram, at).toEqual(e.hist);
          expect(got.cosineBelowTau, at).toBe(e.belowTau);
          expect(got.overlapBase, at).toBe(e.overlapBase);
          expect(got.overlapPages, at).toBe(e.overlapPages);
          // The samples spread: several buckets, some on each side of tau.
          expect(e.hist.filter((x) => x > 0).length, at).toBeGreaterThanOrEqual(4);
          expect(e.belowTau, at).toBeGreaterThan(0);
          expect(e.belowTau, at).toBeLessThan(e.samples);
          if (retrieves(l)) {
            expect(got.selections, at).toBe((4 * P + 3 + 2 * P + 1) * kvHeads);
            expect(e.overlapBase, at).toBeGreaterThan(0);
            expect(got.pagesSelected, at).toBe(got.pagesHit + got.pagesRecalled);
          } else {
            expect(got.selections, at).toBe(0);
            expect(got.pagesSelected, at).toBe(0);
            expect(e.overlapBase, at).toBe(0);
          }
          // freekv corrects exactly the groups below tau (after the first decode of a turn,
          // which selects anyway); no other mode corrects.
          expect(got.corrections, at).toBe(mode === "freekv" && retrieves(l) ? e.belowTau : 0);
        }
      } finally {
        await es.close();
      }
    });
});
