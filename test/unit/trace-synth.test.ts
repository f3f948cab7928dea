/**
 * The trace synthesiser: the properties a fidelity run depends on, checked with float64 code
 * written here (not the harness's own statistics): adjacent-query cosine in the range the FreeKV
 * paper reports, peaked attention (exact top pages at ~8% of the context hold most of the mass),
 * needles that their query finds, topic jumps that break query similarity, RoPE, determinism.
 */
import { describe, expect, it } from "vitest";
import { synthesizeTrace, type SynthTrace } from "../../tools/fidelity/synth.js";
import { applyRope, ropeFrequencies } from "../../tools/fidelity/rope.js";
import { groupAdjacentCosines, topPageMass } from "../../tools/fidelity/trace-stats.js";

// ---- independent float64 references -------------------------------------------------------

function cos64(a: Float32Array, ao: number, b: Float32Array, bo: number, d: number): number {
  let ab = 0;
  let aa = 0;
  let bb = 0;
  for (let i = 0; i < d; i++) {
    ab += a[ao + i] * b[bo + i];
    aa += a[ao + i] ** 2;
    bb += b[bo + i] ** 2;
  }
  return ab / Math.sqrt(aa * bb);
}

/** Exact softmax (scale 1/sqrt(D)) of query (t, qh) over tokens 0..N+t, as page masses. */
function pageMass64(tr: SynthTrace, t: number, qh: number, P: number): number[] {
  const { promptLen: N, qHeads: Hq, kvHeads: Hkv, headDim: D } = tr;
  const h = Math.floor(qh / (Hq / Hkv));
  const len = N + t + 1;
  const logits: number[] = [];
  for (let s = 0; s < len; s++) {
    let dot = 0;
    for (let i = 0; i < D; i++) dot += tr.q[(t * Hq + qh) * D + i] * tr.k[(s * Hkv + h) * D + i];
    logits.push(dot / Math.sqrt(D));
  }
  const m = Math.max(...logits);
  const e = logits.map((l) => Math.exp(l - m));
  const z = e.reduce((a, b) => a + b, 0);
  const pages = new Array(Math.ceil(len / P)).fill(0);
  e.forEach((x, s) => (pages[Math.floor(s / P)] += x / z));
  return pages;
}

function groupCos(tr: SynthTrace, h: number, t: number): number {
  const g = tr.qHeads / tr.kvHeads;
  let s = 0;
  for (let j = 0; j < g; j++) {
    const qh = h * g + j;
    s += cos64(tr.q, (t * tr.qHeads + qh) * tr.headDim, tr.q, ((t - 1) * tr.qHeads + qh) * tr.headDim, tr.headDim);
  }
  return s / g;
}

const SHAPE = { promptLen: 8192, steps: 64, qHeads: 8, kvHeads: 2, headDim: 64 };

