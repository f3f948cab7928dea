/**
 * The replay's metrics against float64 references written here, with scripted targets whose
 * attended sets and outputs are known; then the float64 policy model's invariants (dense
 * equivalence, tau extremes, constant query) and the "done when" on generated traces.
 */
import { describe, expect, it } from "vitest";
import { replay, type TraceData } from "../../tools/fidelity/replay.js";
import type { ReplayTarget } from "../../tools/fidelity/replay-target.js";
import { PolicyModel } from "../../tools/fidelity/policy-model.js";
import { FIDELITY_DEFAULTS, type ModeName, type RetrievalSettings } from "../../tools/fidelity/modes.js";
import { Prng } from "../../tools/fidelity/random.js";
import { synthesizeTrace } from "../../tools/fidelity/synth.js";

// ---- float64 references ------------------------------------------------------------------

function probs64(tr: TraceData, t: number, qh: number): number[] {
  const { promptLen: N, qHeads: Hq, kvHeads: Hkv, headDim: D } = tr;
  const h = Math.floor(qh / (Hq / Hkv));
  const l: number[] = [];
  for (let s = 0; s <= N + t; s++) {
    let dot = 0;
    for (let i = 0; i < D; i++) dot += tr.q[(t * Hq + qh) * D + i] * tr.k[(s * Hkv + h) * D + i];
    l.push(dot / Math.sqrt(D));
  }
  const m = Math.max(...l);
  const e = l.map((x) => Math.exp(x - m));
  const z = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / z);
}

function output64(tr: TraceData, t: number, qh: number, tokens: number[]): number[] {
  const p = probs64(tr, t, qh);
  const { kvHeads: Hkv, headDim: D, qHeads: Hq } = tr;
  const h = Math.floor(qh / (Hq / Hkv));
  const z = tokens.reduce((a, s) => a + p[s], 0);
  const out = new Array(D).fill(0);
  for (const s of tokens) for (let i = 0; i < D; i++) out[i] += (p[s] / z) * tr.v[(s * Hkv + h) * D + i];
  return out;
}

function randomTrace(seed: number, N: number, T: number, Hq: number, Hkv: number, D: number): TraceData {
  const r = new Prng(seed);
  const g = (n: number, s: number) => Float32Array.from({ length: n }, () => r.gaussian() * s);
  return { promptLen: N, steps: T, qHeads: Hq, kvHeads: Hkv, headDim: D, q: g(T * Hq * D, 1.5), k: g((N + T) * Hkv * D, 1.5), v: g((N + T) * Hkv * D, 1) };
}

/** A target that attends a seeded random subset per step and KV head, and counts made-up traffic. */
class ScriptedTarget implements ReplayTarget {
  len = 0;
  step = 0;
  sets: number[][] = [];
  outputs: number[][] = [];
  perturb: number;
  constructor(
    private tr: TraceData,
    private seed: number,
    perturb = 0,
  ) {
    this.perturb = perturb;
  }
  async prefill(_k: Float32Array, _v: Float32Array, n: number) {
    this.len += n;
  }
  async decode() {
    this.len++;
    const { qHeads: Hq, kvHeads: Hkv, headDim: D } = this.tr;
    const r = new Prng(this.seed, this.step);
    this.sets = [];
    for (let h = 0; h < Hkv; h++) {
      const set: number[] = [];
      for (let s = 0; s < this.len; s++) if (r.uniform() < 0.3 || s === this.len - 1) set.push(s);
      this.sets.push(set);
    }
    const out = new Float32Array(Hq * D);
    for (let qh = 0; qh < Hq; qh++) {
      const o = output64(this.tr, this.step, qh, this.sets[Math.floor(qh / (Hq / Hkv))]);
      for (let i = 0; i < D; i++) out[qh * D + i] = o[i] * (1 + this.perturb);
    }
    this.step++;
    return out;
  }
  attended(h: number) {
    return this.sets[h];
  }
  counters() {
    return { recallBytes: 1000 + 4096 * this.step, corrections: this.step };
  }
  async close() {}
}

