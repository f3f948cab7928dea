/**
 * The one queue of the served model's work: Generate's prefill chunks and decode steps. The
 * model runs one call at a time; this is where the order is decided.
 *
 * - Decode steps: continuous batching. Each generating request asks for one step at a time
 *   (session, token, position); the steps of concurrent requests join into one Model.decode call
 *   over all layers, so they share steps without waiting for each other to finish.
 * - Prefill chunks (chunked prefill, as in vLLM): a prompt is fed in chunks of at most
 *   `prefillChunkTokens`, each one Model.prefill call queued here. A chunk runs alone, and never
 *   two chunks in a row while decode steps wait: between two chunks of a long prompt the other
 *   sessions' batched steps run, so they keep producing tokens while the prompt is read.
 *   Several prompts' chunks run first come, first served, or in turns (prefillOrder).
 * - Time slices: a chunk's cost grows with the context before it (its attention reads all of
 *   it), so a fixed token count would stall the decoding sessions more and more as a long prompt
 *   advances: at 128K tokens of an 8B model a 512-token chunk takes over 100 ms on an H200, ten
 *   decode steps. While sessions are decoding, the chunk is therefore cut to the tokens whose
 *   predicted time stays within `prefillSlice` times the recent decode step (PrefillCostModel,
 *   fitted to the chunks that ran), so a decoding session's time per token stays near
 *   (1 + prefillSlice) times its time alone, and the prompt gets the rest of the device. With no
 *   session decoding, chunks take `prefillChunkTokens` again. prefillSlice 0 turns slicing off.
 * - A slice is never so small that the chunk's fixed part (a pass over the weights, the launches:
 *   ~6 ms of an 8B model on an H200, where a decode step is ~10 ms) is most of it: it holds at
 *   least the tokens that make that part a quarter of its time (SLICE_FIXED_SHARE). Such a chunk
 *   can take longer than the slice, so the time sliced chunks take is kept as a debt that every
 *   decode step pays off by prefillSlice times its own time, and the next sliced chunk waits (held
 *   in the batcher) until it is paid (up to prefillUnpaidSlices slices may be left): the decoding
 *   sessions' mean time per token stays near (1 + prefillSlice) times alone, most of their steps
 *   run back to back, and the
 *   prompt advances in chunks that use the device well. (On the CPU, where 16-token slices cost
 *   several decode steps, a session decoding beside a 3K prompt ran at ~10x its median time per
 *   token alone before, 1.1-1.5x after: bench/results/ttft-cpu-20261203-slices.md.)
 * - Whole waves: on the GPU a slice is rounded up to a multiple of Model.prefillWaveTokens, the
 *   tokens whose attention fills every SM once. Deep in a long prompt the slices are a few hundred
 *   tokens, less than a wave (512 at 8B shapes on an H200), and a part of a wave takes nearly a
 *   whole wave's time: at 121,606 tokens of context 264 tokens took 60.6 ms where a whole
 *   8192-token chunk took 72.7 ms a wave. A 128K prompt read beside a decoding session took 247
 *   slices and 14.4 s of device time (11.1 s alone), its first token after 25.7 s; in whole waves
 *   180 slices, 10.95 s and 19.6 s, the session's median pace unchanged (1.02-1.05x alone)
 *   (bench/results/gpu-visit-20261204-2109/, -2126/).
 */
import type { Model } from "../../../native/binding.js";
import { addonFn, type SampleDraw } from "./sampling.js";
import { ServiceError } from "../../common/errors.js";
import { status } from "@grpc/grpc-js";
import { DecodeBatcher, type BatchItem } from "../decode-batcher.js";

