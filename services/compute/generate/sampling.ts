/**
 * Next-token sampling: greedy at temperature 0, otherwise softmax(logits / T) restricted by top-k
 * and then by top-p (the smallest set of most likely tokens whose mass reaches p), drawn with a
 * seeded generator so that a request with a seed is reproducible.
 */
import { loadAddon, type Addon } from "../../../native/binding.js";

export interface SamplingOptions {
  temperature: number;
  topP: number;
  topK: number;
  /** 0 = a random seed. */
  seed: number | bigint;
}

/** splitmix64: small, seedable, good enough for sampling. */
export class SeededRandom {
  private state: bigint;
  constructor(seed: bigint) {
    this.state = BigInt.asUintN(64, seed);
  }
  /** Uniform in [0, 1). */
  next(): number {
    this.state = BigInt.asUintN(64, this.state + 0x9e3779b97f4a7c15n);
    let z = this.state;
    z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
    z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
    z = z ^ (z >> 31n);
    return Number(z >> 11n) / 2 ** 53;
  }
}

export function validateSampling(s: SamplingOptions): string | undefined {
  if (!Number.isFinite(s.temperature) || s.temperature < 0) return `sampling.temperature must be >= 0, got ${s.temperature}`;
  if (!Number.isFinite(s.topP) || s.topP < 0 || s.topP > 1) return `sampling.top_p must be in [0, 1], got ${s.topP}`;
  if (!Number.isInteger(s.topK) || s.topK < 0) return `sampling.top_k must be an integer >= 0, got ${s.topK}`;
  return undefined;
}

type SamplingFns = Pick<Addon, "argmaxF32" | "sampleF32" | "sampleRowsAsync">;
const found = new Map<keyof SamplingFns, unknown>();

/** The addon's function `name`, bound; null without the addon (then the TypeScript loops run). Looked up once. */
export function addonFn<K extends keyof SamplingFns>(name: K): SamplingFns[K] | null {
  if (!found.has(name)) {
    let f: SamplingFns[K] | null = null;
    try {
      const addon = loadAddon();
      if (typeof addon[name] === "function") f = (addon[name] as (...a: never[]) => unknown).bind(addon) as SamplingFns[K];
    } catch {
      f = null;
    }
    found.set(name, f);
  }
  return found.get(name) as SamplingFns[K] | null;
}

/**
 * Index of the first largest of logits[offset .. offset + n). Long rows (a real vocabulary) go to
 * the native loop, several times faster than this one, which is the fallback and the reference.
 */
export function argmax(logits: Float32Array, offset = 0, n = logits.length - offset): number {
  const f = n >= 4096 ? addonFn("argmaxF32") : null;
  return f ? f(logits, offset, n) : argmaxJs(logits, offset, n);
}

export function argmaxJs(logits: Float32Array, offset = 0, n = logits.length - offset): number {
  let best = 0;
  let bestValue = logits[offset];
  for (let i = 1; i < n; i++) {
    const v = logits[offset + i];
    if (v > bestValue) {
      bestValue = v;
      best = i;
    }
  }
  return best;
}

/**
 * Reorders ids[lo, hi) so that its first `m` entries are the m largest by (value desc, id asc),
 * sorted: a quickselect then a sort of only those m. Same order as a full stable sort of the
 * ids by value descending, at O(n + m log m) instead of O(n log n) for a large vocabulary.
 */
export function partialSortDesc(ids: Int32Array, n: number, values: Float32Array, offset: number, m: number): void {
  const before = (a: number, b: number) => {
    const va = values[offset + a];
    const vb = values[offset + b];
    return va > vb || (va === vb && a < b);
  };
  m = Math.min(m, n);
  let lo = 0;
  let hi = n - 1;
  while (lo < hi) {
    // Median of three as the pivot, then a Hoare partition by the total order `before`.
    const mid = (lo + hi) >>> 1;
    let a = ids[lo], b = ids[mid], c = ids[hi];
    if (before(b, a)) [a, b] = [b, a];
    if (before(c, b)) {
      [b, c] = [c, b];
      if (before(b, a)) [a, b] = [b, a];
    }
    const pivot = b;
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (before(ids[i], pivot)) i++;
      while (before(pivot, ids[j])) j--;
      if (i <= j) {
        const t = ids[i];
        ids[i] = ids[j];
        ids[j] = t;
        i++;
        j--;
      }
    }
    if (m - 1 <= j) hi = j;
    else if (m - 1 >= i) lo = i;
    else break;
  }
  const head = Array.from(ids.subarray(0, m));
  head.sort((a, b) => (before(a, b) ? -1 : before(b, a) ? 1 : 0));
  ids.set(head, 0);
}