const geoOf = (tr: TraceData) => ({ qHeads: tr.qHeads, kvHeads: tr.kvHeads, headDim: tr.headDim, capacityTokens: tr.promptLen + tr.steps });

describe("replay metrics", () => {
  it("mass recall, relative error and counters match the float64 reference", async () => {
    const tr = randomTrace(3, 300, 7, 4, 2, 16);
    const budget = { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 48, tau: 0.9 };
    const r = await replay(tr, ["oracle", "freekv"], (m) => new ScriptedTarget(tr, m === "oracle" ? 1 : 2, m === "oracle" ? 0 : 0.1), { prefillChunk: 128, budget });
    // ideal: sink page + window (partial page + 1 full page) + each head's best 3 pages between
    let ideal = 0;
    for (let t = 0; t < tr.steps; t++)
      for (let qh = 0; qh < tr.qHeads; qh++) {
        const p = probs64(tr, t, qh);
        const len = p.length;
        const full = Math.floor(len / 16);
        const pageMass = (pg: number) => p.slice(pg * 16, pg * 16 + 16).reduce((a, b) => a + b, 0);
        let kept = pageMass(0) + p.slice((full - 1) * 16).reduce((a, b) => a + b, 0);
        const mid = Array.from({ length: full - 2 }, (_, i) => pageMass(i + 1)).sort((a, b) => b - a);
        kept += mid[0] + mid[1] + mid[2];
        ideal += kept;
      }
    expect(r.idealMass).toBeCloseTo(ideal / (tr.steps * tr.qHeads), 10);
    for (const [mode, seed, perturb] of [["oracle", 1, 0], ["freekv", 2, 0.1]] as const) {
      let mass = 0;
      let err = 0;
      for (let t = 0; t < tr.steps; t++) {
        const len = tr.promptLen + t + 1;
        const rr = new Prng(seed, t);
        const sets: number[][] = [];
        for (let h = 0; h < tr.kvHeads; h++) {
          const set: number[] = [];
          for (let s = 0; s < len; s++) if (rr.uniform() < 0.3 || s === len - 1) set.push(s);
          sets.push(set);
        }
        for (let qh = 0; qh < tr.qHeads; qh++) {
          const h = Math.floor(qh / 2);
          const p = probs64(tr, t, qh);
          mass += sets[h].reduce((a, s) => a + p[s], 0);
          const exact = output64(tr, t, qh, Array.from({ length: len }, (_, i) => i));
          const got = output64(tr, t, qh, sets[h]).map((x) => Math.fround(x * (1 + perturb)));
          const num = Math.sqrt(got.reduce((a, x, i) => a + (x - exact[i]) ** 2, 0));
          const den = Math.sqrt(exact.reduce((a, x) => a + x * x, 0));
          err += num / den;
        }
      }
      const m = r.modes[mode]!;
      expect(m.mass_recall).toBeCloseTo(mass / (tr.steps * tr.qHeads), 10);
      expect(m.rel_error).toBeCloseTo(err / (tr.steps * tr.qHeads), 6);
      expect(m.mass_recall).toBeGreaterThan(0.1);
      expect(m.mass_recall).toBeLessThan(0.9);
      expect(m.rel_error).toBeGreaterThan(0.01);
      // 4096 bytes per step; corrections one per step over 2 KV heads
      expect(m.recall_bytes_per_step).toBe(4096);
      expect(m.correction_rate).toBeCloseTo(1 / 2, 12);
    }
  });
});

