/**
 * The trace synthesiser: one layer of queries, keys and values with the structure that makes
 * KV retrieval both possible and hard, as in real long-context heads (DESIGN.md sections 2, 6).
 *
 * Per KV head, in the head's pre-RoPE space (then every vector is rotated by its position):
 *  - topics: the context is a sequence of runs (64..768 tokens) about one of a few topics; a
 *    token's key points at its topic's centroid, bent toward its run's own sub-topic, plus
 *    isotropic noise. Topic signal lives in the lowest-frequency RoPE pairs, the ones that barely
 *    turn over the context, so a query finds its topic wherever it sits.
 *  - sinks: the first few tokens have a large key along a direction every query shares, so they
 *    take a steady share of attention whatever the topic (the "attention sink").
 *  - recency: queries and keys share a vector in the mid-frequency pairs; after RoPE it adds a
 *    bonus that fades with distance, which is why the window matters.
 *  - queries: the group's topic direction plus a slowly drifting AR(1) offset, a fixed offset per
 *    query head, and fresh noise. `drift` sets how far the query moves per step (default gives
 *    adjacent cosines of about 0.85-0.97, the range the FreeKV paper reports).
 *  - topic jumps: every ~`jumpEvery` steps the group switches to another topic; the previous
 *    step's query then selects the wrong pages, which is what correction must catch.
 *  - needles: a single page whose keys match one later query strongly (a retrieval question);
 *    for a short span of steps the query points at it.
 * Decode-time tokens continue the query's current topic.
 *
 * All logit-relevant magnitudes are set in units of q.k/sqrt(D) via f = D^(1/4), so the shape of
 * attention does not change with head_dim.
 */
import { Prng } from "./random.js";
import { applyRope, ropeFrequencies } from "./rope.js";
import type { TraceTensors } from "./trace.js";

export interface SynthOptions {
  promptLen: number;
  steps: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** Topic centroids per KV head. */
  topics: number;
  /** Mean number of decode steps between topic jumps; 0 = never. */
  jumpEvery: number;
  /** Needle pages in total (spread over the KV heads). */
  needles: number;
  seed: number;
  /** Per-step query drift (0 = constant query apart from jumps). */
  drift: number;
  ropeTheta: number;
  /** Needles are aligned to this page size. */
  pageSize: number;
  /** Tokens with sink keys at the start of the context. */
  sinkTokens: number;
  name: string;
}

export const SYNTH_DEFAULTS: SynthOptions = {
  promptLen: 8192,
  steps: 64,
  qHeads: 8,
  kvHeads: 2,
  headDim: 64,
  topics: 12,
  jumpEvery: 16,
  needles: 4,
  seed: 1,
  drift: 0.06,
  ropeTheta: 500000,
  pageSize: 32,
  sinkTokens: 4,
  name: "synthetic",
};

export interface Needle {
  kvHead: number;
  /** Page index (tokens page*P .. page*P+P-1). */
  page: number;
  /** First decode step whose query asks for it. */
  step: number;
  /** Steps the query keeps pointing at it. */
  span: number;
}

export interface SynthTrace extends TraceTensors {
  /** Per KV head, the decode steps at which the group's topic jumps. */
  jumps: number[][];
  needles: Needle[];
  /** Per KV head, the topic of each context token (-1 for sink tokens). */
  tokenTopic: Int16Array[];
  /** Per KV head, the query topic at each decode step. */
  stepTopic: Int16Array[];
}

// Magnitudes in logit units (products give q.k/sqrt(D) at perfect alignment).
const A_Q = 3.0; // query topic
const A_K = 3.0; // key topic
const SUBTOPIC = 0.55; // run's own direction, relative to the centroid
const B_Q = 1.0; // query sink direction
const S_K = 12.0; // sink keys
const R_Q = 1.2; // recency vector, query
const R_K = 2.6; // recency vector, key
const KEY_NOISE = 0.9; // logit std of key noise against a typical query
const QUERY_NOISE = 0.2; // per-step fresh query noise, all channels (norm relative to the topic part)
const NEEDLE_K = 4.6; // needle keys
const HEAD_OFFSET = 0.25; // per query head, relative to the topic direction
const AR_RHO = 0.9; // persistence of the query drift
const DRIFT_NORM = 8.8; // stationary drift norm per unit of --drift