/**
 * Prompt tokens per prefill chunk: the default (the CPU backend's), the CUDA backend's default, and
 * the range FREEKV_PREFILL_CHUNK_TOKENS may take. On the H200 an 8B-shaped 32K prompt prefills in
 * 2.0 s in 2048-token chunks against 2.8 s in 512-token ones (larger GEMMs, fewer passes over the
 * weights: bench/results/runner-20261203-0808.json); a 128K prompt's first token came after 11.34 s
 * in calls of 8192 tokens against 12.11 s in calls of 2048 (the same visit,
 * bench/results/gpu-visit-20261204-1847/: each call's return and the next one's issue leave the
 * device idle, 64 times instead of 16; the CUDA runner still runs a call in passes of 2048 rows).
 * On the CPU the rows of a 512-token chunk already fill the cores and its activations stay small.
 */
export const PREFILL_CHUNK_TOKENS = { default: 512, cuda: 8192, min: 1, max: 16384 } as const;

/** A model call's error that its input checks raised before anything was appended (binding.ts Model). */
export function isRefused(e: unknown): boolean {
  return typeof e === "object" && e !== null && (e as { refused?: unknown }).refused === true;
}

/**
 * A model call (or the sampling after it) failed after it may have appended to its sessions: their
 * contexts in the engine may no longer be what the service counts. `what` names the call, `cause`
 * is its error.
 */
export class ModelCallFailed extends Error {
  constructor(
    readonly what: "a prompt chunk" | "a decode step",
    readonly cause: unknown,
  ) {
    super(`${what} failed in the model (${cause instanceof Error ? cause.message : String(cause)})`);
    this.name = "ModelCallFailed";
  }
}

/** The chunk size a backend uses when FREEKV_PREFILL_CHUNK_TOKENS is unset. */
export function defaultPrefillChunkTokens(backend: "cpu" | "cuda"): number {
  return backend === "cuda" ? PREFILL_CHUNK_TOKENS.cuda : PREFILL_CHUNK_TOKENS.default;
}

/**
 * A prefill chunk's time while sessions decode, as a multiple of the recent decode step: the
 * default, and the range FREEKV_PREFILL_SLICE may take (0: chunks of prefillChunkTokens always).
 * A decoding session then runs at about (1 + slice) times its time per token alone on average,
 * a little more in practice (the calls' own gaps are nobody's). Measured on the H200, a session
 * decoding at batch 1 while a 131,072-token prompt prefilled (8B shapes; its mean ms/token during
 * the prefill over its mean alone; the prompt's first token): slice 1 and all paid (below) 1.91x
 * twice, 19.9-21.5 s; slice 0.8, 1.72x, 22.0-22.1 s (bench/results/gpu-visit-20261205/). 0.8 keeps
 * the decoding sessions within 2x with room to spare, for ~10% on the long prompt's first token.
 */
export const PREFILL_SLICE = { default: 0.8, min: 0, max: 64 } as const;

/**
 * How many slices of sliced chunks' time may be unpaid when the next sliced chunk starts
 * (FREEKV_PREFILL_UNPAID_SLICES). At 0 (the default) a chunk waits until the decode steps have
 * paid all of the sliced chunks' time before it. At 1 a chunk starts while up to one slice is
 * still owed, so the prompt gets a slice more than its share at every chunk: with slice 1 a
 * session decoding beside a 128K prompt on the H200 ran at 1.98x its time alone (twice) against
 * 1.91x (twice) all paid, and 2.4x at 1 in an earlier visit (bench/results/gpu-visit-20261205/,
 * gpu-visit-20261204-2126/).
 */
export const PREFILL_UNPAID_SLICES = { default: 0, min: 0, max: 16 } as const;

/** A time-sliced chunk holds at least this many tokens (the prompt always advances). */
const SLICE_MIN_TOKENS = 16;
/** A time-sliced chunk's predicted fixed part (the model's `a`) is at most this share of its time. */
const SLICE_FIXED_SHARE = 0.25;
/**
 * A time-sliced chunk is predicted to take at most this many decode steps, whatever the fitted
 * fixed part says. That part is inferred from chunk times and comes out overstated when they all
 * have one size (a prompt read alone in whole chunks: the fixed and per-token parts cannot be told
 * apart) or include one-time costs (the first call after start: 79 ms for 64 tokens on the H200,
 * against ~6 ms for the pass over the weights). Sized from it alone, slices were whole 8192-token
 * chunks, and a decoding session stalled for 381 ms at a time (bench/results/gpu-visit-20261204-1921/).
 * Slices cut this way have other sizes, which corrects the fit.
 */
