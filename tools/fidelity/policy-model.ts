/**
 * A float64 model of the FreeKV retrieval policy (DESIGN.md section 2) for one layer, written
 * from the design rather than from the engine: the harness uses it to check itself and to
 * calibrate traces without the native engine, and `freekv fidelity --engine model` runs it.
 *
 * Per KV head: sink = first S/P pages; window = the partial page plus the W/P - 1 most recent
 * full pages; candidates = the full pages in between, scored with per-channel max/min summaries
 * (score = sum_i max(q_i hi_i, q_i lo_i)), the group's heads combined by softmax over pages of
 * the raw scores then mean, top sel/P kept. Resident selected pages are reused; only misses are
 * recalled (counted in bytes of the HND head-page, [2][P][D] float32).
 * Modes: dense (everything), sink_window, oracle (select with q_t), speculative (attend with the
 * pages selected after the previous step with q_{t-1}; the first step selects synchronously),
 * freekv (speculative, plus re-selection with q_t for groups whose mean cos(q_t, q_{t-1}) < tau).
 */
import type { ModeName, RetrievalSettings } from "./modes.js";
import type { ReplayCounters, ReplayTarget } from "./replay-target.js";

export interface ModelGeometry {
  qHeads: number;
  kvHeads: number;
  headDim: number;
  /** Tokens the session will hold (prefill + steps). */
  capacityTokens: number;
}

export class PolicyModel implements ReplayTarget {
  private readonly k: Float32Array;
  private readonly v: Float32Array;
  private len = 0;
  private readonly hi: Float64Array[] = [];
  private readonly lo: Float64Array[] = [];
  private readonly resident: Set<number>[];
  private readonly pending: (Set<number> | undefined)[];
  private prevQ: Float64Array | undefined;
  private readonly last: Int32Array[];
  private recallBytes = 0;
  private corrections = 0;
  private readonly group: number;

  constructor(
    private readonly geo: ModelGeometry,
    private readonly cfg: RetrievalSettings,
    private readonly mode: ModeName,
  ) {
    const { kvHeads, headDim, capacityTokens } = geo;
    this.k = new Float32Array(capacityTokens * kvHeads * headDim);
    this.v = new Float32Array(capacityTokens * kvHeads * headDim);
    this.resident = Array.from({ length: kvHeads }, () => new Set<number>());
    this.pending = new Array(kvHeads).fill(undefined);
    this.last = Array.from({ length: kvHeads }, () => new Int32Array(0));
    this.group = geo.qHeads / geo.kvHeads;
  }

  async prefill(k: Float32Array, v: Float32Array, n: number): Promise<void> {
    for (let s = 0; s < n; s++) this.append(k, v, s);
  }

  async decode(q: Float32Array, k: Float32Array, v: Float32Array): Promise<Float64Array> {
    const { qHeads: Hq, kvHeads: Hkv, headDim: D } = this.geo;
    this.append(k, v, 0);
    const qd = Float64Array.from(q);
    const out = new Float64Array(Hq * D);
    for (let h = 0; h < Hkv; h++) {
      const tokens = this.attendedTokens(h, qd);
      this.last[h] = tokens;
      for (let j = 0; j < this.group; j++) this.attend(qd, h * this.group + j, h, tokens, out);
    }
    if (this.mode === "speculative" || this.mode === "freekv") {
      // Speculative retrieval: select for the next step with this step's query, recall now.
      for (let h = 0; h < Hkv; h++) this.pending[h] = this.select(h, qd, this.len + 1);
    }
    this.prevQ = qd;
    return out;
  }

  attended(kvHead: number): Int32Array {
    return this.last[kvHead];
  }

  counters(): ReplayCounters {
    return { recallBytes: this.recallBytes, corrections: this.corrections };
  }

  async close(): Promise<void> {}

  // -------------------------------------------------------------------------------------------

  private append(k: Float32Array, v: Float32Array, s: number): void {
    const { kvHeads: Hkv, headDim: D } = this.geo;
    const P = this.cfg.pageSize;
    const row = Hkv * D;
    this.k.set(k.subarray(s * row, (s + 1) * row), this.len * row);
    this.v.set(v.subarray(s * row, (s + 1) * row), this.len * row);
    this.len++;
    if (this.len % P === 0) {
      // Page filled: summarise per KV head (max/min per channel of the post-RoPE keys).
      const page = this.len / P - 1;
      const hi = new Float64Array(row).fill(-Infinity);
      const lo = new Float64Array(row).fill(Infinity);
      for (let t = page * P; t < (page + 1) * P; t++)
        for (let i = 0; i < row; i++) {
          const x = this.k[t * row + i];
          if (x > hi[i]) hi[i] = x;
          if (x < lo[i]) lo[i] = x;
        }
      this.hi.push(hi);
      this.lo.push(lo);
    }
  }