export function validateSynthOptions(o: SynthOptions): void {
  const int = (name: string, v: number, min: number) => {
    if (!Number.isInteger(v) || v < min) throw new RangeError(`--${name} must be an integer >= ${min} (got ${v})`);
  };
  int("prompt-len", o.promptLen, 1);
  int("steps", o.steps, 1);
  int("q-heads", o.qHeads, 1);
  int("kv-heads", o.kvHeads, 1);
  int("head-dim", o.headDim, 8);
  int("topics", o.topics, 2);
  int("jump-every", o.jumpEvery, 0);
  int("needles", o.needles, 0);
  int("page-size", o.pageSize, 1);
  int("seed", o.seed, 0);
  if (o.qHeads % o.kvHeads !== 0) throw new RangeError(`--q-heads (${o.qHeads}) must be a multiple of --kv-heads (${o.kvHeads})`);
  if (o.headDim % 8 !== 0) throw new RangeError(`--head-dim must be a multiple of 8 (got ${o.headDim})`);
  if (!(o.drift >= 0 && o.drift <= 2)) throw new RangeError(`--drift must be in [0, 2] (got ${o.drift})`);
  if (!(o.ropeTheta > 1)) throw new RangeError(`--rope-theta must be > 1 (got ${o.ropeTheta})`);
  if (o.needles > 0 && Math.floor(o.promptLen / o.pageSize) < 8)
    throw new RangeError(`--prompt-len ${o.promptLen} is too short for needles (needs at least 8 pages of ${o.pageSize})`);
}

