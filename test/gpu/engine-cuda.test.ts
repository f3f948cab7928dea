/**
 * The CUDA engine against the CPU engine (and float64 references) on fresh random inputs of
 * several shapes and modes: see cases.ts. Runs where a CUDA device is usable; elsewhere the
 * suite is skipped and its title says why. On the GPU machine (no Node.js toolchain there) the
 * same cases run through scripts/gpu/run-checks.ts: see scripts/gpu/README.md.
 */
import { describe, expect, it } from "vitest";
import { CASES, cudaStatus, explainSelectionDifference, runCase } from "./cases.js";
import { ranges, ReferenceLayer, type PolicyConfig } from "../../tools/reference/policy.js";
import { topK } from "../../tools/reference/selection.js";
import { prng } from "../helpers/prng.js";
import { DType } from "../../proto/gen/freekv/v1/common.js";

const status = cudaStatus();
const title = status.available ? `CUDA engine vs CPU engine on ${status.reason}` : `CUDA engine vs CPU engine (skipped: ${status.reason})`;

if (!status.available) console.warn(`test/gpu: CUDA checks skipped: ${status.reason}`);

describe.skipIf(!status.available)(title, () => {
  for (const spec of CASES) {
    it(spec.name, async () => {
      const r = await runCase(spec, (l) => console.log(l));
      expect(r.failures, r.failures.join("\n")).toEqual([]);
      expect(r.ok).toBe(true);
    }, 300_000);
  }

  it("runs the GPU model runner's decode steps as CUDA graphs, bit-identical to op-by-op steps", async () => {
    const { loadAddon } = await import("../../native/binding.js");
    const { builtinModelDir, loadModel } = await import("../../services/compute/model/loader.js");
    const { createLocalSession, modelGeometry } = await import("../../services/compute/model/localHost.js");
    const { resolveRetrieval, toNativeRetrieval } = await import("../../services/common/retrieval.js");
    const addon = loadAddon();
    // The same model on two engines: graphs on (the default) and off (every op issued directly).
    const engines = { graphs: new addon.Engine({ backend: "cuda" }), direct: new addon.Engine({ backend: "cuda", cudaGraphs: false }) };
    const { model: graphsModel, spec } = loadModel(builtinModelDir(), { engine: engines.graphs });
    const models = { graphs: graphsModel, direct: loadModel(builtinModelDir(), { engine: engines.direct }).model };
    const c = spec.native;
    const retrieval = { ...toNativeRetrieval(resolveRetrieval(undefined, c.layers)), sinkTokens: 64, windowTokens: 64, selectTokens: 128 };
    const rnd = prng(4242);
    const prompt = Int32Array.from({ length: 300 }, () => Math.floor(rnd() * c.vocabSize));
    const run = async (graphs: boolean) => {
      const engine = graphs ? engines.graphs : engines.direct;
      const model = graphs ? models.graphs : models.direct;
      const local = createLocalSession(engine, modelGeometry(c, DType.D_TYPE_BFLOAT16), retrieval, 400);
      try {
        const out: Float32Array[] = [];
        let last = await model.prefill(local.session, prompt, 0, false);
        for (let pos = prompt.length; pos < prompt.length + 24; pos++) {
          let best = 0;
          for (let v = 1; v < c.vocabSize; v++) if (last[v] > last[best]) best = v;
          last = await model.decode(Int32Array.of(local.session), Int32Array.of(best), Int32Array.of(pos));
          out.push(last);
        }
        return out;
      } finally {
        await local.close();
      }
    };
    const s0 = engines.graphs.deviceStepStats();
    const graphed = await run(true);
    const s1 = engines.graphs.deviceStepStats();
    const d0 = engines.direct.deviceStepStats();
    const direct = await run(false);
    const d1 = engines.direct.deviceStepStats();
    expect(s1.steps - s0.steps).toBe(24);
    expect(s1.replays - s0.replays).toBeGreaterThanOrEqual(20);
    expect(d1.steps - d0.steps).toBe(24);
    expect(d1.direct - d0.direct).toBe(24);
    const bytes = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
    for (let i = 0; i < graphed.length; i++) expect(Buffer.compare(bytes(graphed[i]), bytes(direct[i])), `step ${i}`).toBe(0);
  }, 120_000);

  it("rejects float32 K/V storage with an error naming geometry.kvDtype", async () => {
    const { loadAddon } = await import("../../native/binding.js");
    const { createLocalSession } = await import("../../services/compute/model/localHost.js");
    const { RETRIEVAL_NAMES: N } = await import("../../services/common/retrieval.js");
    const engine = new (loadAddon().Engine)({ backend: "cuda" });
    const geometry = { layers: 1, qHeads: 8, kvHeads: 2, headDim: 128, kvDtype: N.kvDtype.float32 };
    const retrieval = {
      pageSize: 32, sinkTokens: 64, windowTokens: 96, selectTokens: 256, tau: 0.9,
      summary: N.summary.max_min, combine: N.combine.softmax_mean, mode: N.mode.freekv, recall: N.recall.gather, denseLayers: [],
    };
    // 7 pages of context and one more: the 8 pages the segments held before.
    expect(() => createLocalSession(engine, geometry, retrieval, 7 * 32)).toThrow(/kvDtype/);
  });
});

