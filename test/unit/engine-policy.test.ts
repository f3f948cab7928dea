/**
 * The CPU engine against the float64 reference of the FreeKV policy (test/unit/reference/policy.ts):
 * per step the attended tokens of every KV head and the outputs, and at the end the selection
 * and residency counters, for every mode, both summaries, all group combines and several shapes.
 */
import { describe, expect, it } from "vitest";
import { relError } from "../../tools/reference/attention.js";
import { withEnv } from "../helpers/env.js";
import { DEFAULT_RESIDENT_FACTOR, ReferenceLayer, type ModeName, type PolicyConfig } from "../../tools/reference/policy.js";
import { Prng, testSeed } from "./reference/prng.js";
import { openSession, quantised } from "./reference/harness.js";
import type { CombineName } from "../../tools/reference/selection.js";
import type { SummaryKindName } from "../../tools/reference/summary.js";

const seed = testSeed();

interface Case {
  qHeads: number;
  kvHeads: number;
  headDim: number;
  pageSize: number;
  summary: SummaryKindName;
  combine: CombineName;
}
const shapes: Case[] = [
  { qHeads: 4, kvHeads: 4, headDim: 16, pageSize: 4, summary: "maxmin", combine: "softmax_mean" },
  { qHeads: 4, kvHeads: 2, headDim: 32, pageSize: 8, summary: "cuboid", combine: "mean" },
  { qHeads: 8, kvHeads: 2, headDim: 16, pageSize: 4, summary: "maxmin", combine: "max" },
  { qHeads: 8, kvHeads: 2, headDim: 64, pageSize: 16, summary: "maxmin", combine: "softmax_mean" },
];
const modes: ModeName[] = ["freekv", "oracle", "speculative", "sink_window", "dense", "resident_sparse"];

/** A query that drifts (each step a small random turn) and jumps to a new direction every 7th step. */
function* queries(rng: Prng, n: number, drift: number): Generator<Float32Array> {
  let q = rng.normals(n);
  for (let step = 0; ; step++) {
    const jump = step % 7 === 6;
    const next = new Float32Array(n);
    for (let i = 0; i < n; i++) next[i] = jump ? rng.normal() : q[i] + drift * rng.normal();
    q = next;
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = Math.round(q[i] * 4) / 4;
    yield out;
  }
}

