/**
 * Float64 reference of one layer of the FreeKV policy (DESIGN.md section 2), step by step:
 * budget ranges (sink, window, middle), summaries, group-consistent selection, residency
 * (hits vs recalled misses given the resident set), speculative selection for the next step,
 * correction, and attention over what was selected.
 */
import { attend } from "./attention.js";
import { roundStored } from "./kv.js";
import { combineGroup, topK, type CombineName } from "./selection.js";
import { scorePage, summarise, type PageSummary, type SummaryKindName } from "./summary.js";

/** The engines' FREEKV_RESIDENT_FACTOR when it is unset (native/src/engine/Retrieval.h, kDefaultResidentFactor). */
export const DEFAULT_RESIDENT_FACTOR = 4;

export type ModeName = "freekv" | "dense" | "oracle" | "speculative" | "sink_window" | "resident_sparse";

export interface PolicyConfig {
  qHeads: number;
  kvHeads: number;
  headDim: number;
  pageSize: number;
  sinkTokens: number;
  windowTokens: number;
  selectTokens: number;
  tau: number;
  summary: SummaryKindName;
  combine: CombineName;
  mode: ModeName;
  dtype: "f32" | "bf16";
  /** A dense layer of a non-dense session. */
  denseLayer?: boolean;
  /**
   * Pages a KV group keeps resident, in selections (FREEKV_RESIDENT_FACTOR; default 4, as the
   * engines'; 1 is the paper's pool of one selection). With more
   * than one, the pages chosen longest ago leave first (then the lowest page), as
   * native/src/engine/ResidentPool.h says; the store is taken to hold at least that many pages.
   */
  residentFactor?: number;
}

export interface Ranges {
  full: number;
  partial: number;
  sinkEnd: number;
  windowBegin: number;
}

export function ranges(c: PolicyConfig, tokens: number): Ranges {
  const P = c.pageSize;
  const full = Math.floor(tokens / P);
  const sinkEnd = Math.min(c.sinkTokens / P, full);
  const windowBegin = Math.max(sinkEnd, full - (c.windowTokens / P - 1));
  return { full, partial: tokens % P, sinkEnd, windowBegin };
}

export interface StepResult {
  /** [qHeads * headDim] */
  out: Float64Array;
  /** Per KV head, the token positions attended, ascending. */
  attended: number[][];
  /** Per KV head, whether it was corrected at this step. */
  corrected: boolean[];
}

export interface Counters {
  selections: number;
  corrections: number;
  pagesSelected: number;
  pagesHit: number;
  pagesRecalled: number;
}

export class ReferenceLayer {
  readonly keys: Float64Array[][] = []; // [token][kvHead] stored (rounded) rows
  readonly values: Float64Array[][] = [];
  private summaries: PageSummary[][] = []; // [page][kvHead]
  private resident: Set<number>[];
  /** Per KV head, with residentFactor > 1: resident page -> selections since it was last chosen. */
  private ages: Map<number, number>[];
  private selected: number[][];
  private qPrev: Float64Array | null = null;
  private firstDecode = true;
  readonly counters: Counters = { selections: 0, corrections: 0, pagesSelected: 0, pagesHit: 0, pagesRecalled: 0 };

  constructor(readonly c: PolicyConfig) {
    this.resident = Array.from({ length: c.kvHeads }, () => new Set<number>());
    this.ages = Array.from({ length: c.kvHeads }, () => new Map<number, number>());
    this.selected = Array.from({ length: c.kvHeads }, () => []);
  }

  get tokens(): number {
    return this.keys.length;
  }
  private get group(): number {
    return this.c.qHeads / this.c.kvHeads;
  }
  private get dense(): boolean {
    return this.c.mode === "dense" || !!this.c.denseLayer;
  }
  private get retrieves(): boolean {
    return !this.dense && this.c.mode !== "sink_window";
  }
  private get speculates(): boolean {
    return !this.dense && (this.c.mode === "freekv" || this.c.mode === "speculative");
  }

