/**
 * Correctness checks of the CUDA engine, through the public binding (native/binding.ts):
 * the same fresh random inputs (seeded, never zeros) go through the CPU engine and the CUDA
 * engine, and every case compares
 *   - prefill attention outputs (CUDA vs CPU, and the last rows vs a float64 reference),
 *   - every decode output of every layer and session (CUDA vs CPU),
 *   - the attended token sets per KV head (identical, or different only where the float64
 *     page scores tie within float32 rounding: see explainSelectionDifference), and each CUDA
 *     output vs a float64 reference computed over the tokens CUDA reports it attended,
 *   - the counters (selected, hits, recalled, corrections, offloaded) and the context,
 *   - the host store written by the offload (HND pages, byte for byte) and the tail rows.
 * The CUDA engine poisons its outputs with NaN before every kernel run, so an unwritten element
 * fails the finiteness check. Storage is bf16 on both sides (rounded to nearest even).
 *
 * Used by test/gpu/engine-cuda.test.ts (vitest) and by scripts/gpu/run-checks.ts (the runner
 * carried to the GPU machine, which has no node_modules).
 */
import {
  loadAddon,
  type Engine,
  type EngineStats,
  type Geometry,
  type Retrieval,
} from "../../native/binding.js";
import { withEnv } from "../helpers/env.js";
import { prng } from "../helpers/prng.js";
import { ranges, ReferenceLayer, type ModeName, type PolicyConfig } from "../../tools/reference/policy.js";
import { sameTopK, type CombineName } from "../../tools/reference/selection.js";
import { createHost, SUMMARY, type Host } from "../unit/reference/harness.js";
import { RETRIEVAL_NAMES } from "../../services/common/retrieval.js";
import { relError } from "../../tools/reference/attention.js";
import type { SummaryKindName } from "../../tools/reference/summary.js";

// ---------------------------------------------------------------------------------------------
// Inputs

class Rng {
  private u: () => number;
  constructor(seed: number) {
    this.u = prng(seed);
  }
  normal(): number {
    const a = Math.max(this.u(), 1e-12);
    return Math.sqrt(-2 * Math.log(a)) * Math.cos(2 * Math.PI * this.u());
  }
  normals(n: number, scale = 1, mean = 0): Float32Array {
    const o = new Float32Array(n);
    for (let i = 0; i < n; i++) o[i] = mean + scale * this.normal();
    return o;
  }
}

/** Round to bf16 (nearest even), as both engines store K/V. */
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
export function bf16(x: number): number {
  f32[0] = x;
  const u = u32[0];
  u32[0] = ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) << 16;
  return f32[0];
}

// ---------------------------------------------------------------------------------------------
// Float64 reference

/** Exact softmax attention (scale 1/sqrt(D)) of one query head over the given token rows. */
function attendRef(q: Float32Array, qOff: number, K: Float64Array[], V: Float64Array[], tokens: number[], h: number, D: number, Hkv: number): Float64Array {
  const scale = 1 / Math.sqrt(D);
  const s = new Float64Array(tokens.length);
  let m = -Infinity;
  for (let j = 0; j < tokens.length; j++) {
    const kr = K[tokens[j]];
    let acc = 0;
    for (let d = 0; d < D; d++) acc += q[qOff + d] * kr[h * D + d];
    s[j] = acc * scale;
    if (s[j] > m) m = s[j];
  }
  let z = 0;
  for (let j = 0; j < tokens.length; j++) z += (s[j] = Math.exp(s[j] - m));
  const o = new Float64Array(D);
  for (let j = 0; j < tokens.length; j++) {
    const vr = V[tokens[j]];
    const w = s[j] / z;
    for (let d = 0; d < D; d++) o[d] += w * vr[h * D + d];
  }
  return o;
}