// The harness itself, checked without a GPU: the CPU engine against itself must pass every
// comparison (same inputs, same outputs), so a failure here is a bug of the checks.
describe("CUDA check harness (CPU engine as the candidate)", () => {
  it("passes a small case with the CPU engine as the candidate", async () => {
    const spec = { ...CASES[0], prompts: [300, 211], firstChunk: 150, steps: 6, name: "harness self-check" };
    const r = await runCase(spec, () => {}, "cpu");
    expect(r.failures, r.failures.join("\n")).toEqual([]);
  }, 60_000);
  it("passes the hierarchical selection cases with the CPU engine as the candidate", async () => {
    for (const c of CASES.filter((c) => c.hierarchical === "on")) {
      const r = await runCase({ ...c, steps: 4 }, () => {}, "cpu");
      expect(r.failures, `${c.name}: ${r.failures.join("\n")}`).toEqual([]);
    }
  }, 120_000);
});

// The near-tie judge must accept a swap of exactly tied pages at the k-th place and nothing else.
describe("near-tie judge of selection differences", () => {
  const c: PolicyConfig = {
    qHeads: 4, kvHeads: 2, headDim: 32, pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 64, tau: 0.9,
    summary: "maxmin", combine: "softmax_mean", mode: "freekv", dtype: "bf16",
  };
  const T = 16 * 30 + 5;
  const kn = c.kvHeads * c.headDim;
  const u = prng(4242);
  const normal = () => Math.sqrt(-2 * Math.log(Math.max(u(), 1e-12))) * Math.cos(2 * Math.PI * u());
  const k = Float32Array.from({ length: T * kn }, normal);
  const v = Float32Array.from({ length: T * kn }, normal);
  const q = Float32Array.from({ length: c.qHeads * c.headDim }, normal);
  const h = 1;
  const r = ranges(c, T);
  const K = c.selectTokens / c.pageSize;
  const layerOf = (keys: Float32Array) => {
    const ref = new ReferenceLayer(c);
    ref.append(keys, v, T);
    return ref;
  };
  // Page i ranks k-th; page j ranks last; a copy of page i's keys into page j ties them exactly.
  const order = topK(layerOf(k).combinedScores(h, q, r.sinkEnd, r.windowBegin), r.windowBegin - r.sinkEnd).map((x) => x + r.sinkEnd);
  const i = order[K - 1],
    j = order[order.length - 1];
  const tied = k.slice();
  tied.copyWithin(j * 16 * kn, i * 16 * kn, (i + 1) * 16 * kn);
  const ref = layerOf(tied);
  const tokensOf = (middle: number[]) => {
    const pages = [...Array.from({ length: r.sinkEnd }, (_, p) => p), ...[...middle].sort((a, b) => a - b)];
    for (let p = r.windowBegin; p < r.full; p++) pages.push(p);
    const toks = pages.flatMap((p) => Array.from({ length: 16 }, (_, x) => p * 16 + x));
    for (let t = r.full * 16; t < T; t++) toks.push(t);
    return toks;
  };
  const top = topK(ref.combinedScores(h, q, r.sinkEnd, r.windowBegin), K).map((x) => x + r.sinkEnd);
  const other = top.includes(i) ? j : i;
  const swapped = top.map((p) => (p === (top.includes(i) ? i : j) ? other : p));
  const queries = [{ name: "q", q, tokens: T }];

  it("explains a swap of two tied pages at the k-th place", () => {
    expect(new Set(swapped).size).toBe(K);
    expect(explainSelectionDifference(ref, h, tokensOf(swapped), tokensOf(top), queries)).toMatch(/near-tie under q/);
  });
  it("rejects the same swap where the pages do not tie, and any other difference", () => {
    // Without the copy, page j (last) is far below the k-th page.
    const plain = layerOf(k);
    const topPlain = topK(plain.combinedScores(h, q, r.sinkEnd, r.windowBegin), K).map((x) => x + r.sinkEnd);
    const lastIn = topPlain.map((p) => (p === i ? j : p));
    expect(explainSelectionDifference(plain, h, tokensOf(lastIn), tokensOf(topPlain), queries)).toBeNull();
    // The best page swapped for the tied one.
    const best = top.map((p) => (p === top[0] ? (top.includes(j) ? i : j) : p));
    expect(explainSelectionDifference(ref, h, tokensOf(best), tokensOf(top), queries)).toBeNull();
    // A window token missing.
    expect(explainSelectionDifference(ref, h, tokensOf(swapped).slice(0, -1), tokensOf(top), queries)).toBeNull();
    // Another query than the one the scores tie under.
    const q2 = Float32Array.from(q, (x) => -x);
    expect(explainSelectionDifference(ref, h, tokensOf(swapped), tokensOf(top), [{ name: "-q", q: q2, tokens: T }])).toBeNull();
    // A dense layer has no selection to tie.
    const dense = new ReferenceLayer({ ...c, mode: "dense" });
    dense.append(tied, v, T);
    expect(explainSelectionDifference(dense, h, tokensOf(swapped), tokensOf(top), queries)).toBeNull();
  });
});