const SLICE_MAX_STEPS = 8;
/** Tokens of a time-sliced chunk before the cost model has enough chunks to predict from. */
const SLICE_FIRST_TOKENS = 64;

/**
 * Predicts a prefill chunk's native time from its tokens n and the context c before it:
 * t = a + n * (b + d * (c + n / 2)) ms (a fixed part, the per-token GEMMs, and attention over the
 * context and the causal half of the chunk), fitted by least squares to the latest chunks that
 * ran, coefficients kept non-negative.
 */
export class PrefillCostModel {
  private readonly obs: { n: number; c: number; ms: number }[] = [];
  private coef: [number, number, number] | null = null;
  private seen = 0;

  constructor(private readonly keep = 64) {}

  /**
   * One chunk's time. The first chunk after start is not kept: it pays one-time costs (on the H200
   * 79 ms for a 64-token prompt against ~6 ms for the pass over the weights), and a single such
   * point fixed the fitted fixed part near its time.
   */
  observe(n: number, c: number, ms: number): void {
    if (!(n > 0) || !(ms >= 0) || !Number.isFinite(ms)) return;
    if (this.seen++ === 0) return;
    this.obs.push({ n, c, ms });
    if (this.obs.length > this.keep) this.obs.shift();
    this.coef = this.fit();
  }

  /** Predicted ms of n tokens after a context of c; null before the model can predict. */
  predict(n: number, c: number): number | null {
    if (!this.coef) return null;
    const [a, b, d] = this.coef;
    return a + n * (b + d * (c + n / 2));
  }

  /**
   * The predicted fixed part of a chunk (ms); null before the model can predict, and while the
   * chunks seen do not tell it apart from the per-token part (their sizes within a factor of 2: a
   * prompt read alone in whole chunks of one size puts any share of their time there).
   */
  fixedMs(): number | null {
    if (!this.coef) return null;
    let lo = Infinity, hi = 0;
    for (const o of this.obs) (lo = Math.min(lo, o.n)), (hi = Math.max(hi, o.n));
    return hi >= 2 * lo ? this.coef[0] : null;
  }

