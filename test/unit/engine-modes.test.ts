/**
 * Mode invariants of the CPU engine on fresh random inputs:
 * - a budget that covers the whole context gives the dense output (fp32, rel. error <= 1e-6),
 *   also for a dense layer of a retrieval session;
 * - with a constant query, speculative retrieval attends what the oracle attends;
 * - the first decode after a prefill (each turn's) selects with its own query in freekv, as the
 *   oracle does, and with the prompt's last query in speculative;
 * - tau = -1 never corrects (freekv = speculative after the first decode); tau > 1 always
 *   corrects (freekv = oracle);
 * - gather and double-buffered recall give the same outputs and counters;
 * - bf16 storage stays within bf16 tolerance of float32.
 */
import { describe, expect, it } from "vitest";
import { attend, relError } from "../../tools/reference/attention.js";
import { roundStored } from "../../tools/reference/kv.js";
import type { ModeName, PolicyConfig } from "../../tools/reference/policy.js";
import { Prng, testSeed } from "./reference/prng.js";
import { openSession, type EngineSession } from "./reference/harness.js";
import { loadAddon } from "../../native/binding.js";

const seed = testSeed();
const shapes = [
  { qHeads: 4, kvHeads: 4, headDim: 32, pageSize: 8 }, // GQA 1
  { qHeads: 8, kvHeads: 4, headDim: 16, pageSize: 4 }, // GQA 2
  { qHeads: 8, kvHeads: 2, headDim: 64, pageSize: 16 }, // GQA 4
];

function config(shape: (typeof shapes)[number], mode: ModeName, over: Partial<PolicyConfig> = {}): PolicyConfig {
  const P = shape.pageSize;
  return { ...shape, sinkTokens: P, windowTokens: 2 * P, selectTokens: 4 * P, tau: 0.9, summary: "maxmin", combine: "softmax_mean", mode, dtype: "f32", ...over };
}

interface Step {
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
}

function makeSteps(rng: Prng, c: PolicyConfig, n: number, query: "drift" | "constant"): Step[] {
  const qn = c.qHeads * c.headDim,
    kvn = c.kvHeads * c.headDim;
  let q = rng.normals(qn);
  const steps: Step[] = [];
  for (let t = 0; t < n; t++) {
    if (query === "drift") {
      const next = new Float32Array(qn);
      const jump = t % 5 === 4;
      for (let i = 0; i < qn; i++) next[i] = jump ? rng.normal() : q[i] + 0.3 * rng.normal();
      q = next;
    }
    steps.push({ q, k: rng.normals(kvn), v: rng.normals(kvn) });
  }
  return steps;
}

interface Run {
  outs: Float32Array[];
  attended: number[][][];
  stats: ReturnType<EngineSession["engine"]["stats"]>;
}

/** Prefills `prefill` (k, v, last-query) and decodes the steps; returns outputs, attended sets, stats. */
async function run(c: PolicyConfig, prefill: Step[], steps: Step[], opts: Parameters<typeof openSession>[1] = {}, layer = 0): Promise<Run> {
  const es = openSession(c, { capacityPages: 64, ...opts });
  const layers = opts.layers ?? 1;
  try {
    const { engine, session } = es;
    const n = prefill.length;
    const cat = (f: (s: Step) => Float32Array) => {
      const a = new Float32Array(n * f(prefill[0]).length);
      prefill.forEach((s, i) => a.set(f(s), i * f(s).length));
      return a;
    };
    for (let l = 0; l < layers; l++) await engine.prefillAttend(session, l, cat((s) => s.q), cat((s) => s.k), cat((s) => s.v), n);
    const outs: Float32Array[] = [];
    const attended: number[][][] = [];
    for (const s of steps) {
      for (let l = 0; l < layers; l++) {
        const [o] = await engine.decode(l, [{ session, q: s.q, k: s.k, v: s.v }]);
        if (l === layer) outs.push(o);
      }
      attended.push(Array.from({ length: c.kvHeads }, (_, h) => Array.from(engine.lastAttendedTokens(session, layer, h))));
    }
    await engine.sync(session);
    return { outs, attended, stats: engine.stats(session) };
  } finally {
    await es.close();
  }
}