export class Sampler {
  private readonly rng: SeededRandom;
  constructor(private readonly opts: SamplingOptions) {
    const seed = BigInt(opts.seed || 0);
    this.rng = new SeededRandom(seed !== 0n ? seed : BigInt(Math.floor(Math.random() * 2 ** 52)));
  }

  get greedy(): boolean {
    return this.opts.temperature === 0;
  }

  /** Picks a token from one row of logits [vocab] at `offset`. */
  sample(logits: Float32Array, offset: number, vocab: number): number {
    if (this.greedy) return argmax(logits, offset, vocab);
    return sampleWith(logits, offset, vocab, this.draw());
  }

  /**
   * The next draw's parameters with its uniform taken from the generator (one per token, as
   * sample() takes it): for a draw made elsewhere (the scheduler's batched sampleRowsAsync, or
   * sampleWith). Only at temperature > 0.
   */
  draw(): SampleDraw {
    const { temperature, topK, topP } = this.opts;
    return { temperature, topK, topP, u: this.rng.next() };
  }
}

/** One draw at temperature > 0: its parameters and its uniform in [0, 1). */
export interface SampleDraw {
  temperature: number;
  topK: number;
  topP: number;
  u: number;
}

/** The draw `d` from one row: the addon's sampleF32 for a real vocabulary, else sampleJs (the same steps). */
export function sampleWith(logits: Float32Array, offset: number, vocab: number, d: SampleDraw): number {
  const f = vocab >= 4096 ? addonFn("sampleF32") : null;
  return f ? f(logits, offset, vocab, d.temperature, d.topK, d.topP, d.u) : sampleJs(logits, offset, vocab, { ...d, seed: 0 }, d.u);
}

/**
 * The draw at temperature > 0 with the uniform `u`: the reference, and the fallback for short rows
 * and machines without the addon (a real vocabulary goes to the addon's sampleF32, the same steps).
 */
export function sampleJs(logits: Float32Array, offset: number, vocab: number, opts: SamplingOptions, u: number): number {
  const { temperature, topK, topP } = opts;
  let max = -Infinity;
  // NaN logits are never candidates (a NaN is neither the maximum nor >= the cut).
  for (let i = 0; i < vocab; i++) if (logits[offset + i] > max) max = logits[offset + i];
  // Tokens more than 40 temperatures below the best have probability ratios under e^-40: they
  // are left out, so a large vocabulary is neither sorted nor summed in full.
  const cut = max - 40 * temperature;
  const candidates = new Int32Array(vocab);
  let n = 0;
  for (let i = 0; i < vocab; i++) if (logits[offset + i] >= cut) candidates[n++] = i;
  const weight = (i: number) => Math.exp((logits[offset + i] - max) / temperature);
  if (n === 0) throw new RangeError("no logit to sample from: every logit of the row is NaN");
  let ids = candidates.subarray(0, n);
  if (topK > 0 && topK < n) {
    partialSortDesc(candidates, n, logits, offset, topK);
    ids = candidates.subarray(0, topK);
  }
  if (topP > 0 && topP < 1) {
    // The nucleus is usually small: sort growing heads of the (top-k) candidates until one
    // holds mass p, instead of sorting the whole vocabulary.
    const size = ids.length;
    let total = 0;
    for (let i = 0; i < size; i++) total += weight(ids[i]);
    let m = Math.min(size, 256);
    for (;;) {
      if (!(topK > 0 && topK < n)) partialSortDesc(candidates, n, logits, offset, m);
      let acc = 0;
      let reached = -1;
      for (let i = 0; i < m; i++) {
        acc += weight(ids[i]) / total;
        if (acc >= topP) {
          reached = i + 1;
          break;
        }
      }
      if (reached > 0) {
        ids = ids.subarray(0, reached);
        break;
      }
      if (m >= size) break;
      m = Math.min(size, m * 8);
    }
  }
  let keep: number;
  keep = ids.length;
  const p = Array.from(ids, weight);
  const sum = p.reduce((a, b) => a + b, 0);
  let r = u * sum;
  for (let i = 0; i < keep; i++) {
    r -= p[i];
    if (r < 0) return ids[i];
  }
  return ids[keep - 1];
}

