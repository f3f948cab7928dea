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
 */
import type { Model } from "../../../native/binding.js";
import { ServiceError } from "../../common/errors.js";
import { status } from "@grpc/grpc-js";
import { DecodeBatcher, type BatchItem } from "../decode-batcher.js";

/** Prompt tokens per prefill chunk: the default, and the range FREEKV_PREFILL_CHUNK_TOKENS may take. */
export const PREFILL_CHUNK_TOKENS = { default: 512, min: 1, max: 16384 } as const;

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
  /** Native time of the chunk. */
  ms: number;
}

type Row = { logits: Float32Array; token?: number };

interface Step extends BatchItem<Row> {
  kind: "decode";
  session: number;
  token: number;
  position: number;
  greedy: boolean;
  /** Run again alone after its batch failed. */
  retry?: boolean;
}

interface Chunk extends BatchItem<Row> {
  kind: "prefill";
  session: number;
  tokens: Int32Array;
  start: number;
}

type Work = Step | Chunk;

export interface ModelSchedulerOptions {
  /** Most sessions per decode step. */
  maxBatch?: number;
  /** Most prompt tokens per Model.prefill call. */
  prefillChunkTokens?: number;
  /** After each decode step: its batch size and native time. */
  onStep?: (size: number, ms: number) => void;
  /** After each prefill chunk: its tokens and native time. */
  onPrefill?: (tokens: number, ms: number) => void;
}

const EMPTY = new Float32Array(0);

export class ModelScheduler {
  private readonly batcher: DecodeBatcher<Work, Row>;
  readonly prefillChunkTokens: number;

  constructor(
    private readonly model: Model,
    opts: ModelSchedulerOptions = {},
  ) {
    const chunk = opts.prefillChunkTokens ?? PREFILL_CHUNK_TOKENS.default;
    if (!Number.isInteger(chunk) || chunk < PREFILL_CHUNK_TOKENS.min || chunk > PREFILL_CHUNK_TOKENS.max)
      throw new RangeError(`prefillChunkTokens: must be an integer in [${PREFILL_CHUNK_TOKENS.min}, ${PREFILL_CHUNK_TOKENS.max}], got ${chunk}`);
    this.prefillChunkTokens = chunk;
    this.batcher = new DecodeBatcher<Work, Row>({
      maxBatch: opts.maxBatch ?? 64,
      windowUs: 0,
      eager: true,
      alone: (w) => w.kind === "prefill" || !!w.retry,
      call: (work) => (work[0].kind === "prefill" ? this.prefillCall(work[0]) : this.decodeCall(work as Step[])),
      failed: (work, e) => this.isolate(work, e),
      observe: (work, b) => {
        const w = work[0];
        if (w.kind === "prefill") opts.onPrefill?.(w.tokens.length, b.ms);
        else opts.onStep?.(b.size, b.ms);
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
  step(session: number, token: number, position: number, greedy = false): Promise<StepResult> {
    return new Promise((resolve, reject) => {
      this.batcher.submit({
        kind: "decode",
        session,
        group: "",
        token,
        position,
        greedy,
        resolve: (r, b) => resolve({ ...r, batchSize: b.size, stepMs: b.ms }),
        reject,
      });
    });
  }

  /**
   * One prefill chunk (at most prefillChunkTokens tokens) of a session at `start`, its context
   * length. A chunk still queued when `signal` aborts is dropped (rejected with the abort reason)
   * and never runs.
   */
  prefill(session: number, tokens: Int32Array, start: number, signal?: AbortSignal): Promise<PrefillResult> {
    if (tokens.length === 0 || tokens.length > this.prefillChunkTokens)
      return Promise.reject(new RangeError(`a prefill chunk holds 1..${this.prefillChunkTokens} tokens, got ${tokens.length}`));
    return new Promise((resolve, reject) => {
      this.batcher.submit({
        kind: "prefill",
        session,
        group: "",
        tokens,
        start,
        abandoned: signal && (() => (signal.aborted ? (signal.reason ?? new ServiceError(status.CANCELLED, "call cancelled")) : undefined)),
        resolve: (r, b) => resolve({ logits: r.logits, ms: b.ms }),
        reject,
      });
    });
  }

  private async prefillCall(c: Chunk): Promise<Row[]> {
    return [{ logits: await this.model.prefill(c.session, c.tokens, c.start, false) }];
  }

  private async decodeCall(steps: Step[]): Promise<Row[]> {
    const args = [Int32Array.from(steps, (p) => p.session), Int32Array.from(steps, (p) => p.token), Int32Array.from(steps, (p) => p.position)] as const;
    if (steps.every((p) => p.greedy)) {
      const tokens = await this.model.decodeArgmax(...args);
      return steps.map((_, i) => ({ logits: EMPTY, token: tokens[i] }));
    }
    const logits = await this.model.decode(...args);
    const V = this.model.vocabSize;
    return steps.map((_, i) => ({ logits: logits.subarray(i * V, (i + 1) * V) }));
  }

  /**
   * One bad step fails the whole native call: the others run again, each alone, through the
   * queue (still one model call at a time), unaffected.
   */
  private isolate(work: Work[], e: unknown): void {
    if (work.length === 1) return work[0].reject(e);
    for (const p of work as Step[]) this.batcher.submit({ ...p, retry: true });
  }
}