describe("float64 policy model", () => {
  const settings: RetrievalSettings = { pageSize: 16, sinkTokens: 32, windowTokens: 32, selectTokens: 64, tau: 0.9 };

  it("dense mode and budget >= context reproduce exact attention", async () => {
    const tr = randomTrace(9, 200, 6, 4, 1, 16);
    const big = { ...settings, selectTokens: 512 };
    const r = await replay(tr, ["dense", "oracle", "freekv", "speculative"], (m) => new PolicyModel(geoOf(tr), m === "dense" ? settings : big, m));
    for (const m of ["dense", "oracle", "freekv", "speculative"] as ModeName[]) {
      expect(r.modes[m]!.mass_recall).toBeCloseTo(1, 12);
      expect(r.modes[m]!.rel_error).toBeLessThan(1e-6);
    }
  });

  it("tau = -1 never corrects, tau > 1 corrects every step after the first", async () => {
    const tr = randomTrace(10, 400, 9, 4, 2, 16);
    const never = await replay(tr, ["freekv"], (m) => new PolicyModel(geoOf(tr), { ...settings, tau: -1 }, m));
    const always = await replay(tr, ["freekv"], (m) => new PolicyModel(geoOf(tr), { ...settings, tau: 1.5 }, m));
    const spec = await replay(tr, ["speculative", "oracle"], (m) => new PolicyModel(geoOf(tr), settings, m));
    expect(never.modes.freekv!.correction_rate).toBe(0);
    expect(always.modes.freekv!.correction_rate).toBeCloseTo((tr.steps - 1) / tr.steps, 12);
    // no correction = speculative; correcting every step = oracle
    expect(never.modes.freekv!.mass_recall).toBeCloseTo(spec.modes.speculative!.mass_recall, 12);
    expect(always.modes.freekv!.mass_recall).toBeCloseTo(spec.modes.oracle!.mass_recall, 12);
    expect(spec.modes.oracle!.mass_recall).not.toBeCloseTo(spec.modes.speculative!.mass_recall, 4);
  });

  it("a constant query makes speculative equal to oracle", async () => {
    const tr = randomTrace(12, 400, 8, 4, 2, 16);
    for (let t = 1; t < tr.steps; t++) tr.q.copyWithin(t * 4 * 16, 0, 4 * 16);
    const r = await replay(tr, ["speculative", "oracle", "sink_window"], (m) => new PolicyModel(geoOf(tr), settings, m));
    expect(r.modes.speculative!.mass_recall).toBeCloseTo(r.modes.oracle!.mass_recall, 12);
    expect(r.modes.speculative!.rel_error).toBeCloseTo(r.modes.oracle!.rel_error, 12);
    expect(r.modes.oracle!.mass_recall).toBeGreaterThan(r.modes.sink_window!.mass_recall);
  });

  it("on generated traces: freekv within 0.005 of oracle, speculative below, sink_window far below", async () => {
    for (const seed of [21]) {
      const tr = synthesizeTrace({ promptLen: 8192, steps: 64, qHeads: 8, kvHeads: 2, headDim: 64, seed });
      const r = await replay(tr, ["oracle", "speculative", "freekv", "sink_window"], (m) => new PolicyModel(geoOf(tr), FIDELITY_DEFAULTS, m), { budget: FIDELITY_DEFAULTS });
      // the ideal per-head selection bounds the group-consistent, summary-based one
      expect(r.idealMass!).toBeGreaterThanOrEqual(r.modes.oracle!.mass_recall);
      expect(r.idealMass!).toBeLessThan(1);
      const { oracle, speculative, freekv, sink_window } = r.modes as Record<string, { mass_recall: number; correction_rate: number }>;
      expect(oracle.mass_recall).toBeGreaterThan(0.9);
      expect(freekv.mass_recall).toBeGreaterThanOrEqual(oracle.mass_recall - 0.005);
      expect(speculative.mass_recall).toBeLessThan(oracle.mass_recall - 0.02);
      expect(sink_window.mass_recall).toBeLessThan(oracle.mass_recall - 0.3);
      expect(freekv.correction_rate).toBeGreaterThan(0.02);
      expect(freekv.correction_rate).toBeLessThan(0.5);
      // the losses of speculative sit at the topic jumps
      const loss = (t: number) => r.perStep.oracle![t] - r.perStep.speculative![t];
      const jumpSteps = new Set(tr.jumps.flat());
      const atJumps = [...jumpSteps].reduce((a, t) => a + loss(t), 0) / jumpSteps.size;
      expect(atJumps).toBeGreaterThan(0.1);
    }
  });
});
