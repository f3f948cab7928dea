/**
 * Continuous batching of decode steps. Each generating request asks for one step at a time
 * (session, token, position); steps that are waiting when the model is free run together as one
 * Model.decode call over all layers. While a batch runs, new requests (and the next steps of the
 * ones in it) queue for the next batch, so concurrent requests share steps without waiting for
 * each other to finish.
 */
import type { Model } from "../../../native/binding.js";

export interface StepResult {
  /** The row's logits [vocab]; empty when the batch was picked greedily on the native side. */
  logits: Float32Array;
  /** The row's argmax, when every step of the batch asked for greedy decoding (decodeArgmax). */
  token?: number;
  /** Sessions in the batched call that produced it. */
  batchSize: number;
  stepMs: number;
}

interface Pending {
  session: number;
  token: number;
  position: number;
  greedy: boolean;
  resolve: (r: StepResult) => void;
  reject: (e: Error) => void;
}

const EMPTY = new Float32Array(0);

export class DecodeScheduler {
  private queue: Pending[] = [];
  private running = false;
  private scheduled = false;
  /**
   * Sessions of the last batch that have not asked for their next step yet. When the last of them
   * does, the next batch starts at once instead of after setImmediate: whatever those requests
   * still do for the step just finished (writing their chunk to the client) then overlaps the
   * next native call instead of delaying it.
   */
  private awaited = new Set<number>();
  /** Batches run and the largest batch so far (exposed in metrics and tests). */
  batches = 0;
  maxBatchSeen = 0;

  constructor(
    private readonly model: Model,
    private readonly maxBatch = 64,
    private readonly onBatch?: (size: number, ms: number) => void,
  ) {}

  get queued(): number {
    return this.queue.length;
  }

  /**
   * One decode step of a session. `greedy`: the caller only needs the argmax; when every step of
   * a batch says so, the batch runs through Model.decodeArgmax (picked where the logits are, the
   * GPU for the GPU runner) and only token ids come back.
   */
  step(session: number, token: number, position: number, greedy = false): Promise<StepResult> {
    return new Promise((resolve, reject) => {
      this.queue.push({ session, token, position, greedy, resolve, reject });
      if (this.awaited.delete(session) && this.awaited.size === 0 && !this.running) void this.runBatch();
      else this.kick();
    });
  }

  private kick(): void {
    if (this.running || this.scheduled || this.queue.length === 0) return;
    // setImmediate lets every request whose previous step just resolved enqueue its next one.
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      void this.runBatch();
    });
  }

  private async runBatch(): Promise<void> {
    if (this.running || this.queue.length === 0) return;
    this.running = true;
    const batch: Pending[] = [];
    const rest: Pending[] = [];
    const seen = new Set<number>();
    for (const p of this.queue) {
      if (batch.length < this.maxBatch && !seen.has(p.session)) {
        seen.add(p.session);
        batch.push(p);
      } else {
        rest.push(p);
      }
    }
    this.queue = rest;
    const t0 = performance.now();
    try {
      const args = [
        Int32Array.from(batch.map((p) => p.session)),
        Int32Array.from(batch.map((p) => p.token)),
        Int32Array.from(batch.map((p) => p.position)),
      ] as const;
      const greedy = batch.every((p) => p.greedy);
      const out = greedy ? await this.model.decodeArgmax(...args) : await this.model.decode(...args);
      const stepMs = performance.now() - t0;
      const V = this.model.vocabSize;
      this.batches++;
      this.maxBatchSeen = Math.max(this.maxBatchSeen, batch.length);
      this.onBatch?.(batch.length, stepMs);
      this.awaited = new Set(batch.map((p) => p.session));
      if (greedy) batch.forEach((p, i) => p.resolve({ logits: EMPTY, token: out[i], batchSize: batch.length, stepMs }));
      else batch.forEach((p, i) => p.resolve({ logits: (out as Float32Array).subarray(i * V, (i + 1) * V), batchSize: batch.length, stepMs }));
    } catch (e) {
      this.awaited.clear();
      // One bad item fails the whole native call: retry the others alone so they are unaffected.
      if (batch.length > 1) {
        this.running = false;
        for (const p of batch) {
          this.model.decode(Int32Array.of(p.session), Int32Array.of(p.token), Int32Array.of(p.position)).then(
            (l) => p.resolve({ logits: l, batchSize: 1, stepMs: performance.now() - t0 }),
            (err: Error) => p.reject(err),
          );
        }
        this.kick();
        return;
      }
      batch[0].reject(e as Error);
    } finally {
      this.running = false;
    }
    this.kick();
  }
}