export function synthesizeTrace(opts: Partial<SynthOptions> = {}): SynthTrace {
  const o: SynthOptions = { ...SYNTH_DEFAULTS, ...opts };
  validateSynthOptions(o);
  const { promptLen: N, steps: T, qHeads: Hq, kvHeads: Hkv, headDim: D } = o;
  const half = D / 2;
  const f = Math.pow(D, 0.25);
  const freqs = ropeFrequencies(D, o.ropeTheta);
  const group = Hq / Hkv;
  // Channel bands (pair indices; a pair is channels i and i + D/2).
  const semPairs = range(half - D / 8, half); // lowest frequencies: topics, sinks, needles
  const recPairs = range(D / 8, D / 4); // mid frequencies: recency
  const semDims = dimsOf(semPairs, half);
  const recDims = dimsOf(recPairs, half);

  const q = new Float32Array(T * Hq * D);
  const k = new Float32Array((N + T) * Hkv * D);
  const v = new Float32Array((N + T) * Hkv * D);
  const jumps: number[][] = [];
  const tokenTopic: Int16Array[] = [];
  const stepTopic: Int16Array[] = [];
  const needles = placeNeedles(o);

  for (let h = 0; h < Hkv; h++) {
    const rng = new Prng(o.seed, 1000 + h);
    // Directions: sink first, then topics, orthogonal while the subspace allows it (distinct
    // topics of one head are near-orthogonal in practice), then random beyond that.
    const basis = orthoDirections(rng, semDims, D, 1 + o.topics);
    const sinkDir = basis[0];
    const centroids = basis.slice(1);
    const recency = unitIn(rng, recDims, D);
    const headNeedles = needles.filter((n) => n.kvHead === h);
    // Everything but the sink keys stays orthogonal to the sink direction: otherwise a query's
    // chance alignment with it, times the large sink key, would swamp its topic.
    const needleDirs = headNeedles.map(() => normalize(without(unitIn(rng, semDims, D), sinkDir)));
    const keyNoise = (KEY_NOISE * f) / A_Q; // per-channel std giving KEY_NOISE logit std

    // Context runs.
    const topicOf = new Int16Array(N + T).fill(-1);
    const runOf = new Int32Array(N + T).fill(-1);
    const runDirs: Float64Array[] = [];
    let pos = Math.min(o.sinkTokens, N);
    let prevTopic = -1;
    while (pos < N) {
      const len = Math.min(N - pos, 64 + rng.int(0, 705));
      let t = rng.int(0, o.topics);
      if (t === prevTopic) t = (t + 1 + rng.int(0, o.topics - 1)) % o.topics;
      const dir = mix(centroids[t], 1, unitIn(rng, semDims, D), SUBTOPIC);
      normalize(without(dir, sinkDir));
      runDirs.push(dir);
      for (let s = pos; s < pos + len; s++) {
        topicOf[s] = t;
        runOf[s] = runDirs.length - 1;
      }
      pos += len;
      prevTopic = t;
    }
    const present = [...new Set(Array.from(topicOf.subarray(0, N)).filter((t) => t >= 0))];
    if (present.length === 0) present.push(0);

    // Query topic schedule and jumps.
    const qTopic = new Int16Array(T);
    const hJumps: number[] = [];
    let cur = present[rng.int(0, present.length)];
    let nextJump = o.jumpEvery > 0 ? Math.max(1, Math.round(o.jumpEvery * (0.5 + 0.5 * rng.uniform()))) : Infinity;
    for (let t = 0; t < T; t++) {
      if (t === nextJump) {
        let nt = present[rng.int(0, present.length)];
        if (present.length > 1) while (nt === cur) nt = present[rng.int(0, present.length)];
        cur = nt;
        hJumps.push(t);
        nextJump = t + Math.max(2, Math.round(o.jumpEvery * (0.75 + 0.5 * rng.uniform())));
      }
      qTopic[t] = cur;
    }

    // Decode-time tokens continue the query's topic in a fresh run per topic stretch.
    for (let t = 0; t < T; t++) {
      const s = N + t;
      topicOf[s] = qTopic[t];
      if (t === 0 || qTopic[t] !== qTopic[t - 1]) {
        const dir = mix(centroids[qTopic[t]], 1, unitIn(rng, semDims, D), SUBTOPIC);
        normalize(without(dir, sinkDir));
        runDirs.push(dir);
      }
      runOf[s] = runDirs.length - 1;
    }

    // Keys and values.
    const pre = new Float64Array(D);
    for (let s = 0; s < N + T; s++) {
      pre.fill(0);
      for (let i = 0; i < D; i++) pre[i] = rng.gaussian() * keyNoise;
      if (s < o.sinkTokens && s < N) {
        for (let i = 0; i < D; i++) pre[i] += S_K * f * sinkDir[i];
      } else {
        const dir = runDirs[runOf[s]];
        for (let i = 0; i < D; i++) pre[i] += A_K * f * dir[i];
      }
      for (let i = 0; i < D; i++) pre[i] += R_K * f * recency[i];
      const off = (s * Hkv + h) * D;
      applyRope(pre, s, freqs, k, off);
      for (let i = 0; i < D; i++) v[off + i] = rng.gaussian();
    }
    // Needle pages: every token of the page points at the needle's direction.
    headNeedles.forEach((nd, j) => {
      for (let s = nd.page * o.pageSize; s < (nd.page + 1) * o.pageSize; s++) {
        for (let i = 0; i < D; i++) pre[i] = rng.gaussian() * keyNoise * 0.5 + NEEDLE_K * f * needleDirs[j][i] + R_K * f * recency[i];
        applyRope(pre, s, freqs, k, (s * Hkv + h) * D);
        topicOf[s] = -2;
      }
    });

    // Queries.
    const headOffsets = Array.from({ length: group }, () => scaleVec(unitIn(rng, semDims, D), HEAD_OFFSET));
    const drift = new Float64Array(D);
    const innovation = Math.sqrt(1 - AR_RHO * AR_RHO);
    const qNoise = (QUERY_NOISE * A_Q * f) / Math.sqrt(D);
    for (let t = 0; t < T; t++) {
      // AR(1) drift in the topic subspace, stationary norm DRIFT_NORM * o.drift (relative to the
      // unit topic direction); successive steps share rho of it.
      for (const i of semDims) drift[i] = AR_RHO * drift[i] + (innovation * DRIFT_NORM * o.drift * rng.gaussian()) / Math.sqrt(semDims.length);
      const needle = headNeedles.findIndex((nd) => t >= nd.step && t < nd.step + nd.span);
      const topicDir = needle >= 0 ? mix(needleDirs[needle], 1, centroids[qTopic[t]], 0.25) : centroids[qTopic[t]];
      for (let j = 0; j < group; j++) {
        const qh = h * group + j;
        const dir = new Float64Array(D);
        for (let i = 0; i < D; i++) dir[i] = topicDir[i] + drift[i] + headOffsets[j][i];
        normalize(without(dir, sinkDir));
        for (let i = 0; i < D; i++)
          pre[i] = A_Q * f * dir[i] + B_Q * f * sinkDir[i] + R_Q * f * recency[i] + rng.gaussian() * qNoise;
        applyRope(pre, N + t, freqs, q, (t * Hq + qh) * D);
      }
    }
    jumps.push(hJumps);
    tokenTopic.push(topicOf.slice(0, N));
    stepTopic.push(qTopic);
  }
  return { name: o.name, promptLen: N, steps: T, qHeads: Hq, kvHeads: Hkv, headDim: D, q, k, v, jumps, needles, tokenTopic, stepTopic };
}