function allFinite(a: Float32Array): boolean {
  for (let i = 0; i < a.length; i++) if (!Number.isFinite(a[i])) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Cases

export interface CaseSpec {
  name: string;
  geometry: Omit<Geometry, "kvDtype">;
  retrieval: Partial<Retrieval>;
  /** Prompt length of each session of the batch. */
  prompts: number[];
  /** Prompt chunks: the first chunk length (the rest is a second chunk), to cross a partial page. */
  firstChunk: number;
  /** PrefillAttend (queries given) or Prefill (keys/values only). */
  attendPrompt: boolean;
  steps: number;
  capacityPages: number;
  seed: number;
  /** Before this step, every candidate session is closed and re-attached in a fresh engine. */
  reattachAt?: number;
  /** After the run, a fresh CPU engine re-attaches over a copy of the candidate's segments and
   *  one more step is compared (the manifest, store and tail are backend-neutral). */
  crossReattach?: boolean;
  /** Per-session retrieval changes on top of `retrieval` (a batch that mixes configurations). */
  perSession?: Partial<Retrieval>[];
  /** The engines' hierarchicalSelection option (both backends; default: the engine's default). */
  hierarchical?: "auto" | "on" | "off";
  /** The CPU engine's hierarchicalSelection when it differs from the candidate's (on vs off). */
  cpuHierarchical?: "auto" | "on" | "off";
  /**
   * Prompt keys: "iid" (default: independent normals), "walk" (a slow random walk per channel
   * plus noise, as real keys drift: the group bounds then prune) or "tied" (every 5th page
   * repeats: whole groups tie, so the lower page must win every tie).
   */
  keys?: "iid" | "walk" | "tied";
  /** FREEKV_RESIDENT_FACTOR while both engines make (and re-attach) the sessions. */
  residentFactor?: number;
}

/** fn() with FREEKV_RESIDENT_FACTOR set as the case asks (the engines read it when a session is made). */
const withResidentFactor = <T>(spec: CaseSpec, fn: () => T): T =>
  withEnv("FREEKV_RESIDENT_FACTOR", spec.residentFactor ? String(spec.residentFactor) : undefined, fn);

const BASE: Retrieval = {
  pageSize: 32,
  sinkTokens: 64,
  windowTokens: 96,
  selectTokens: 256,
  tau: 0.9,
  summary: 1 /* MaxMin */,
  combine: 1 /* SoftmaxMean */,
  mode: 1 /* FreeKV */,
  recall: 1 /* Gather */,
  denseLayers: [],
};

export const CASES: CaseSpec[] = [
  {
    name: "freekv gather, GQA 4, D128, batch 2, 2 layers",
    geometry: { layers: 2, qHeads: 8, kvHeads: 2, headDim: 128 },
    retrieval: {},
    prompts: [1200, 903],
    firstChunk: 700,
    attendPrompt: true,
    steps: 40,
    capacityPages: 64,
    seed: 101,
  },
  {
    name: "freekv double-buffer, GQA 1, D64, P16, cuboid-mean, mean combine, prefill without queries",
    geometry: { layers: 1, qHeads: 4, kvHeads: 4, headDim: 64 },
    retrieval: { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 128, summary: 2, combine: 2, recall: 2 },
    prompts: [600],
    firstChunk: 333,
    attendPrompt: false,
    steps: 30,
    capacityPages: 64,
    seed: 202,
  },
  {
    name: "speculative, Llama shape (32/8 heads, D128), max combine, batch 3",
    geometry: { layers: 1, qHeads: 32, kvHeads: 8, headDim: 128 },
    retrieval: { sinkTokens: 128, windowTokens: 128, selectTokens: 512, combine: 3, mode: 4 },
    prompts: [2000, 1300, 900],
    firstChunk: 700,
    attendPrompt: true,
    steps: 33,
    capacityPages: 128,
    seed: 303,
  },
  {
    name: "oracle, GQA 8, D256",
    geometry: { layers: 1, qHeads: 8, kvHeads: 1, headDim: 256 },
    retrieval: { sinkTokens: 32, windowTokens: 64, selectTokens: 128, mode: 3 },
    prompts: [800],
    firstChunk: 517,
    attendPrompt: true,
    steps: 20,
    capacityPages: 40,
    seed: 404,
  },
  {
    name: "freekv with dense layer 0, GQA 4, double-buffer, tau 0.95",
    geometry: { layers: 2, qHeads: 16, kvHeads: 4, headDim: 128 },
    retrieval: { denseLayers: [0], recall: 2, tau: 0.95 },
    prompts: [1500],
    firstChunk: 1100,
    attendPrompt: true,
    steps: 25,
    capacityPages: 64,
    seed: 505,
  },
  {
    name: "dense mode, long context (split-K attention), GQA 2",
    geometry: { layers: 1, qHeads: 4, kvHeads: 2, headDim: 128 },
    retrieval: { mode: 2 },
    prompts: [6000],
    firstChunk: 3500,
    attendPrompt: true,
    steps: 12,
    capacityPages: 200,
    seed: 606,
  },
  {
    name: "re-attach: fresh CUDA engine mid-run, then a CPU engine over its segments",
    geometry: { layers: 2, qHeads: 8, kvHeads: 2, headDim: 128 },
    retrieval: { tau: 0.9 },
    prompts: [1000, 777],
    firstChunk: 500,
    attendPrompt: true,
    steps: 24,
    capacityPages: 48,
    seed: 808,
    reattachAt: 13,
    crossReattach: true,
  },
  {
    name: "sink + window only, GQA 2, D64",
    geometry: { layers: 1, qHeads: 8, kvHeads: 4, headDim: 64 },
    retrieval: { mode: 5 },
    prompts: [700, 450],
    firstChunk: 300,
    attendPrompt: true,
    steps: 20,
    capacityPages: 32,
    seed: 707,
  },
  {
    // One batch mixing every mode, recall method, summary, combine, budget and a dense layer.
    name: "mixed batch: freekv, oracle, speculative, freekv double-buffer, sink-window, dense, other budgets",
    geometry: { layers: 3, qHeads: 32, kvHeads: 8, headDim: 128 },
    retrieval: { denseLayers: [] },
    perSession: [
      {},
      { mode: 3 },
      { mode: 4, combine: 3 },
      { recall: 2, tau: 0.95 },
      { mode: 5 },
      { mode: 2 },
      { sinkTokens: 32, windowTokens: 64, selectTokens: 512, summary: 2, combine: 2, denseLayers: [1] },
      { tau: 0.8, selectTokens: 128 },
    ],
    prompts: [1200, 903, 1500, 700, 640, 1000, 1333, 95],
    firstChunk: 60,
    attendPrompt: true,
    steps: 40,
    capacityPages: 96,
    seed: 909,
    // One selection's worth of slots (the paper's pool, FREEKV_RESIDENT_FACTOR 1): the residency
    // kernel's path without extra slots, every mode; the other cases run at the default (4).
    residentFactor: 1,
  },
  {
    name: "mixed batch with re-attach and cross re-attach",
    geometry: { layers: 2, qHeads: 8, kvHeads: 2, headDim: 128 },
    retrieval: {},
    perSession: [{}, { mode: 3 }, { mode: 4 }, { recall: 2 }],
    prompts: [1000, 777, 513, 640],
    firstChunk: 500,
    attendPrompt: true,
    steps: 24,
    capacityPages: 48,
    seed: 808,
    reattachAt: 13,
    crossReattach: true,
  },
  // Hierarchical selection (groups of 32 pages): with the mean and max combines its pages are
  // exactly the flat top-k, so both engines with it on must attend the same pages as each other
  // and as the float64 reference; prompts of several groups, candidate ranges cutting groups.
  {
    name: "hierarchical selection on, mean combine, GQA 4, P8, 12+ groups",
    geometry: { layers: 1, qHeads: 8, kvHeads: 2, headDim: 128 },
    retrieval: { pageSize: 8, sinkTokens: 24, windowTokens: 40, selectTokens: 256, combine: 2 /* Mean */ },
    prompts: [3100, 2050],
    firstChunk: 1500,
    attendPrompt: true,
    steps: 30,
    capacityPages: 512,
    seed: 1201,
    hierarchical: "on",
  },
  {
    name: "hierarchical selection on, max combine, cuboid, GQA 8, 4 groups",
    geometry: { layers: 2, qHeads: 8, kvHeads: 1, headDim: 64 },
    retrieval: { combine: 3 /* Max */, summary: 2 /* CuboidMean */ },
    prompts: [4100],
    firstChunk: 2000,
    attendPrompt: true,
    steps: 30,
    capacityPages: 160,
    seed: 1202,
    hierarchical: "on",
  },
  // Hierarchical on (candidate) against flat (CPU engine): same pages as the flat scan.
  {
    name: "hierarchical on vs off, mean combine, walk keys, Qwen GQA 7, P8, 45+ groups, re-attach",
    geometry: { layers: 2, qHeads: 14, kvHeads: 2, headDim: 128 },
    retrieval: { pageSize: 8, sinkTokens: 32, windowTokens: 64, selectTokens: 256, combine: 2 /* Mean */ },
    prompts: [11900, 4700],
    firstChunk: 3003,
    attendPrompt: false,
    steps: 24,
    capacityPages: 1600,
    seed: 1203,
    reattachAt: 12,
    hierarchical: "on",
    cpuHierarchical: "off",
    keys: "walk",
  },
  {
    name: "hierarchical on vs off, max combine, tied pages, GQA 4, P16",
    geometry: { layers: 1, qHeads: 8, kvHeads: 2, headDim: 64 },
    retrieval: { pageSize: 16, sinkTokens: 32, windowTokens: 64, selectTokens: 320, combine: 3 /* Max */ },
    prompts: [9000, 3000],
    firstChunk: 2000,
    attendPrompt: false,
    steps: 20,
    capacityPages: 600,
    seed: 1204,
    hierarchical: "on",
    cpuHierarchical: "off",
    keys: "tied",
  },
  {
    name: "hierarchical on vs off, softmax-mean with one query head per KV head, cuboid, walk keys",
    geometry: { layers: 1, qHeads: 4, kvHeads: 4, headDim: 128 },
    retrieval: { pageSize: 16, summary: 2 /* CuboidMean */, selectTokens: 512 },
    prompts: [10000],
    firstChunk: 3333,
    attendPrompt: false,
    steps: 20,
    capacityPages: 660,
    seed: 1205,
    hierarchical: "on",
    cpuHierarchical: "off",
    keys: "walk",
  },
  // resident_sparse keeps every page in the pool and reads the current query's selection in place
  // (no residency diff, no recall): beside oracle sessions in one batch, with a dense layer, a
  // double-buffer recall asked for (which it ignores), and a re-attach midway.
  {
    name: "resident sparse beside oracle and freekv, dense layer 1, re-attach and cross re-attach",
    geometry: { layers: 2, qHeads: 16, kvHeads: 4, headDim: 128 },
    retrieval: { mode: 6 },
    perSession: [{}, { mode: 3 }, { recall: 2, summary: 2, combine: 2, denseLayers: [1] }, { mode: 1 }],
    prompts: [1400, 1400, 903, 700],
    firstChunk: 600,
    attendPrompt: true,
    steps: 40,
    capacityPages: 64,
    seed: 1001,
    reattachAt: 21,
    crossReattach: true,
  },
  // FREEKV_RESIDENT_FACTOR 3: a group's pool keeps three selections' worth of pages (the page
  // chosen longest ago leaves first, engine/ResidentPool.h); the same pages attended, and the hit
  // and recall counters equal to the CPU engine's (both apply the same rule). Candidates (about 60
  // pages a session) outnumber the 24 slots, so pages are evicted.
  {
    name: "freekv and oracle with three selections' worth of resident pages, batch 3, re-attach",
    geometry: { layers: 2, qHeads: 8, kvHeads: 2, headDim: 128 },
    retrieval: { selectTokens: 256 },
    perSession: [{}, { mode: 3 }, { recall: 2 }],
    prompts: [2100, 1900, 1500],
    firstChunk: 700,
    attendPrompt: true,
    steps: 48,
    capacityPages: 96,
    seed: 1103,
    reattachAt: 30,
    residentFactor: 3,
  },
  // The default pool (four selections) over a selection of 160 pages: 640 slots a group, so the
  // residency diff's block of 128 threads numbers the misses over two chunks of the selection
  // (the first decode recalls all 160) and ranks the slots five to a thread; the walk keys make
  // the later selections move a few pages a step, and 1100+ candidate pages evict.
  {
    name: "default pool over a selection of 160 pages (640 slots a group), walk keys, batch 2",
    geometry: { layers: 1, qHeads: 4, kvHeads: 2, headDim: 64 },
    retrieval: { pageSize: 8, sinkTokens: 32, windowTokens: 64, selectTokens: 1280 },
    perSession: [{}, { mode: 3 }],
    prompts: [9000, 7100],
    firstChunk: 2500,
    attendPrompt: false,
    steps: 64,
    capacityPages: 1200,
    seed: 1301,
    keys: "walk",
  },
];

// ---------------------------------------------------------------------------------------------
// Near-ties of the page selection

// The binding's enums back to the reference's names (RETRIEVAL_NAMES and the harness map names to enums).
const invert = <N extends string>(m: Record<N, number>) => Object.fromEntries(Object.entries(m).map(([k, v]) => [v, k])) as Record<number, N>;
const MODE_NAME = invert<ModeName>(RETRIEVAL_NAMES.mode);
const COMBINE_NAME = invert<CombineName>(RETRIEVAL_NAMES.combine);
const SUMMARY_NAME = invert<SummaryKindName>(SUMMARY);

/** The float64 policy reference's config for one session's layer (bf16 storage). */
export function policyConfigOf(g: Omit<Geometry, "kvDtype">, r: Retrieval, layer: number): PolicyConfig {
  return {
    qHeads: g.qHeads, kvHeads: g.kvHeads, headDim: g.headDim,
    pageSize: r.pageSize, sinkTokens: r.sinkTokens, windowTokens: r.windowTokens, selectTokens: r.selectTokens, tau: r.tau,
    summary: SUMMARY_NAME[r.summary], combine: COMBINE_NAME[r.combine], mode: MODE_NAME[r.mode], dtype: "bf16",
    denseLayer: r.denseLayers.includes(layer),
  };
}

/** Relative tolerance of a near-tie: float32 sums of D products against float64 (see sameTopK). */
export const TIE_EPS = 1e-4;

/**
 * Two engines round page scores differently (the GPU sums max(q*hi, q*lo) in a parallel
 * reduction, the CPU sums 0.5*(q*(hi+lo) + |q|*(hi-lo)) in order), so where two pages score
 * the same up to float32 rounding at the k-th place, each may pick a different one. That is not
 * a bug; a different page anywhere else is. Given the token sets two engines attended for one
 * KV head (`got`, `want`) after `ref` (holding the same keys) appended the step's token, this
 * returns how the difference is explained (the query and the scores of the swapped pages), or
 * null when it is not: each set's middle pages (between the sink and the window) must be a
 * valid top-k of the float64 combined scores of one query that the step may have selected with
 * (this step's query, a correction or first selection, or the previous step's, a speculative
 * selection made one token earlier), and everything outside the middle must be the same.
 */
export function explainSelectionDifference(
  ref: ReferenceLayer,
  h: number,
  got: readonly number[],
  want: readonly number[],
  queries: { name: string; q: ArrayLike<number> | null; tokens: number }[],
): string | null {
  const c = ref.c;
  if (c.mode === "dense" || c.mode === "sink_window" || c.denseLayer) return null;
  const P = c.pageSize;
  const k = c.selectTokens / P;
  const r = ranges(c, ref.tokens);
  const split = (toks: readonly number[]) => {
    const middle = new Set<number>();
    const rest: number[] = [];
    for (const t of toks) {
      const p = Math.floor(t / P);
      if (t < r.full * P && p >= r.sinkEnd && p < r.windowBegin) middle.add(p);
      else rest.push(t);
    }
    return { middle: [...middle], rest };
  };
  const g = split(got),
    w = split(want);
  if (g.rest.length !== w.rest.length || g.rest.some((x, i) => x !== w.rest[i])) return null;
  for (const cand of queries) {
    if (!cand.q) continue;
    // A selection made when the context held cand.tokens ranks the full pages of that moment.
    const c1 = Math.min(r.windowBegin, Math.floor(cand.tokens / P));
    if (c1 <= r.sinkEnd) continue;
    if ([...g.middle, ...w.middle].some((p) => p >= c1)) continue;
    const scores = ref.combinedScores(h, cand.q, r.sinkEnd, c1);
    const rel = (m: number[]) => m.map((p) => p - r.sinkEnd);
    if (!sameTopK(rel(g.middle), scores, k, TIE_EPS) || !sameTopK(rel(w.middle), scores, k, TIE_EPS)) continue;
    const gs = new Set(g.middle),
      ws = new Set(w.middle);
    const fmt = (ps: number[]) => ps.map((p) => `${p} (${scores[p - r.sinkEnd].toPrecision(9)})`).join(", ");
    return `near-tie under ${cand.name}: only candidate pages ${fmt(g.middle.filter((p) => !ws.has(p)))}, only reference pages ${fmt(w.middle.filter((p) => !gs.has(p)))}`;
  }
  return null;
}

export interface CaseResult {
  name: string;
  ok: boolean;
  /** Largest relative error CUDA vs CPU over all decode outputs. */
  decodeVsCpu: number;
  /** Largest relative error CUDA vs float64 reference over CUDA's attended tokens. */
  decodeVsRef: number;
  prefillVsCpu: number;
  prefillVsRef: number;
  attendedMismatches: number;
  /** Attended-set differences explained as float32 near-ties of the page scores (not failures). */
  nearTies: number;
  notes: string[];
  corrections: number;
  recalled: number;
  failures: string[];
  /** The inputs' seed (FREEKV_CHECK_SEED=seed makes the same inputs again). */
  seed: number;
  ms: number;
}

interface SessionInputs {
  prompt: { q: Float32Array; k: Float32Array; v: Float32Array }[]; // per layer
  steps: { q: Float32Array; k: Float32Array; v: Float32Array }[][]; // [step][layer]
}

function makeInputs(spec: CaseSpec, rng: Rng, n: number): SessionInputs {
  const { layers, qHeads, kvHeads, headDim } = spec.geometry;
  const qn = qHeads * headDim,
    kn = kvHeads * headDim;
  const prompt = [];
  const lastQ: Float32Array[] = [];
  const P = spec.retrieval.pageSize ?? BASE.pageSize;
  for (let l = 0; l < layers; l++) {
    const q = rng.normals(n * qn);
    const k = rng.normals(n * kn, 1, 0.1);
    if (spec.keys === "walk") {
      // A slow random walk per channel (step 0.05) under noise of 0.3.
      const w = rng.normals(kn);
      for (let t = 0; t < n; t++)
        for (let c = 0; c < kn; c++) {
          w[c] += 0.05 * rng.normal();
          k[t * kn + c] = w[c] + 0.3 * k[t * kn + c];
        }
    } else if (spec.keys === "tied") {
      // Token t repeats token t mod (5 pages): every 5th page is the same page.
      for (let t = 5 * P; t < n; t++) k.copyWithin(t * kn, (t % (5 * P)) * kn, (t % (5 * P) + 1) * kn);
    }
    prompt.push({ q, k, v: rng.normals(n * kn) });
    lastQ.push(q.slice((n - 1) * qn));
  }
  const steps = [];
  for (let t = 0; t < spec.steps; t++) {
    const per = [];
    for (let l = 0; l < layers; l++) {
      // Queries drift (adjacent cosine between about 0.85 and 0.95, so tau splits the groups)
      // with an occasional jump.
      const q = new Float32Array(qn);
      const jump = t % 9 === 8;
      const noise = t % 3 === 0 ? 0.55 : 0.3;
      for (let i = 0; i < qn; i++) q[i] = jump ? rng.normal() : 0.92 * lastQ[l][i] + noise * rng.normal();
      lastQ[l] = q;
      per.push({ q, k: rng.normals(kn, 1, 0.1), v: rng.normals(kn) });
    }
    steps.push(per);
  }
  return { prompt, steps };
}

/** The bf16-rounded K/V history of one (session, layer) as float64 rows [token][Hkv*D]. */
class History {
  K: Float64Array[] = [];
  V: Float64Array[] = [];
  constructor(private kn: number) {}
  push(k: Float32Array, v: Float32Array, n: number): void {
    for (let i = 0; i < n; i++) {
      const kr = new Float64Array(this.kn),
        vr = new Float64Array(this.kn);
      for (let j = 0; j < this.kn; j++) {
        kr[j] = bf16(k[i * this.kn + j]);
        vr[j] = bf16(v[i * this.kn + j]);
      }
      this.K.push(kr);
      this.V.push(vr);
    }
  }
}

const TOL_VS_CPU = 2e-3; // both fp32 accumulation over the same bf16 values: far below this
const TOL_VS_REF = 2e-3;

/**
 * Runs one case. `candidate` is the backend checked against the CPU engine: "cuda" on the GPU
 * machine; "cpu" checks the harness itself on a machine without a GPU.
 */
export async function runCase(spec: CaseSpec, log: (line: string) => void = () => {}, candidate: "cuda" | "cpu" = "cuda"): Promise<CaseResult> {
  const t0 = Date.now();
  const addon = loadAddon();
  const geometry: Geometry = { ...spec.geometry, kvDtype: 2 /* BF16 */ };
  const retrieval: Retrieval = { ...BASE, ...spec.retrieval };
  const R = (b: number): Retrieval => ({ ...retrieval, ...(spec.perSession?.[b] ?? {}) });
  const { layers, qHeads, kvHeads, headDim: D } = geometry;
  const qn = qHeads * D,
    kn = kvHeads * D,
    G = qHeads / kvHeads;
  const B = spec.prompts.length;
  // Fresh inputs every run; FREEKV_CHECK_SEED replays a run's inputs (its seed is in the result).
  const seed = process.env.FREEKV_CHECK_SEED ? Number(process.env.FREEKV_CHECK_SEED) : spec.seed ^ (Date.now() & 0xffff);
  const rng = new Rng(seed);
  const inputs = spec.prompts.map((n) => makeInputs(spec, rng, n));
  const res: CaseResult = {
    name: spec.name, ok: false, decodeVsCpu: 0, decodeVsRef: 0, prefillVsCpu: 0, prefillVsRef: 0,
    attendedMismatches: 0, nearTies: 0, notes: [], corrections: 0, recalled: 0, failures: [], ms: 0, seed,
  };
  const fail = (m: string) => {
    if (res.failures.length < 12) res.failures.push(m);
  };

  const hosts: Host[] = [];
  const engines: Record<"cpu" | "cuda", Engine> = {
    cpu: new addon.Engine({ backend: "cpu", hierarchicalSelection: spec.cpuHierarchical ?? spec.hierarchical }),
    cuda: new addon.Engine({ backend: candidate, hierarchicalSelection: spec.hierarchical }),
  };
  const sessions: Record<"cpu" | "cuda", number[]> = { cpu: [], cuda: [] };
  const hostOf: Record<"cpu" | "cuda", Host[]> = { cpu: [], cuda: [] };
  try {
    for (const be of ["cpu", "cuda"] as const)
      for (let b = 0; b < B; b++) {
        const h = createHost(geometry, R(b), spec.capacityPages);
        hosts.push(h);
        hostOf[be].push(h);
        sessions[be].push(withResidentFactor(spec, () => engines[be].createSession(geometry, R(b), h.segments, false)));
      }
    const hist = inputs.map(() => Array.from({ length: layers }, () => new History(kn)));
    // Float64 policy references (keys and page summaries only), to judge selection differences.
    const refs = inputs.map((_, b) => Array.from({ length: layers }, (_, l) => new ReferenceLayer({ ...policyConfigOf(spec.geometry, R(b), l), residentFactor: spec.residentFactor })));
    // Sessions whose selection differed by a near-tie: their hit/recall counters may differ.
    const diverged = new Set<number>();
    const judge = (where: string, b: number, l: number, h: number, got: number[], want: number[], qNow: Float32Array, qPrev: Float32Array | null): boolean => {
      const ref = refs[b][l];
      const why = explainSelectionDifference(ref, h, got, want, [
        { name: "this step's query", q: qNow, tokens: ref.tokens },
        { name: "the previous query, one token earlier", q: qPrev, tokens: ref.tokens - 1 },
        { name: "the previous query", q: qPrev, tokens: ref.tokens },
      ]);
      if (!why) return false;
      res.nearTies++;
      diverged.add(b);
      if (res.notes.length < 12) res.notes.push(`${where} kv head ${h}: ${why}`);
      return true;
    };

    // Prefill in two chunks (the second starts inside a page).
    for (let b = 0; b < B; b++) {
      const n = spec.prompts[b];
      for (let l = 0; l < layers; l++) {
        const p = inputs[b].prompt[l];
        hist[b][l].push(p.k, p.v, n);
        refs[b][l].append(p.k, p.v, n);
        for (const [s, e] of [[0, spec.firstChunk], [spec.firstChunk, n]]) {
          const m = e - s;
          const k = p.k.subarray(s * kn, e * kn),
            v = p.v.subarray(s * kn, e * kn);
          if (!spec.attendPrompt) {
            await engines.cpu.prefill(sessions.cpu[b], l, k, v, m);
            await engines.cuda.prefill(sessions.cuda[b], l, k, v, m);
            continue;
          }
          const q = p.q.subarray(s * qn, e * qn);
          const oc = await engines.cpu.prefillAttend(sessions.cpu[b], l, q, k, v, m);
          const og = await engines.cuda.prefillAttend(sessions.cuda[b], l, q, k, v, m);
          if (!allFinite(og)) fail(`prefill b${b} l${l} [${s},${e}): non-finite CUDA output`);
          const e1 = relError(og, oc);
          res.prefillVsCpu = Math.max(res.prefillVsCpu, e1);
          if (!(e1 <= TOL_VS_CPU)) fail(`prefill b${b} l${l} [${s},${e}): rel err vs CPU ${e1.toExponential(2)}`);
          // float64 reference for the chunk's last 4 rows
          for (let i = Math.max(0, m - 4); i < m; i++) {
            const pos = s + i;
            const toks = Array.from({ length: pos + 1 }, (_, j) => j);
            const ref = new Float64Array(qn);
            for (let hq = 0; hq < qHeads; hq++)
              ref.set(attendRef(q, i * qn + hq * D, hist[b][l].K, hist[b][l].V, toks, Math.floor(hq / G), D, kvHeads), hq * D);
            const e2 = relError(og.subarray(i * qn, (i + 1) * qn), ref);
            res.prefillVsRef = Math.max(res.prefillVsRef, e2);
            if (!(e2 <= TOL_VS_REF)) fail(`prefill b${b} l${l} row ${pos}: rel err vs float64 ${e2.toExponential(2)}`);
          }
        }
      }
    }

    // Decode: every layer, the whole batch in one call per engine.
    let reattached = false;
    for (let t = 0; t < spec.steps; t++) {
      if (spec.reattachAt === t) {
        const fresh = new addon.Engine({ backend: candidate, hierarchicalSelection: spec.hierarchical });
        for (let b = 0; b < B; b++) {
          await engines.cuda.sync(sessions.cuda[b]);
          engines.cuda.closeSession(sessions.cuda[b]);
          sessions.cuda[b] = withResidentFactor(spec, () => fresh.createSession(geometry, R(b), hostOf.cuda[b].segments, true));
          if (fresh.contextTokens(sessions.cuda[b]) !== spec.prompts[b] + t) fail(`re-attach b${b}: context ${fresh.contextTokens(sessions.cuda[b])}`);
        }
        engines.cuda = fresh;
        reattached = true;
      }
      for (let l = 0; l < layers; l++) {
        const items = (be: "cpu" | "cuda") => inputs.map((inp, b) => ({ session: sessions[be][b], ...inp.steps[t][l] }));
        const oc = await engines.cpu.decode(l, items("cpu"));
        const og = await engines.cuda.decode(l, items("cuda"));
        for (let b = 0; b < B; b++) {
          const st = inputs[b].steps[t][l];
          hist[b][l].push(st.k, st.v, 1);
          refs[b][l].append(st.k, st.v, 1);
          const qPrev = t > 0 ? inputs[b].steps[t - 1][l].q : spec.attendPrompt ? inputs[b].prompt[l].q.subarray((spec.prompts[b] - 1) * qn) : null;
          const where = `step ${t} layer ${l} item ${b}`;
          if (!allFinite(og[b])) fail(`${where}: non-finite CUDA output`);
          const ref = new Float64Array(qn);
          let sameSets = true;
          for (let h = 0; h < kvHeads; h++) {
            const ac = Array.from(engines.cpu.lastAttendedTokens(sessions.cpu[b], l, h));
            const ag = Array.from(engines.cuda.lastAttendedTokens(sessions.cuda[b], l, h));
            if (ac.length !== ag.length || ac.some((x, i) => x !== ag[i])) {
              sameSets = false;
              if (!judge(where, b, l, h, ag, ac, st.q, qPrev)) {
                res.attendedMismatches++;
                fail(`${where} kv head ${h}: attended ${ag.length} tokens on CUDA, ${ac.length} on CPU (sets differ)`);
              }
            }
            const ctx = hist[b][l].K.length;
            if (ag.length === 0 || ag[ag.length - 1] !== ctx - 1 || ag.some((x) => x < 0 || x >= ctx))
              fail(`${where} kv head ${h}: attended tokens out of range or without the newest token`);
            for (let g = 0; g < G; g++) {
              const hq = h * G + g;
              ref.set(attendRef(st.q, hq * D, hist[b][l].K, hist[b][l].V, ag.filter((x) => x >= 0 && x < ctx), h, D, kvHeads), hq * D);
            }
          }
          const e2 = relError(og[b], ref);
          res.decodeVsRef = Math.max(res.decodeVsRef, e2);
          if (!(e2 <= TOL_VS_REF)) fail(`${where}: rel err vs float64 over attended tokens ${e2.toExponential(2)}`);
          // Over the same tokens the outputs must agree; over a near-tie's sets only each
          // against its own float64 reference (above) can.
          if (sameSets) {
            const e1 = relError(og[b], oc[b]);
            res.decodeVsCpu = Math.max(res.decodeVsCpu, e1);
            if (!(e1 <= TOL_VS_CPU)) fail(`${where}: rel err vs CPU ${e1.toExponential(2)}`);
          }
        }
      }
    }

    // Counters, context, and the host store written by the offload.
    for (let b = 0; b < B; b++) {
      await engines.cpu.sync(sessions.cpu[b]);
      await engines.cuda.sync(sessions.cuda[b]);
      const sc: EngineStats = engines.cpu.stats(sessions.cpu[b]);
      const sg: EngineStats = engines.cuda.stats(sessions.cuda[b]);
      res.corrections += sg.corrections;
      res.recalled += sg.pagesRecalled;
      // Counters restart with a re-attached session; the context does not.
      // After a near-tie the resident sets differ, so hits and recalls may too (not their sum).
      const keys: readonly (keyof EngineStats)[] = reattached
        ? ["contextTokens"]
        : diverged.has(b)
          ? ["contextTokens", "pagesOffloaded", "offloadBytes", "pagesSelected", "corrections", "decodeSteps"]
          : ["contextTokens", "pagesOffloaded", "offloadBytes", "pagesSelected", "pagesHit", "pagesRecalled", "recallBytes", "corrections", "decodeSteps"];
      for (const key of keys)
        if (sc[key] !== sg[key]) fail(`session ${b}: stats.${key} = ${sg[key]} on CUDA, ${sc[key]} on CPU`);
      // Per layer (native/src/engine/RetrievalStats.h): counts exactly, cosine sums within float
      // tolerance (float32 on the device, float64 on the CPU). A group cosine within 1e-5 of a
      // bucket edge or tau may land on either side, so the histogram and the samples below tau
      // may move by the number of such samples (none but by chance on random data).
      if (!reattached) {
        if (sg.layers.length !== sc.layers.length) fail(`session ${b}: stats.layers has ${sg.layers.length} layers on CUDA, ${sc.layers.length} on CPU`);
        for (let l = 0; l < Math.min(sc.layers.length, sg.layers.length); l++) {
          const lc = sc.layers[l],
            lg = sg.layers[l];
          const at = `session ${b}: stats.layers[${l}]`;
          const exact: (keyof typeof lc)[] = diverged.has(b)
            ? ["selections", "corrections", "pagesSelected", "cosineSamples"]
            : ["selections", "corrections", "pagesSelected", "pagesHit", "pagesRecalled", "cosineSamples", "overlapPages", "overlapBase"];
          for (const key of exact) if (lc[key] !== lg[key]) fail(`${at}.${key} = ${lg[key]} on CUDA, ${lc[key]} on CPU`);
          const tol = 1e-5 * Math.max(1, lc.cosineSamples);
          if (!(Math.abs(lc.cosineSum - lg.cosineSum) <= tol)) fail(`${at}.cosineSum = ${lg.cosineSum} on CUDA, ${lc.cosineSum} on CPU`);
          if (!(Math.abs(lc.cosineSumSq - lg.cosineSumSq) <= tol)) fail(`${at}.cosineSumSq = ${lg.cosineSumSq} on CUDA, ${lc.cosineSumSq} on CPU`);
          if (!(Math.abs(lc.cosineMin - lg.cosineMin) <= 1e-5)) fail(`${at}.cosineMin = ${lg.cosineMin} on CUDA, ${lc.cosineMin} on CPU`);
          const moved = lc.cosineHistogram.reduce((a, x, i) => a + Math.abs(x - (lg.cosineHistogram[i] ?? NaN)), 0);
          if (!(moved <= 2) || lg.cosineHistogram.length !== lc.cosineHistogram.length)
            fail(`${at}.cosineHistogram = [${lg.cosineHistogram}] on CUDA, [${lc.cosineHistogram}] on CPU`);
          if (!(Math.abs(lc.cosineBelowTau - lg.cosineBelowTau) <= 1)) fail(`${at}.cosineBelowTau = ${lg.cosineBelowTau} on CUDA, ${lc.cosineBelowTau} on CPU`);
        }
      }
      if (!reattached && sc.pagesHit + sc.pagesRecalled !== sg.pagesHit + sg.pagesRecalled)
        fail(`session ${b}: hits + recalls = ${sg.pagesHit + sg.pagesRecalled} on CUDA, ${sc.pagesHit + sc.pagesRecalled} on CPU`);
      if (engines.cuda.contextTokens(sessions.cuda[b]) !== spec.prompts[b] + spec.steps) fail(`session ${b}: contextTokens`);
      const L = addon.layout(geometry, R(b), spec.capacityPages);
      const ctx = spec.prompts[b] + spec.steps;
      const full = Math.floor(ctx / retrieval.pageSize);
      const sCpu = new Uint8Array(hostOf.cpu[b].segments.store.buffer());
      const sGpu = new Uint8Array(hostOf.cuda[b].segments.store.buffer());
      for (let l = 0; l < layers; l++) {
        const off = l * L.layerStride,
          len = full * L.pageBytes;
        let diff = 0;
        for (let i = off; i < off + len; i++) if (sCpu[i] !== sGpu[i]) diff++;
        if (diff) fail(`session ${b} layer ${l}: ${diff} bytes of the ${full} offloaded HND pages differ from the CPU engine's`);
        // HND check against the inputs themselves: page p, head h, K row i, first channel.
        const view = new DataView(sGpu.buffer, sGpu.byteOffset);
        for (const p of [0, full - 1])
          for (let h = 0; h < kvHeads; h++) {
            const tok = p * retrieval.pageSize + 3;
            const at = off + p * L.pageBytes + h * L.headPageBytes + 3 * D * 2;
            const got = view.getUint16(at, true);
            f32[0] = hist[b][l].K[tok][h * D];
            const want = u32[0] >>> 16;
            if (got !== want) fail(`session ${b} layer ${l} page ${p} head ${h}: HND key differs from the input`);
          }
        const tCpu = new Uint8Array(hostOf.cpu[b].segments.tail.buffer());
        const tGpu = new Uint8Array(hostOf.cuda[b].segments.tail.buffer());
        const rowsBytes = (ctx % retrieval.pageSize) * 2 * kn * 2;
        let tdiff = 0;
        for (let i = l * L.tailLayerBytes; i < l * L.tailLayerBytes + rowsBytes; i++) if (tCpu[i] !== tGpu[i]) tdiff++;
        if (tdiff) fail(`session ${b} layer ${l}: ${tdiff} bytes of the tail differ from the CPU engine's`);
      }
    }
    if (spec.crossReattach) {
      // A CPU engine continues the candidate's sessions from copies of their segments.
      const other = new addon.Engine({ backend: "cpu", hierarchicalSelection: spec.hierarchical });
      const extra = spec.prompts.map(() => makeInputs({ ...spec, steps: 1 }, rng, 1).steps[0]);
      const cs: number[] = [];
      for (let b = 0; b < B; b++) {
        await engines.cuda.sync(sessions.cuda[b]);
        const h = createHost(geometry, R(b), spec.capacityPages, hostOf.cuda[b]);
        hosts.push(h);
        cs.push(withResidentFactor(spec, () => other.createSession(geometry, R(b), h.segments, true)));
      }
      for (let l = 0; l < layers; l++) {
        const og = await engines.cuda.decode(l, extra.map((x, b) => ({ session: sessions.cuda[b], ...x[l] })));
        const oc = await other.decode(l, extra.map((x, b) => ({ session: cs[b], ...x[l] })));
        for (let b = 0; b < B; b++) {
          refs[b][l].append(extra[b][l].k, extra[b][l].v, 1);
          let sameSets = true;
          for (let h = 0; h < kvHeads; h++) {
            const a = Array.from(engines.cuda.lastAttendedTokens(sessions.cuda[b], l, h));
            const c = Array.from(other.lastAttendedTokens(cs[b], l, h));
            if (a.length !== c.length || a.some((x, i) => x !== c[i])) {
              sameSets = false;
              if (!judge(`cross re-attach layer ${l} item ${b}`, b, l, h, a, c, extra[b][l].q, inputs[b].steps[spec.steps - 1][l].q)) {
                res.attendedMismatches++;
                fail(`cross re-attach layer ${l} item ${b} kv head ${h}: attended sets differ`);
              }
            }
          }
          if (!sameSets) continue;
          const e = relError(og[b], oc[b]);
          res.decodeVsCpu = Math.max(res.decodeVsCpu, e);
          if (!(e <= TOL_VS_CPU)) fail(`cross re-attach layer ${l} item ${b}: rel err ${e.toExponential(2)}`);
        }
      }
      for (const s of cs) other.closeSession(s);
    }
    for (const be of ["cpu", "cuda"] as const) for (const s of sessions[be]) engines[be].closeSession(s);
  } catch (e) {
    fail(`threw: ${(e as Error).stack ?? e}`);
    // The sessions still open hold the hosts' segments: closed first (a failure here is the case's).
    for (const be of ["cpu", "cuda"] as const)
      for (const s of sessions[be])
        try {
          engines[be].closeSession(s);
        } catch {}
  } finally {
    for (const h of hosts) await h.dispose();
  }
  res.ok = res.failures.length === 0;
  res.ms = Date.now() - t0;
  log(`${res.ok ? "PASS" : "FAIL"} ${spec.name} (${res.ms} ms, inputs seed ${seed})${res.ok ? "" : "\n  " + res.failures.join("\n  ")}`);
  for (const n of res.notes) log(`  note: ${n}`);
  return res;
}

/** Whether the CUDA checks can run here, and why not. */
export function cudaStatus(): { available: boolean; reason: string } {
  try {
    const info = loadAddon().backendInfo();
    if (!info.cudaBuilt) return { available: false, reason: "the addon was built without the CUDA backend" };
    if (!info.cuda.available) return { available: false, reason: info.cuda.reason ?? "no CUDA device" };
    return { available: true, reason: `${info.cuda.name} (cc ${info.cuda.computeCapability})` };
  } catch (e) {
    return { available: false, reason: `the addon does not load: ${(e as Error).message}` };
  }
}