  /** The most tokens in [1, max] whose predicted time after context c stays within ms (at least 1); null before the model can predict. */
  tokensWithin(ms: number, c: number, max: number): number | null {
    if (!this.coef) return null;
    let lo = 1, hi = Math.max(1, max);
    if (this.predict(hi, c)! <= ms) return hi;
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (this.predict(mid, c)! <= ms) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  private fit(): [number, number, number] | null {
    if (this.obs.length < 3) return null;
    // Features scaled to similar magnitudes: [1, n / 1e3, n * (c + n / 2) / 1e6].
    const f = (o: { n: number; c: number }) => [1, o.n / 1e3, (o.n * (o.c + o.n / 2)) / 1e6];
    const solve = (cols: number[]): number[] | null => {
      const k = cols.length;
      const A = Array.from({ length: k }, () => new Array<number>(k + 1).fill(0));
      for (const o of this.obs) {
        const x = f(o);
        for (let i = 0; i < k; i++) {
          for (let j = 0; j < k; j++) A[i][j] += x[cols[i]] * x[cols[j]];
          A[i][k] += x[cols[i]] * o.ms;
        }
      }
      for (let i = 0; i < k; i++) A[i][i] += 1e-9 * (1 + A[i][i]);
      for (let i = 0; i < k; i++) {
        let p = i;
        for (let r = i + 1; r < k; r++) if (Math.abs(A[r][i]) > Math.abs(A[p][i])) p = r;
        [A[i], A[p]] = [A[p], A[i]];
        if (Math.abs(A[i][i]) < 1e-300) return null;
        for (let r = 0; r < k; r++) {
          if (r === i) continue;
          const m = A[r][i] / A[i][i];
          for (let j = i; j <= k; j++) A[r][j] -= m * A[i][j];
        }
      }
      return A.map((row, i) => row[k] / row[i]);
    };
    // Least squares over the columns still in play; a negative coefficient leaves and the rest are refitted.
    let cols = [0, 1, 2];
    for (;;) {
      const x = solve(cols);
      if (!x || x.some((v) => !Number.isFinite(v))) return null;
      const neg = x.findIndex((v) => v < 0);
      if (neg < 0) {
        const out: [number, number, number] = [0, 0, 0];
        cols.forEach((c, i) => (out[c] = x[i]));
        if (out[1] === 0 && out[2] === 0) return null;
        return [out[0], out[1] / 1e3, out[2] / 1e6];
      }
      cols = cols.filter((_, i) => i !== neg);
      if (!cols.length) return null;
    }
  }
}

export interface StepResult {
  /** The row's logits [vocab]; empty when the batch was picked greedily on the native side. */
  logits: Float32Array;
  /** The row's argmax, when every step of the batch asked for greedy decoding (decodeArgmax). */
  token?: number;
  /** Sessions in the batched call that produced it. */
  batchSize: number;
  stepMs: number;
}

export interface PrefillResult {
  /** Logits of the chunk's last position [vocab]. */
  logits: Float32Array;
  /** Tokens the chunk took from the front of the ones offered. */
  tokens: number;
  /** Native time of the chunk. */
  ms: number;
}

type Row = { logits: Float32Array; token?: number; tokens?: number };

interface Step extends BatchItem<Row> {
  kind: "decode";
  session: number;
  token: number;
  position: number;
  greedy: boolean;
  /** At temperature > 0: the draw, made for the whole batch off the main thread (sampleRowsAsync). */
  draw?: SampleDraw;
  /** Run again alone after its batch failed. */
  retry?: boolean;
}

interface Chunk extends BatchItem<Row> {
  kind: "prefill";
  session: number;
  /** The prompt's tokens still to feed; the chunk takes a prefix of them. */
  tokens: Int32Array;
  start: number;
  /** Tokens the chunk took (set when it runs). */
  took?: number;
  /** Whether it was cut to a time slice (other sessions were decoding). */
  sliced?: boolean;
  /** Its prompt's place in line (ModelScheduler.promptOrder): lower runs first. */
  order: number;
}

type Work = Step | Chunk;

export interface ModelSchedulerOptions {
  /** Most sessions per decode step. */
  maxBatch?: number;
  /** Most prompt tokens per Model.prefill call. */
  prefillChunkTokens?: number;
  /** While sessions decode, a chunk's predicted time at most this times the recent decode step (0: off). */
  prefillSlice?: number;
  /**
   * Several prompts' chunks: "turns" (default) gives each prompt waiting a chunk in turn;
   * "arrival" reads the prompts first come, first served. Measured with bench:serving on the CPU
   * (0.1 requests/s, prompts 1K-8K, two runs each): turns TTFT p50 1.2 s, TPOT p99 32-33 ms;
   * arrival TTFT p50 2.4-2.6 s, TPOT p99 17-19 ms (bench/results/serving-cpu-20261203.md).
   */
  prefillOrder?: "arrival" | "turns";
  /** Slices of sliced chunks' time that may be unpaid when the next sliced chunk starts (PREFILL_UNPAID_SLICES). */
  prefillUnpaidSlices?: number;
  /** After each decode step: its batch size and native time. */
  onStep?: (size: number, ms: number) => void;
  /** After each prefill chunk: its tokens and native time, its session and first position, and the model's idle time before it (BatchInfo.gapMs). */
  onPrefill?: (tokens: number, ms: number, chunk: { session: number; start: number; gapMs?: number }) => void;
}

const EMPTY = new Float32Array(0);

export class ModelScheduler {
  private readonly batcher: DecodeBatcher<Work, Row>;
  readonly prefillChunkTokens: number;
  readonly prefillSlice: number;
  readonly prefillOrder: "arrival" | "turns";
  readonly prefillUnpaidSlices: number;
  /** Chunk times, for the time slices. */
  readonly prefillCost = new PrefillCostModel();
  /** Recent decode step time (ms, exponential average), and when each session's latest step ended. */
  private decodeMs: number | undefined;
  /** Time of sliced chunks not yet paid off by decode steps (ms; see the time slices above). */
  private prefillDebtMs = 0;
  private readonly lastStepEnd = new Map<number, number>();