/** One case: prefill, decode, a second turn; every step against the reference, then the counters. */
async function runCase(si: number, shape: Case, mode: ModeName, factor: number | "unset"): Promise<void> {
  // "unset": FREEKV_RESIDENT_FACTOR absent, so the engine's own default; the reference's default
  // (DEFAULT_RESIDENT_FACTOR) must be the same pool for the counters to agree.
  const residentFactor = factor === "unset" ? DEFAULT_RESIDENT_FACTOR : factor;
  const rng = new Prng(seed + si * 101 + modes.indexOf(mode) + 1009 * (residentFactor - 1));
  const P = shape.pageSize;
  const c: PolicyConfig = {
    ...shape,
    sinkTokens: P,
    windowTokens: 2 * P,
    selectTokens: 4 * P,
    tau: 0.9,
    mode,
    dtype: "f32",
    residentFactor: factor === "unset" ? undefined : factor,
  };
  const ref = new ReferenceLayer(c);
  // The same steps with one selection's worth of slots: what the extra slots save.
  const one = residentFactor > 1 ? new ReferenceLayer({ ...c, residentFactor: 1 }) : undefined;
  // Read when the session is made.
  const open = () => openSession(c, { capacityPages: 128 });
  const es = withEnv("FREEKV_RESIDENT_FACTOR", factor === "unset" ? null : String(factor), open);
  try {
    const { engine, session } = es;
    const qn = c.qHeads * c.headDim,
      kvn = c.kvHeads * c.headDim;
    // Prefill with attention: exact causal attention over the chunk, in two chunks.
    const n0 = 13 * P + 3;
    for (const n of [Math.floor(n0 / 2), n0 - Math.floor(n0 / 2)]) {
      const q = quantised(rng, n * qn),
        k = quantised(rng, n * kvn),
        v = quantised(rng, n * kvn);
      const out = await engine.prefillAttend(session, 0, q, k, v, n);
      ref.prefill(k, v, n, q.subarray((n - 1) * qn));
      one?.prefill(k, v, n, q.subarray((n - 1) * qn));
      expect(relError(out, ref.prefillAttention(q, n))).toBeLessThan(1e-5);
    }
    const qs = queries(rng, qn, 0.3);
    const decodeSteps = async (steps: number, turn: number) => {
      for (let t = 0; t < steps; t++) {
        const q = qs.next().value as Float32Array;
        const k = quantised(rng, kvn),
          v = quantised(rng, kvn);
        const [out] = await engine.decode(0, [{ session, q, k, v }]);
        const want = ref.decode(q, k, v);
        one?.decode(q, k, v);
        for (let h = 0; h < c.kvHeads; h++)
          expect(Array.from(engine.lastAttendedTokens(session, 0, h)), `turn ${turn} step ${t} head ${h}`).toEqual(want.attended[h]);
        expect(relError(out, want.out), `turn ${turn} step ${t}`).toBeLessThan(1e-5);
      }
    };
    await decodeSteps(3 * P + 5, 1);
    // A second turn: a prefill chunk without queries in the middle of decoding (the next
    // decode selects with its own query), then more steps.
    const n1 = 2 * P + 1;
    const k1 = quantised(rng, n1 * kvn),
      v1 = quantised(rng, n1 * kvn);
    await engine.prefill(session, 0, k1, v1, n1);
    ref.prefill(k1, v1, n1);
    one?.prefill(k1, v1, n1);
    await decodeSteps(P + 2, 2);
    await engine.sync(session);
    const st = engine.stats(session);
    expect(st.selections).toBe(ref.counters.selections);
    expect(st.corrections).toBe(ref.counters.corrections);
    expect(st.pagesSelected).toBe(ref.counters.pagesSelected);
    expect(st.pagesHit).toBe(ref.counters.pagesHit);
    expect(st.pagesRecalled).toBe(ref.counters.pagesRecalled);
    expect(st.recallBytes).toBe(ref.counters.pagesRecalled * 2 * P * c.headDim * 4);
    expect(st.contextTokens).toBe(ref.tokens);
    if (mode === "freekv") expect(st.corrections).toBeGreaterThan(0);
    if (mode === "freekv" || mode === "speculative") expect(st.pagesHit).toBeGreaterThan(0);
    if (one) {
      // Same pages attended (checked every step above), fewer recalled.
      expect(one.counters.pagesSelected).toBe(ref.counters.pagesSelected);
      expect(st.pagesRecalled).toBeLessThan(one.counters.pagesRecalled);
    }
  } finally {
    await es.close();
  }
}

describe(`engine vs float64 policy reference (seed ${seed})`, () => {
  for (const [si, shape] of shapes.entries())
    for (const mode of modes)
      it(`${mode} Hq=${shape.qHeads} Hkv=${shape.kvHeads} D=${shape.headDim} P=${shape.pageSize} ${shape.summary} ${shape.combine}`, () =>
        runCase(si, shape, mode, 1));
  // FREEKV_RESIDENT_FACTOR: a group keeps 2 or 3 selections' worth of pages; the pages chosen
  // longest ago leave first. The same pages are attended; the counters follow the reference's pool.
  for (const [si, shape] of shapes.entries())
    for (const mode of ["freekv", "oracle", "speculative"] as const)
      it(`${mode} Hq=${shape.qHeads} Hkv=${shape.kvHeads} P=${shape.pageSize}, resident factor ${2 + (si % 2)}`, () =>
        runCase(si, shape, mode, 2 + (si % 2)));
  // Unset, the engine's default pool: two selections' worth, as the reference's default says
  // (an engine still at one selection recalls more than the reference counts).
  it(`freekv Hq=${shapes[3].qHeads} Hkv=${shapes[3].kvHeads} P=${shapes[3].pageSize}, FREEKV_RESIDENT_FACTOR unset (default ${DEFAULT_RESIDENT_FACTOR})`, () =>
    runCase(3, shapes[3], "freekv", "unset"));
});