/** Exact float64 attention of step t's query over every token so far. */
function exact(c: PolicyConfig, all: Step[], t: number, dtype: "f32" | "bf16" = "f32"): Float64Array {
  const { qHeads, kvHeads, headDim: D } = c;
  const g = qHeads / kvHeads;
  const out = new Float64Array(qHeads * D);
  for (let j = 0; j < qHeads; j++) {
    const h = Math.floor(j / g);
    const ks = all.slice(0, t + 1).map((s) => roundStored(s.k.subarray(h * D, (h + 1) * D), dtype));
    const vs = all.slice(0, t + 1).map((s) => roundStored(s.v.subarray(h * D, (h + 1) * D), dtype));
    out.set(attend(all[t].q.subarray(j * D, (j + 1) * D), ks, vs), j * D);
  }
  return out;
}

describe(`engine mode invariants (seed ${seed})`, () => {
  for (const [si, shape] of shapes.entries()) {
    const tag = `Hq=${shape.qHeads} Hkv=${shape.kvHeads} D=${shape.headDim} P=${shape.pageSize}`;

    it(`budget >= context gives the dense output: ${tag}`, async () => {
      const rng = new Prng(seed + si);
      const P = shape.pageSize;
      const prefill = makeSteps(rng, config(shape, "dense"), 6 * P + 3, "drift");
      const steps = makeSteps(rng, config(shape, "dense"), 2 * P + 3, "drift");
      const dense = await run(config(shape, "dense"), prefill, steps);
      const all = [...prefill, ...steps];
      dense.outs.forEach((o, t) => expect(relError(o, exact(config(shape, "dense"), all, prefill.length + t))).toBeLessThan(1e-5));
      for (const mode of ["freekv", "oracle", "speculative"] as ModeName[]) {
        const r = await run(config(shape, mode, { selectTokens: 16 * P }), prefill, steps);
        r.outs.forEach((o, t) => expect(relError(o, dense.outs[t]), `${mode} step ${t}`).toBeLessThanOrEqual(1e-6));
        expect(r.stats.pagesRecalled).toBeGreaterThan(0);
      }
      // A dense layer of a freekv session with a small budget: layer 0 dense, layer 1 retrieval.
      const c = config(shape, "freekv");
      const mixed = await run(c, prefill, steps, { layers: 2, retrieval: { denseLayers: [0] } }, 0);
      mixed.outs.forEach((o, t) => expect(relError(o, dense.outs[t])).toBeLessThanOrEqual(1e-6));
      const retrieval = await run(c, prefill, steps, { layers: 2, retrieval: { denseLayers: [0] } }, 1);
      expect(retrieval.attended.at(-1)![0].length).toBeLessThan(prefill.length + steps.length);
    });

    it(`resident_sparse attends and outputs what oracle does, reading every page in place: ${tag}`, async () => {
      const rng = new Prng(seed + 50 + si);
      const P = shape.pageSize;
      const prefill = makeSteps(rng, config(shape, "oracle"), 12 * P + 1, "drift");
      const steps = makeSteps(rng, config(shape, "oracle"), 3 * P + 2, "drift");
      for (const dtype of ["f32", "bf16"] as const) {
        const oracle = await run(config(shape, "oracle", { dtype }), prefill, steps, { layers: 2 }, 1);
        const resident = await run(config(shape, "resident_sparse", { dtype }), prefill, steps, { layers: 2 }, 1);
        expect(resident.attended).toEqual(oracle.attended);
        resident.outs.forEach((o, t) => expect(Array.from(o), `${dtype} step ${t}`).toEqual(Array.from(oracle.outs[t])));
        // It attends a selection, not the whole context.
        expect(resident.attended.at(-1)![0].length).toBeLessThan(prefill.length + steps.length);
        // The same selections, every selected page a hit: nothing recalled.
        expect(resident.stats.selections).toBe(oracle.stats.selections);
        expect(resident.stats.pagesSelected).toBe(oracle.stats.pagesSelected);
        expect(resident.stats.pagesHit).toBe(resident.stats.pagesSelected);
        expect(resident.stats.pagesRecalled).toBe(0);
        expect(resident.stats.recallBytes).toBe(0);
        expect(oracle.stats.pagesRecalled).toBeGreaterThan(0);
        // Every page of both layers stays in the device tier, as in dense mode.
        const tokens = prefill.length + steps.length;
        expect(resident.stats.residentPages).toBe(2 * shape.kvHeads * Math.ceil(tokens / P));
        expect(oracle.stats.residentPages).toBeLessThan(resident.stats.residentPages);
      }
    });

    it(`constant query: speculative attends and outputs what oracle does: ${tag}`, async () => {
      const rng = new Prng(seed + 10 + si);
      const P = shape.pageSize;
      const prefill = makeSteps(rng, config(shape, "oracle"), 12 * P, "constant");
      const q = rng.normals(shape.qHeads * shape.headDim);
      const steps = makeSteps(rng, config(shape, "oracle"), 3 * P, "constant").map((s) => ({ ...s, q }));
      prefill[prefill.length - 1].q = q;
      const oracle = await run(config(shape, "oracle"), prefill, steps);
      const spec = await run(config(shape, "speculative"), prefill, steps);
      expect(spec.attended).toEqual(oracle.attended);
      spec.outs.forEach((o, t) => expect(Array.from(o)).toEqual(Array.from(oracle.outs[t])));
      // Speculation recalls ahead: at most the pages entering the middle are new per step.
      expect(spec.stats.pagesHit).toBeGreaterThan(0);
    });

    it(`tau = -1 never corrects, tau > 1 always does: ${tag}`, async () => {
      const rng = new Prng(seed + 20 + si);
      const P = shape.pageSize;
      const prefill = makeSteps(rng, config(shape, "freekv"), 12 * P, "drift");
      const steps = makeSteps(rng, config(shape, "freekv"), 3 * P, "drift");
      const never = await run(config(shape, "freekv", { tau: -1 }), prefill, steps);
      expect(never.stats.corrections).toBe(0);
      const spec = await run(config(shape, "speculative"), prefill, steps);
      const oracle = await run(config(shape, "oracle"), prefill, steps);
      // The first decode after a prefill selects with its own query in freekv (as the oracle
      // does), with the prompt's last query in speculative; from the second on, never correcting
      // is speculating.
      expect(never.attended[0]).toEqual(oracle.attended[0]);
      expect(never.attended.slice(1)).toEqual(spec.attended.slice(1));
      const always = await run(config(shape, "freekv", { tau: 1.5 }), prefill, steps);
      // Every (step, KV head) but the first step's blocking selection is a correction.
      expect(always.stats.selections).toBe(steps.length * shape.kvHeads);
      expect(always.stats.corrections).toBe((steps.length - 1) * shape.kvHeads);
      expect(always.attended).toEqual(oracle.attended);
      always.outs.forEach((o, t) => expect(relError(o, oracle.outs[t])).toBeLessThanOrEqual(1e-6));
      const mid = await run(config(shape, "freekv", { tau: 0.9 }), prefill, steps);
      expect(mid.stats.corrections).toBeGreaterThan(0);
      expect(mid.stats.corrections).toBeLessThan(always.stats.corrections);
    });

    it(`the first decode after a prefill: freekv selects with its own query, speculative with the prompt's last: ${tag}`, async () => {
      const rng = new Prng(seed + 60 + si);
      const P = shape.pageSize;
      const prefill = makeSteps(rng, config(shape, "freekv"), 12 * P, "drift");
      const steps = makeSteps(rng, config(shape, "freekv"), 4, "drift");
      // The answer's first query points elsewhere than the prompt's last (a new direction).
      steps[0] = { ...steps[0], q: rng.normals(shape.qHeads * shape.headDim) };
      const oracle = await run(config(shape, "oracle"), prefill, steps);
      const spec = await run(config(shape, "speculative"), prefill, steps);
      // What the prompt's last query selects: the oracle's first decode with that query.
      const lastQuery = await run(config(shape, "oracle"), prefill, [{ ...steps[0], q: prefill[prefill.length - 1].q }]);
      expect(spec.attended[0]).toEqual(lastQuery.attended[0]);
      expect(spec.attended[0]).not.toEqual(oracle.attended[0]);
      for (const tau of [-1, 0.9, 1.5]) {
        const freekv = await run(config(shape, "freekv", { tau }), prefill, steps);
        expect(freekv.attended[0], `tau ${tau}`).toEqual(oracle.attended[0]);
        expect(relError(freekv.outs[0], oracle.outs[0])).toBeLessThanOrEqual(1e-6);
      }
      // A second prompt (another prefill of the same session) is a first decode again.
      const es = openSession(config(shape, "freekv", { tau: -1 }), { capacityPages: 64 });
      const es2 = openSession(config(shape, "oracle"), { capacityPages: 64 });
      try {
        const cat = (xs: Step[], f: (s: Step) => Float32Array) => {
          const a = new Float32Array(xs.length * f(xs[0]).length);
          xs.forEach((s, i) => a.set(f(s), i * f(s).length));
          return a;
        };
        const turn2 = makeSteps(rng, config(shape, "freekv"), 2 * P + 1, "drift");
        const jump = { ...steps[1], q: rng.normals(shape.qHeads * shape.headDim) };
        const attendedAfter = async (x: typeof es) => {
          await x.engine.prefillAttend(x.session, 0, cat(prefill, (s) => s.q), cat(prefill, (s) => s.k), cat(prefill, (s) => s.v), prefill.length);
          await x.engine.decode(0, [{ session: x.session, q: steps[0].q, k: steps[0].k, v: steps[0].v }]);
          await x.engine.prefillAttend(x.session, 0, cat(turn2, (s) => s.q), cat(turn2, (s) => s.k), cat(turn2, (s) => s.v), turn2.length);
          await x.engine.decode(0, [{ session: x.session, q: jump.q, k: jump.k, v: jump.v }]);
          return Array.from({ length: shape.kvHeads }, (_, h) => Array.from(x.engine.lastAttendedTokens(x.session, 0, h)));
        };
        expect(await attendedAfter(es)).toEqual(await attendedAfter(es2));
      } finally {
        await es.close();
        await es2.close();
      }
    });

    it(`FREEKV_SPEC_REUSE=1: the speculative selection takes the correction's, with the same pages, outputs and counters: ${tag}`, async () => {
      const rng = new Prng(seed + 60 + si);
      const P = shape.pageSize;
      // Long enough for the window to move past several pages (the steps where the two ranges differ).
      const prefill = makeSteps(rng, config(shape, "freekv"), 14 * P + 3, "drift");
      const steps = makeSteps(rng, config(shape, "freekv"), 3 * P + 2, "drift");
      const saved = process.env.FREEKV_SPEC_REUSE;
      try {
        for (const hierarchicalSelection of ["off", "on"] as const) {
          const runWith = async (reuse: string) => {
            process.env.FREEKV_SPEC_REUSE = reuse;
            const engine = new (loadAddon().Engine)({ backend: "cpu", threads: 2, hierarchicalSelection });
            return run(config(shape, "freekv"), prefill, steps, { layers: 2, engine }, 1);
          };
          const off = await runWith("0");
          const on = await runWith("1");
          // Some groups corrected and some not, so both ways of the speculative job ran.
          expect(off.stats.corrections).toBeGreaterThan(0);
          expect(off.stats.corrections).toBeLessThan(off.stats.selections);
          expect(on.attended, hierarchicalSelection).toEqual(off.attended);
          on.outs.forEach((o, t) => expect(Array.from(o), `${hierarchicalSelection} step ${t}`).toEqual(Array.from(off.outs[t])));
          const det = (s: typeof on.stats) => ({ ...s, recallWaits: 0, guardWaits: 0 });
          expect(det(on.stats)).toEqual(det(off.stats));
        }
        // Any other value is refused when the engine is made, not read as off.
        process.env.FREEKV_SPEC_REUSE = "yes";
        expect(() => new (loadAddon().Engine)({ backend: "cpu", threads: 1 })).toThrow(/FREEKV_SPEC_REUSE must be 0 or 1, got 'yes'/);
        // So is FREEKV_MEAN_FOLD's (read by the CUDA engine; checked for every backend).
        delete process.env.FREEKV_SPEC_REUSE;
        process.env.FREEKV_MEAN_FOLD = "on";
        expect(() => new (loadAddon().Engine)({ backend: "cpu", threads: 1 })).toThrow(/FREEKV_MEAN_FOLD must be 0 or 1, got 'on'/);
        // And FREEKV_RESIDENT_FACTOR's (an integer 1..8).
        delete process.env.FREEKV_MEAN_FOLD;
        for (const bad of ["0", "9", "2.5", "x"]) {
          process.env.FREEKV_RESIDENT_FACTOR = bad;
          expect(() => new (loadAddon().Engine)({ backend: "cpu", threads: 1 })).toThrow(new RegExp(`FREEKV_RESIDENT_FACTOR must be an integer from 1 to 8, got '${bad.replace(".", "\\.")}'`));
        }
      } finally {
        if (saved === undefined) delete process.env.FREEKV_SPEC_REUSE;
        else process.env.FREEKV_SPEC_REUSE = saved;
        delete process.env.FREEKV_MEAN_FOLD;
        delete process.env.FREEKV_RESIDENT_FACTOR;
      }
    });

    it(`gather and double-buffered recall agree: ${tag}`, async () => {
      const rng = new Prng(seed + 30 + si);
      const P = shape.pageSize;
      const prefill = makeSteps(rng, config(shape, "freekv"), 14 * P, "drift");
      const steps = makeSteps(rng, config(shape, "freekv"), 2 * P, "drift");
      const gather = await run(config(shape, "freekv"), prefill, steps, { retrieval: { recall: 1 } });
      const dbuf = await run(config(shape, "freekv"), prefill, steps, { retrieval: { recall: 2 } });
      expect(dbuf.attended).toEqual(gather.attended);
      dbuf.outs.forEach((o, t) => expect(Array.from(o)).toEqual(Array.from(gather.outs[t])));
      // The wait counters depend on timing; every other counter is determined by the inputs.
      const det = (s: typeof dbuf.stats) => ({ ...s, recallWaits: 0, guardWaits: 0 });
      expect(det(dbuf.stats)).toEqual(det(gather.stats));
      expect(dbuf.stats.recallBytes).toBe(dbuf.stats.pagesRecalled * 2 * P * shape.headDim * 4);
    });

    it(`bf16 storage stays within bf16 tolerance: ${tag}`, async () => {
      const rng = new Prng(seed + 40 + si);
      const P = shape.pageSize;
      const c = config(shape, "freekv", { dtype: "bf16" });
      const prefill = makeSteps(rng, c, 10 * P + 1, "drift");
      const steps = makeSteps(rng, c, 2 * P, "drift");
      const all = [...prefill, ...steps];
      const dense = await run(config(shape, "dense", { dtype: "bf16" }), prefill, steps);
      dense.outs.forEach((o, t) => {
        const n = prefill.length + t;
        expect(relError(o, exact(c, all, n, "bf16"))).toBeLessThan(1e-5); // same bf16 values
        expect(relError(o, exact(c, all, n, "f32"))).toBeLessThan(2e-2); // bf16 rounding
      });
      const r = await run(c, prefill, steps);
      expect(r.stats.recallBytes).toBe(r.stats.pagesRecalled * 2 * P * shape.headDim * 2);
      r.outs.forEach((o, t) => {
        // attention over exactly the attended tokens, with bf16-rounded keys and values
        const { qHeads, kvHeads, headDim: D } = c;
        const want = new Float64Array(qHeads * D);
        for (let j = 0; j < qHeads; j++) {
          const h = Math.floor(j / (qHeads / kvHeads));
          const toks = r.attended[t][h];
          want.set(
            attend(
              steps[t].q.subarray(j * D, (j + 1) * D),
              toks.map((x) => roundStored(all[x].k.subarray(h * D, (h + 1) * D), "bf16")),
              toks.map((x) => roundStored(all[x].v.subarray(h * D, (h + 1) * D), "bf16")),
            ),
            j * D,
          );
        }
        expect(relError(o, want)).toBeLessThan(1e-5);
      });
    });
  }
});