  /** [first, end) of the selectable full pages for a context of `len` tokens. */
  private candidates(len: number): [number, number] {
    const P = this.cfg.pageSize;
    const full = Math.floor(len / P);
    const sinkPages = Math.min(full, this.cfg.sinkTokens / P);
    const windowFull = this.cfg.windowTokens / P - 1;
    return [sinkPages, Math.max(sinkPages, full - windowFull)];
  }

  /** Top sel/P candidate pages of KV head h for query q (group combine: softmax-mean). */
  private select(h: number, q: Float64Array, len: number): Set<number> {
    const D = this.geo.headDim;
    const [first, end] = this.candidates(len);
    const n = end - first;
    const budget = this.cfg.selectTokens / this.cfg.pageSize;
    if (n <= budget) return new Set(Array.from({ length: n }, (_, i) => first + i));
    const combined = new Float64Array(n);
    const scores = new Float64Array(n);
    for (let j = 0; j < this.group; j++) {
      const qOff = (h * this.group + j) * D;
      let max = -Infinity;
      for (let p = 0; p < n; p++) {
        const hi = this.hi[first + p];
        const lo = this.lo[first + p];
        let s = 0;
        for (let i = 0; i < D; i++) {
          const x = q[qOff + i];
          s += Math.max(x * hi[h * D + i], x * lo[h * D + i]);
        }
        scores[p] = s;
        if (s > max) max = s;
      }
      let z = 0;
      for (let p = 0; p < n; p++) z += Math.exp(scores[p] - max);
      for (let p = 0; p < n; p++) combined[p] += Math.exp(scores[p] - max) / z / this.group;
    }
    const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => combined[b] - combined[a] || a - b);
    const chosen = new Set<number>();
    for (let i = 0; i < budget; i++) chosen.add(first + order[i]);
    // Only misses move over the link.
    for (const p of chosen) if (!this.resident[h].has(p)) this.recallBytes += 2 * this.cfg.pageSize * D * 4;
    this.resident[h] = chosen;
    return chosen;
  }

  private attendedTokens(h: number, q: Float64Array): Int32Array {
    const len = this.len;
    if (this.mode === "dense") return Int32Array.from({ length: len }, (_, i) => i);
    const P = this.cfg.pageSize;
    const [first, end] = this.candidates(len);
    let selected: Set<number>;
    if (this.mode === "sink_window") selected = new Set();
    else if (this.mode === "oracle" || !this.pending[h]) selected = this.select(h, q, len);
    else {
      selected = this.pending[h]!;
      if (this.mode === "freekv" && this.prevQ && this.groupCosine(h, q, this.prevQ) < this.cfg.tau) {
        this.corrections++;
        selected = this.select(h, q, len);
      }
    }
    const tokens: number[] = [];
    for (let s = 0; s < first * P; s++) tokens.push(s);
    for (const p of [...selected].sort((a, b) => a - b)) if (p >= first && p < end) for (let s = p * P; s < (p + 1) * P; s++) tokens.push(s);
    for (let s = end * P; s < len; s++) tokens.push(s);
    return Int32Array.from(tokens);
  }

  private groupCosine(h: number, a: Float64Array, b: Float64Array): number {
    const D = this.geo.headDim;
    let sum = 0;
    for (let j = 0; j < this.group; j++) {
      const off = (h * this.group + j) * D;
      let ab = 0;
      let aa = 0;
      let bb = 0;
      for (let i = 0; i < D; i++) {
        ab += a[off + i] * b[off + i];
        aa += a[off + i] * a[off + i];
        bb += b[off + i] * b[off + i];
      }
      sum += aa && bb ? ab / Math.sqrt(aa * bb) : 0;
    }
    return sum / this.group;
  }

  private attend(q: Float64Array, qh: number, h: number, tokens: Int32Array, out: Float64Array): void {
    const { kvHeads: Hkv, headDim: D } = this.geo;
    const row = Hkv * D;
    const scale = 1 / Math.sqrt(D);
    const logits = new Float64Array(tokens.length);
    let max = -Infinity;
    for (let j = 0; j < tokens.length; j++) {
      const base = tokens[j] * row + h * D;
      let dot = 0;
      for (let i = 0; i < D; i++) dot += q[qh * D + i] * this.k[base + i];
      logits[j] = dot * scale;
      if (logits[j] > max) max = logits[j];
    }
    let z = 0;
    for (let j = 0; j < tokens.length; j++) z += logits[j] = Math.exp(logits[j] - max);
    for (let j = 0; j < tokens.length; j++) {
      const w = logits[j] / z;
      const base = tokens[j] * row + h * D;
      for (let i = 0; i < D; i++) out[qh * D + i] += w * this.v[base + i];
    }
  }
}