  constructor(
    private readonly model: Model,
    opts: ModelSchedulerOptions = {},
  ) {
    const chunk = opts.prefillChunkTokens ?? PREFILL_CHUNK_TOKENS.default;
    if (!Number.isInteger(chunk) || chunk < PREFILL_CHUNK_TOKENS.min || chunk > PREFILL_CHUNK_TOKENS.max)
      throw new RangeError(`prefillChunkTokens: must be an integer in [${PREFILL_CHUNK_TOKENS.min}, ${PREFILL_CHUNK_TOKENS.max}], got ${chunk}`);
    this.prefillChunkTokens = chunk;
    const slice = opts.prefillSlice ?? PREFILL_SLICE.default;
    if (!Number.isFinite(slice) || slice < PREFILL_SLICE.min || slice > PREFILL_SLICE.max)
      throw new RangeError(`prefillSlice: must be a number in [${PREFILL_SLICE.min}, ${PREFILL_SLICE.max}], got ${slice}`);
    this.prefillSlice = slice;
    this.prefillOrder = opts.prefillOrder ?? "turns";
    const unpaid = opts.prefillUnpaidSlices ?? PREFILL_UNPAID_SLICES.default;
    if (!Number.isFinite(unpaid) || unpaid < PREFILL_UNPAID_SLICES.min || unpaid > PREFILL_UNPAID_SLICES.max)
      throw new RangeError(`prefillUnpaidSlices: must be a number in [${PREFILL_UNPAID_SLICES.min}, ${PREFILL_UNPAID_SLICES.max}], got ${unpaid}`);
    this.prefillUnpaidSlices = unpaid;
    this.batcher = new DecodeBatcher<Work, Row>({
      maxBatch: opts.maxBatch ?? 64,
      windowUs: 0,
      eager: true,
      alone: (w) => w.kind === "prefill" || !!w.retry,
      // A step retried alone first; prefill chunks by their prompt's order (first come, first served).
      rank: (w) => (w.kind === "prefill" ? w.order : -Infinity),
      // A chunk waits while sliced chunks' time is not paid off and other sessions still decode.
      hold: (w) => w.kind === "prefill" && this.holdChunk(w.session),
      call: (work) => (work[0].kind === "prefill" ? this.prefillCall(work[0]) : this.decodeCall(work as Step[])),
      failed: (work, e) => this.isolate(work, e),
      observe: (work, b) => {
        const w = work[0];
        if (w.kind === "prefill") {
          const n = w.took ?? w.tokens.length;
          this.prefillCost.observe(n, w.start, b.ms);
          this.prefillDebtMs = w.sliced ? this.prefillDebtMs + b.ms : 0;
          opts.onPrefill?.(n, b.ms, { session: w.session, start: w.start, gapMs: b.gapMs });
        } else {
          this.decodeMs = this.decodeMs === undefined ? b.ms : 0.8 * this.decodeMs + 0.2 * b.ms;
          this.prefillDebtMs = Math.max(0, this.prefillDebtMs - this.prefillSlice * b.ms);
          const now = performance.now();
          for (const it of work) this.lastStepEnd.set(it.session, now);
          opts.onStep?.(b.size, b.ms);
        }
      },
    });
  }