  /** Appends n tokens: k, v are [n][kvHeads][headDim]. */
  append(k: Float32Array, v: Float32Array, n: number): void {
    const { kvHeads: H, headDim: D, pageSize: P } = this.c;
    const kr = roundStored(k, this.c.dtype);
    const vr = roundStored(v, this.c.dtype);
    for (let t = 0; t < n; t++) {
      this.keys.push(Array.from({ length: H }, (_, h) => kr.subarray((t * H + h) * D, (t * H + h + 1) * D)));
      this.values.push(Array.from({ length: H }, (_, h) => vr.subarray((t * H + h) * D, (t * H + h + 1) * D)));
      if (this.tokens % P === 0) {
        const page = this.tokens / P - 1;
        this.summaries[page] = Array.from({ length: H }, (_, h) =>
          summarise(this.keys.slice(page * P, page * P + P).map((row) => row[h]), this.c.summary),
        );
      }
    }
  }

  /** Prefill; `lastQuery` ([qHeads*headDim]) when the prefill attended (prefillAttend). */
  prefill(k: Float32Array, v: Float32Array, n: number, lastQuery?: Float32Array): void {
    this.append(k, v, n);
    this.qPrev = lastQuery ? Float64Array.from(lastQuery) : null;
    this.firstDecode = true;
  }

  /** Exact causal attention of n prefill queries ([n][qHeads][headDim]) that end at the current context. */
  prefillAttention(q: Float32Array, n: number): Float64Array {
    const { qHeads, headDim: D } = this.c;
    const out = new Float64Array(n * qHeads * D);
    const start = this.tokens - n;
    for (let i = 0; i < n; i++)
      for (let j = 0; j < qHeads; j++) {
        const h = Math.floor(j / this.group);
        const len = start + i + 1;
        const o = attend(
          q.subarray((i * qHeads + j) * D, (i * qHeads + j + 1) * D),
          this.keys.slice(0, len).map((r) => r[h]),
          this.values.slice(0, len).map((r) => r[h]),
        );
        out.set(o, (i * qHeads + j) * D);
      }
    return out;
  }

  /** Combined scores of pages [c0, c1) for KV head h with query q ([qHeads*headDim]). */
  combinedScores(h: number, q: ArrayLike<number>, c0: number, c1: number): number[] {
    const D = this.c.headDim;
    const scores: number[][] = [];
    for (let j = 0; j < this.group; j++) {
      const qh = Array.from({ length: D }, (_, d) => q[(h * this.group + j) * D + d]);
      const s: number[] = [];
      for (let p = c0; p < c1; p++) s.push(scorePage(qh, this.summaries[p][h]));
      scores.push(s);
    }
    return c1 > c0 ? combineGroup(scores, this.c.combine) : [];
  }

  /** Selection for head h among pages [c0, c1); updates residency and counters. */
  private selectHead(h: number, q: ArrayLike<number>, c0: number, c1: number): void {
    const combined = this.combinedScores(h, q, c0, c1);
    const chosen = topK(combined, this.c.selectTokens / this.c.pageSize).map((i) => i + c0);
    let hits = 0;
    // resident_sparse keeps every page where attention reads it: every selected page is a hit.
    for (const p of chosen) if (this.c.mode === "resident_sparse" || this.resident[h].has(p)) hits++;
    this.counters.pagesSelected += chosen.length;
    this.counters.pagesHit += hits;
    this.counters.pagesRecalled += chosen.length - hits;
    // Misses replace resident pages that were not chosen; with as many slots as the selection
    // can hold, the resident set becomes the chosen set. With more, the oldest leave first.
    const k = this.c.selectTokens / this.c.pageSize;
    const slots = Math.min(k * (this.c.residentFactor ?? DEFAULT_RESIDENT_FACTOR), 1024);
    if (slots <= k) {
      this.resident[h] = new Set(chosen);
    } else {
      const ages = this.ages[h];
      const want = new Set(chosen);
      for (const [p, a] of ages) ages.set(p, want.has(p) ? 0 : a + 1);
      for (const p of chosen) ages.set(p, 0);
      const leave = [...ages.keys()].filter((p) => !want.has(p)).sort((a, b) => ages.get(b)! - ages.get(a)! || a - b);
      for (let i = 0; ages.size > slots; i++) ages.delete(leave[i]);
      this.resident[h] = new Set(ages.keys());
    }
    this.selected[h] = [...chosen].sort((a, b) => a - b);
  }