describe("trace synth", () => {
  const seeds = [11, 12];
  const traces = new Map(seeds.map((seed) => [seed, synthesizeTrace({ ...SHAPE, seed })]));

  it("has the documented shapes and finite values", () => {
    const tr = traces.get(11)!;
    expect(tr.q.length).toBe(64 * 8 * 64);
    expect(tr.k.length).toBe((8192 + 64) * 2 * 64);
    expect(tr.v.length).toBe(tr.k.length);
    for (const a of [tr.q, tr.k, tr.v]) expect(a.every(Number.isFinite)).toBe(true);
    // nothing is all zeros
    expect(tr.k.some((x) => x !== 0) && tr.q.some((x) => x !== 0) && tr.v.some((x) => x !== 0)).toBe(true);
  });

  it.each(seeds)("adjacent query cosine is about 0.85-0.97 between jumps (seed %i)", (seed) => {
    const tr = traces.get(seed)!;
    const calm: number[] = [];
    const breaks: number[] = [];
    for (let h = 0; h < tr.kvHeads; h++) {
      const disrupt = new Set<number>();
      for (const j of tr.jumps[h]) disrupt.add(j);
      for (const n of tr.needles.filter((n) => n.kvHead === h)) {
        disrupt.add(n.step);
        disrupt.add(n.step + n.span);
      }
      for (let t = 1; t < tr.steps; t++) (disrupt.has(t) ? breaks : calm).push(groupCos(tr, h, t));
    }
    const mean = calm.reduce((a, b) => a + b, 0) / calm.length;
    expect(mean).toBeGreaterThan(0.85);
    expect(mean).toBeLessThan(0.97);
    // most calm steps sit in the band, and the query does move
    expect(calm.filter((c) => c > 0.85 && c < 0.99).length / calm.length).toBeGreaterThan(0.9);
    expect(Math.min(...calm)).toBeLessThan(0.97);
    // jumps (and needle questions) break the similarity below the usual tau = 0.9
    expect(breaks.length).toBeGreaterThanOrEqual(4);
    expect(breaks.filter((c) => c < 0.9).length / breaks.length).toBeGreaterThan(0.75);
    // the harness's statistics agree with this reference
    const stats = groupAdjacentCosines(tr);
    for (let h = 0; h < tr.kvHeads; h++) for (let t = 1; t < tr.steps; t++) expect(stats[h][t]).toBeCloseTo(groupCos(tr, h, t), 9);
  });

  it.each(seeds)("attention is peaked: exact top 8 percent of pages hold most of the mass (seed %i)", (seed) => {
    const tr = traces.get(seed)!;
    let sum = 0;
    let n = 0;
    for (let t = 0; t < tr.steps; t += 9)
      for (let qh = 0; qh < tr.qHeads; qh += 3) {
        const pages = pageMass64(tr, t, qh, 32).sort((a, b) => b - a);
        const keep = Math.round(0.08 * pages.length);
        sum += pages.slice(0, keep).reduce((a, b) => a + b, 0);
        n++;
      }
    const mean = sum / n;
    expect(mean).toBeGreaterThan(0.85);
    // and it is not trivially concentrated on a handful of pages (selection has work to do)
    let top4 = 0;
    for (let t = 0; t < tr.steps; t += 9) {
      const pages = pageMass64(tr, t, 0, 32).sort((a, b) => b - a);
      top4 += pages.slice(0, 4).reduce((a, b) => a + b, 0);
    }
    expect(top4 / Math.ceil(tr.steps / 9)).toBeLessThan(0.8);
    // the harness's figure agrees with the reference on the same sampled steps (all heads)
    const figure = topPageMass(tr, 32, 0.08, 9);
    expect(figure.meanMass).toBeGreaterThan(0.85);
    expect(Math.abs(figure.meanMass - mean)).toBeLessThan(0.05);
  });

  it("sinks take a steady share and the query's topic holds most of the rest", () => {
    const tr = traces.get(12)!;
    const { promptLen: N, qHeads: Hq, kvHeads: Hkv, headDim: D } = tr;
    const g = Hq / Hkv;
    const sinkShares: number[] = [];
    const topicShares: number[] = [];
    const needleSteps = new Set(tr.needles.flatMap((n) => Array.from({ length: n.span }, (_, i) => `${n.kvHead}:${n.step + i}`)));
    for (let t = 0; t < tr.steps; t += 5)
      for (let qh = 0; qh < Hq; qh += 2) {
        const h = Math.floor(qh / g);
        if (needleSteps.has(`${h}:${t}`)) continue;
        const len = N + t + 1;
        const logits: number[] = [];
        for (let s = 0; s < len; s++) {
          let dot = 0;
          for (let i = 0; i < D; i++) dot += tr.q[(t * Hq + qh) * D + i] * tr.k[(s * Hkv + h) * D + i];
          logits.push(dot / Math.sqrt(D));
        }
        const m = Math.max(...logits);
        const e = logits.map((l) => Math.exp(l - m));
        const z = e.reduce((a, b) => a + b, 0);
        let sink = 0;
        let topic = 0;
        for (let s = 0; s < len; s++) {
          const p = e[s] / z;
          if (s < 4) sink += p;
          else if (s >= N || tr.tokenTopic[h][s] === tr.stepTopic[h][t]) topic += p;
        }
        sinkShares.push(sink);
        topicShares.push(topic / (1 - sink));
      }
    const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
    expect(mean(sinkShares)).toBeGreaterThan(0.05);
    expect(mean(sinkShares)).toBeLessThan(0.6);
    expect(sinkShares.filter((x) => x > 0.01).length / sinkShares.length).toBeGreaterThan(0.8);
    expect(mean(topicShares)).toBeGreaterThan(0.7);
    // topic tokens are a small part of the context, so this is concentration, not coverage
    const h0Topic = tr.stepTopic[0][0];
    const count = Array.from(tr.tokenTopic[0]).filter((x) => x === h0Topic).length;
    expect(count / N).toBeLessThan(0.3);
  });

  it("needles: a single page takes a large share of its query's attention", () => {
    const tr = traces.get(11)!;
    expect(tr.needles.length).toBe(4);
    const g = tr.qHeads / tr.kvHeads;
    for (const nd of tr.needles) {
      let mass = 0;
      let rankSum = 0;
      for (let j = 0; j < g; j++) {
        const pages = pageMass64(tr, nd.step, nd.kvHead * g + j, 32);
        mass += pages[nd.page] / g;
        // rank among non-sink pages
        const better = pages.filter((m, p) => p > 0 && m > pages[nd.page]).length;
        rankSum += better;
      }
      expect(mass).toBeGreaterThan(0.25);
      expect(rankSum).toBe(0);
      // before its question the page is unremarkable
      const before = pageMass64(tr, Math.max(0, nd.step - 2), nd.kvHead * g, 32)[nd.page];
      expect(before).toBeLessThan(0.02);
    }
  });

  it("is deterministic for a seed and differs across seeds", () => {
    const a = synthesizeTrace({ ...SHAPE, promptLen: 2048, steps: 16, seed: 5 });
    const b = synthesizeTrace({ ...SHAPE, promptLen: 2048, steps: 16, seed: 5 });
    const c = synthesizeTrace({ ...SHAPE, promptLen: 2048, steps: 16, seed: 6 });
    expect(Buffer.from(a.q.buffer).equals(Buffer.from(b.q.buffer))).toBe(true);
    expect(Buffer.from(a.k.buffer).equals(Buffer.from(b.k.buffer))).toBe(true);
    expect(Buffer.from(a.v.buffer).equals(Buffer.from(b.v.buffer))).toBe(true);
    expect(a.jumps).toEqual(b.jumps);
    expect(a.needles).toEqual(b.needles);
    expect(Buffer.from(a.k.buffer).equals(Buffer.from(c.k.buffer))).toBe(false);
    expect(Buffer.from(a.q.buffer).equals(Buffer.from(c.q.buffer))).toBe(false);
  });

  it("jump-every 0 gives no jumps and needles 0 gives no needles", () => {
    const tr = synthesizeTrace({ ...SHAPE, promptLen: 2048, steps: 32, jumpEvery: 0, needles: 0, seed: 3 });
    expect(tr.jumps.every((j) => j.length === 0)).toBe(true);
    expect(tr.needles).toEqual([]);
    for (let h = 0; h < tr.kvHeads; h++) for (let t = 1; t < tr.steps; t++) expect(groupCos(tr, h, t)).toBeGreaterThan(0.8);
  });

  it("rejects bad options naming them", () => {
    expect(() => synthesizeTrace({ qHeads: 6, kvHeads: 4 })).toThrow(/--q-heads/);
    expect(() => synthesizeTrace({ headDim: 60 })).toThrow(/--head-dim/);
    expect(() => synthesizeTrace({ steps: 0 })).toThrow(/--steps/);
    expect(() => synthesizeTrace({ drift: -1 })).toThrow(/--drift/);
  });
});