  /** Model calls run so far (decode steps and prefill chunks). */
  get batches(): number {
    return this.batcher.batches;
  }

  /**
   * One decode step of a session. `greedy`: the caller only needs the argmax; when every step of
   * a batch says so, the batch runs through Model.decodeArgmax (picked where the logits are, the
   * GPU for the GPU runner) and only token ids come back.
   */
  step(session: number, token: number, position: number, greedy = false, draw?: SampleDraw): Promise<StepResult> {
    return new Promise((resolve, reject) => {
      this.batcher.submit({
        kind: "decode",
        session,
        group: "",
        token,
        position,
        greedy,
        draw,
        resolve: (r, b) => resolve({ ...r, batchSize: b.size, stepMs: b.ms }),
        reject,
      });
    });
  }

  /**
   * One prefill chunk of a session at `start`, its context length: a prefix of `tokens` (the
   * prompt's tokens still to feed), at most prefillChunkTokens, fewer while other sessions decode
   * (time slices); the result says how many it took. A chunk still queued when `signal` aborts is
   * dropped (rejected with the abort reason) and never runs.
   */
  prefill(session: number, tokens: Int32Array, start: number, signal?: AbortSignal, order = this.promptOrder()): Promise<PrefillResult> {
    if (tokens.length === 0) return Promise.reject(new RangeError("a prefill chunk needs at least one token"));
    return new Promise((resolve, reject) => {
      this.batcher.submit({
        kind: "prefill",
        session,
        group: "",
        tokens,
        start,
        // In turns: each chunk queues behind every chunk already waiting.
        order: this.prefillOrder === "turns" ? this.promptOrder() : order,
        abandoned: signal && (() => (signal.aborted ? (signal.reason ?? new ServiceError(status.CANCELLED, "call cancelled")) : undefined)),
        resolve: (r, b) => resolve({ logits: r.logits, tokens: r.tokens!, ms: b.ms }),
        reject,
      });
    });
  }

  /**
   * A prompt's place in line for its chunks: taken once per prompt, before its first chunk, and
   * passed with every chunk of it (ignored in turns). With prefillOrder "arrival" several prompts' chunks run first
   * come, first served (the earliest prompt gets every chunk until it is read, as vLLM orders
   * them): the longest wait for a first token is bounded by the work ahead in line. With "turns"
   * each waiting prompt gets a chunk in turn: a short prompt behind a long one gets its first
   * token sooner, a long one later (every prompt waiting at once finishes near the end of all).
   */
  promptOrder(): number {
    return this.promptSeq++;
  }
  private promptSeq = 0;

  /** Tokens the next chunk of a prompt takes from `c` (see the time slices above). */
  chunkTokens(c: { session: number; tokens: Int32Array; start: number; sliced?: boolean }): number {
    let n = Math.min(c.tokens.length, this.prefillChunkTokens);
    c.sliced = false;
    if (this.prefillSlice > 0 && this.decodeMs !== undefined && this.othersDecoding(c.session)) {
      const within = this.prefillCost.tokensWithin(this.prefillSlice * this.decodeMs, c.start, n);
      // The fewest tokens whose predicted time is at least fixed / SLICE_FIXED_SHARE.
      const fixed = this.prefillCost.fixedMs();
      const efficient =
        fixed === null ? null : this.prefillCost.tokensWithin(Math.min(fixed / SLICE_FIXED_SHARE, SLICE_MAX_STEPS * this.decodeMs), c.start, n);
      n = Math.min(n, Math.max(within ?? SLICE_FIRST_TOKENS, efficient ?? 0, SLICE_MIN_TOKENS));
      const wave = this.model.prefillWaveTokens ?? 1;
      if (wave > 1) n = Math.min(c.tokens.length, this.prefillChunkTokens, Math.ceil(n / wave) * wave);
      c.sliced = true;
    }
    return n;
  }