  private cosine(q: ArrayLike<number>, h: number): number {
    const D = this.c.headDim;
    let acc = 0;
    for (let j = 0; j < this.group; j++) {
      let ab = 0,
        aa = 0,
        bb = 0;
      for (let d = 0; d < D; d++) {
        const a = q[(h * this.group + j) * D + d];
        const b = this.qPrev![(h * this.group + j) * D + d];
        ab += a * b;
        aa += a * a;
        bb += b * b;
      }
      const den = Math.sqrt(aa) * Math.sqrt(bb);
      acc += den > 0 ? ab / den : 0;
    }
    return acc / this.group;
  }

  /** One decode step: q [qHeads*headDim], k, v [kvHeads*headDim]. */
  decode(q: Float32Array, k: Float32Array, v: Float32Array): StepResult {
    const { kvHeads: H, headDim: D, pageSize: P } = this.c;
    this.append(k, v, 1);
    const r = ranges(this.c, this.tokens);
    const corrected = new Array<boolean>(H).fill(false);
    if (this.retrieves) {
      this.counters.selections += H;
      for (let h = 0; h < H; h++) {
        if (this.c.mode === "oracle" || this.c.mode === "resident_sparse") this.selectHead(h, q, r.sinkEnd, r.windowBegin);
        // The first decode after a prefill blocks in every mode: freekv selects with its own
        // query, speculative with the prompt's last (native/src/engine/Retrieval.h, SelectsCurrentAt).
        else if (this.firstDecode) this.selectHead(h, this.c.mode === "freekv" ? q : (this.qPrev ?? q), r.sinkEnd, r.windowBegin);
        else if (this.c.mode === "freekv" && this.cosine(q, h) < this.c.tau) {
          this.selectHead(h, q, r.sinkEnd, r.windowBegin);
          this.counters.corrections++;
          corrected[h] = true;
        }
      }
    }
    const attended: number[][] = [];
    const out = new Float64Array(this.c.qHeads * D);
    for (let h = 0; h < H; h++) {
      let pages: number[];
      if (this.dense) pages = Array.from({ length: r.full }, (_, p) => p);
      else {
        pages = Array.from({ length: r.sinkEnd }, (_, p) => p);
        if (this.retrieves) pages.push(...this.selected[h]);
        for (let p = r.windowBegin; p < r.full; p++) pages.push(p);
      }
      const toks: number[] = [];
      for (const p of pages) for (let i = 0; i < P; i++) toks.push(p * P + i);
      for (let t = r.full * P; t < this.tokens; t++) toks.push(t);
      attended.push(toks);
      for (let j = 0; j < this.group; j++) {
        const qh = (h * this.group + j) * D;
        const o = attend(
          q.subarray(qh, qh + D),
          toks.map((t) => this.keys[t][h]),
          toks.map((t) => this.values[t][h]),
        );
        out.set(o, qh);
      }
    }
    this.qPrev = Float64Array.from(q);
    this.firstDecode = false;
    if (this.speculates) {
      // Speculative selection for the next step with q_t: its middle range, among full pages.
      const next = ranges(this.c, this.tokens + 1);
      for (let h = 0; h < H; h++) this.selectHead(h, q, next.sinkEnd, Math.min(next.windowBegin, r.full));
    }
    return { out, attended, corrected };
  }
}