describe("device step statistics without a device step", () => {
  it("are all zero on the CPU engine, before and after decodes", async () => {
    const { loadAddon } = await import("../../native/binding.js");
    const { builtinModelDir, loadModel } = await import("../../services/compute/model/loader.js");
    const { createLocalSession, modelGeometry } = await import("../../services/compute/model/localHost.js");
    const { resolveRetrieval, toNativeRetrieval } = await import("../../services/common/retrieval.js");
    const engine = new (loadAddon().Engine)({ backend: "cpu", threads: 1 });
    const zero = { steps: 0, direct: 0, captures: 0, updates: 0, replays: 0, ops: 0, captureMs: 0, hostMs: 0, deviceMs: 0, sideIssueMs: 0, waitMs: 0, finishMs: 0, resultMs: 0, sideMs: 0, sideSteps: 0 };
    expect(engine.deviceStepStats()).toEqual(zero);
    const { model, spec } = loadModel(builtinModelDir(), { engine });
    const local = createLocalSession(engine, modelGeometry(spec.native, DType.D_TYPE_BFLOAT16), toNativeRetrieval(resolveRetrieval(undefined, spec.native.layers)), 64);
    try {
      await model.prefill(local.session, Int32Array.of(1, 2, 3), 0, false);
      await model.decode(Int32Array.of(local.session), Int32Array.of(4), Int32Array.of(3));
      expect(engine.stats(local.session).decodeSteps).toBe(1);
      expect(engine.deviceStepStats()).toEqual(zero);
    } finally {
      await local.close();
    }
  });
});