/** Needles: spread over KV heads and over the steps, on pages away from the sink and the end. */
function placeNeedles(o: SynthOptions): Needle[] {
  const rng = new Prng(o.seed, 7);
  const pages = Math.floor(o.promptLen / o.pageSize);
  const lo = Math.max(2, Math.ceil(o.sinkTokens / o.pageSize) + 2);
  const hi = Math.max(lo + 1, pages - Math.max(4, Math.ceil(pages / 8)));
  const out: Needle[] = [];
  const used = new Set<string>();
  for (let j = 0; j < o.needles; j++) {
    const kvHead = j % o.kvHeads;
    let page = rng.int(lo, hi);
    while (used.has(`${kvHead}:${page}`)) page = rng.int(lo, hi);
    used.add(`${kvHead}:${page}`);
    const slot = Math.floor(((j + 0.5) * o.steps) / Math.max(1, o.needles));
    const step = Math.min(o.steps - 1, Math.max(1, slot));
    out.push({ kvHead, page, step, span: Math.min(3, o.steps - step) });
  }
  return out;
}

function range(a: number, b: number): number[] {
  const r: number[] = [];
  for (let i = a; i < b; i++) r.push(i);
  return r;
}

function dimsOf(pairs: number[], half: number): number[] {
  return [...pairs, ...pairs.map((p) => p + half)];
}

function unitIn(rng: Prng, dims: number[], D: number): Float64Array {
  const x = new Float64Array(D);
  for (const i of dims) x[i] = rng.gaussian();
  return normalize(x);
}

function orthoDirections(rng: Prng, dims: number[], D: number, count: number): Float64Array[] {
  const out: Float64Array[] = [];
  for (let c = 0; c < count; c++) {
    const x = unitIn(rng, dims, D);
    if (out.length < dims.length) {
      for (const b of out) {
        let dot = 0;
        for (let i = 0; i < D; i++) dot += x[i] * b[i];
        for (let i = 0; i < D; i++) x[i] -= dot * b[i];
      }
      normalize(x);
    }
    out.push(x);
  }
  return out;
}

function normalize(x: Float64Array): Float64Array {
  let n = 0;
  for (let i = 0; i < x.length; i++) n += x[i] * x[i];
  n = Math.sqrt(n);
  if (n > 0) for (let i = 0; i < x.length; i++) x[i] /= n;
  return x;
}

function mix(a: Float64Array, wa: number, b: Float64Array, wb: number): Float64Array {
  const out = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = wa * a[i] + wb * b[i];
  return out;
}

/** Removes the component of x along the unit vector b (in place). */
function without(x: Float64Array, b: Float64Array): Float64Array {
  let dot = 0;
  for (let i = 0; i < x.length; i++) dot += x[i] * b[i];
  for (let i = 0; i < x.length; i++) x[i] -= dot * b[i];
  return x;
}

function scaleVec(a: Float64Array, s: number): Float64Array {
  for (let i = 0; i < a.length; i++) a[i] *= s;
  return a;
}