  /**
   * Whether a chunk of `session` waits: more than prefillUnpaidSlices slices of sliced chunks' time
   * are not paid off yet and others still decode (the debt lapses once they stop). At 1, chunks that
   * fit a slice alternate with decode steps; a longer one is followed by as many steps as it took.
   */
  private holdChunk(session: number): boolean {
    if (this.prefillSlice <= 0 || this.prefillDebtMs <= this.prefillUnpaidSlices * this.prefillSlice * (this.decodeMs ?? 0)) return false;
    if (this.othersDecoding(session)) return true;
    this.prefillDebtMs = 0;
    return false;
  }

  /**
   * Sessions other than `session` are decoding: a step of theirs waits, or one ended within about
   * two steps' time (a generating session asks for its next step as soon as one ends; one that
   * finished stops asking and ages out).
   */
  private othersDecoding(session: number): boolean {
    if (this.batcher.hasWaiting((w) => w.kind === "decode" && w.session !== session)) return true;
    const recent = performance.now() - Math.max(5, 2 * (this.decodeMs ?? 0));
    for (const [s, at] of this.lastStepEnd) {
      if (at < recent) this.lastStepEnd.delete(s);
      else if (s !== session) return true;
    }
    return false;
  }

  private async prefillCall(c: Chunk): Promise<Row[]> {
    const n = this.chunkTokens(c);
    c.took = n;
    return [{ logits: await this.model.prefill(c.session, c.tokens.subarray(0, n), c.start, false), tokens: n }];
  }

  private async decodeCall(steps: Step[]): Promise<Row[]> {
    const args = [Int32Array.from(steps, (p) => p.session), Int32Array.from(steps, (p) => p.token), Int32Array.from(steps, (p) => p.position)] as const;
    if (steps.every((p) => p.greedy)) {
      const tokens = await this.model.decodeArgmax(...args);
      return steps.map((_, i) => ({ logits: EMPTY, token: tokens[i] }));
    }
    const logits = await this.model.decode(...args);
    const V = this.model.vocabSize;
    const rows: Row[] = steps.map((_, i) => ({ logits: logits.subarray(i * V, (i + 1) * V) }));
    // Rows at temperature > 0 are drawn together, off the main thread and in parallel: drawn one
    // after another on the event loop, a 128K vocabulary cost ~20 ms a row (JavaScript) or ~5
    // (native), which at batch 8 was several times the H200's step.
    const drawn = steps.flatMap((p, i) => (p.draw ? [i] : []));
    const sampleRows = drawn.length ? addonFn("sampleRowsAsync") : null;
    if (sampleRows) {
      const params = new Float64Array(4 * drawn.length);
      drawn.forEach((i, j) => {
        const d = steps[i].draw!;
        params.set([d.temperature, d.topK, d.topP, d.u], 4 * j);
      });
      const tokens = await sampleRows(logits, V, Int32Array.from(drawn), params);
      drawn.forEach((i, j) => (rows[i].token = tokens[j]));
    }
    return rows;
  }

  /**
   * A failed model call. Refused by its input checks (the binding marks the error `refused`:
   * nothing was appended): one bad step fails the whole call, so the others run again, each alone,
   * through the queue (still one model call at a time), unaffected. Any other failure may have come
   * after some layers appended the step's token (or the chunk's tokens) to every session of the
   * call: running it again would append them twice, so each is answered with a ModelCallFailed,
   * and its session is marked diverged by the Generate handler.
   */
  private isolate(work: Work[], e: unknown): void {
    if (!isRefused(e)) {
      for (const w of work) w.reject(new ModelCallFailed(w.kind === "prefill" ? "a prompt chunk" : "a decode step", e));
      return;
    }
    if (work.length === 1) return work[0].reject(e);
    for (const p of work as Step[]) this.batcher.submit({ ...p, retry: true });
  }
}