describe("RoPE", () => {
  it("matches a complex-number rotation and depends only on relative position", () => {
    const D = 16;
    const theta = 10000;
    const freqs = ropeFrequencies(D, theta);
    let seed = 7;
    const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32) * 2 - 1;
    const x = Float64Array.from({ length: D }, rnd);
    const y = Float64Array.from({ length: D }, rnd);
    const rot = (vec: Float64Array, pos: number) => {
      const out = new Float64Array(D);
      for (let i = 0; i < D / 2; i++) {
        // (a + ib) * e^{i pos w}, pairing channel i with i + D/2
        const w = pos * Math.pow(theta, (-2 * i) / D);
        const re = vec[i] * Math.cos(w) - vec[i + D / 2] * Math.sin(w);
        const im = vec[i] * Math.sin(w) + vec[i + D / 2] * Math.cos(w);
        out[i] = re;
        out[i + D / 2] = im;
      }
      return out;
    };
    const got = new Float64Array(D);
    applyRope(x, 37, freqs, got);
    const want = rot(x, 37);
    for (let i = 0; i < D; i++) expect(got[i]).toBeCloseTo(want[i], 12);
    const dot = (m: number, n: number) => {
      const a = new Float64Array(D);
      const b = new Float64Array(D);
      applyRope(x, m, freqs, a);
      applyRope(y, n, freqs, b);
      return a.reduce((s, ai, i) => s + ai * b[i], 0);
    };
    expect(dot(100, 40)).toBeCloseTo(dot(1060, 1000), 9);
    expect(Math.abs(dot(100, 40) - dot(100, 41))).toBeGreaterThan(1e-6);
  });
});
