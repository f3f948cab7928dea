/**
 * Continuous batching of Generate's decode steps. Each generating request asks for one step at
 * a time (session, token, position); the DecodeBatcher joins the steps of concurrent requests
 * into one Model.decode call over all layers, so they share steps without waiting for each other
 * to finish.
 */
import type { Model } from "../../../native/binding.js";
import { DecodeBatcher, type BatchItem } from "../decode-batcher.js";

export interface StepResult {
  /** The row's logits [vocab]; empty when the batch was picked greedily on the native side. */
  logits: Float32Array;
  /** The row's argmax, when every step of the batch asked for greedy decoding (decodeArgmax). */
  token?: number;
  /** Sessions in the batched call that produced it. */
  batchSize: number;
  stepMs: number;
}

type Row = Pick<StepResult, "logits" | "token">;

interface Step extends BatchItem<Row> {
  session: number;
  token: number;
  position: number;
  greedy: boolean;
}

const EMPTY = new Float32Array(0);

export class DecodeScheduler {
  private readonly batcher: DecodeBatcher<Step, Row>;

  constructor(
    private readonly model: Model,
    maxBatch = 64,
    onBatch?: (size: number, ms: number) => void,
  ) {
    this.batcher = new DecodeBatcher<Step, Row>({
      maxBatch,
      windowUs: 0,
      eager: true,
      call: (steps) => this.call(steps),
      failed: (steps, e) => this.isolate(steps, e),
      observe: onBatch && ((_steps, b) => onBatch(b.size, b.ms)),
    });
  }

  /** Batches run so far. */
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

  private async call(steps: Step[]): Promise<Row[]> {
    const args = [Int32Array.from(steps, (p) => p.session), Int32Array.from(steps, (p) => p.token), Int32Array.from(steps, (p) => p.position)] as const;
    if (steps.every((p) => p.greedy)) {
      const tokens = await this.model.decodeArgmax(...args);
      return steps.map((_, i) => ({ logits: EMPTY, token: tokens[i] }));
    }
    const logits = await this.model.decode(...args);
    const V = this.model.vocabSize;
    return steps.map((_, i) => ({ logits: logits.subarray(i * V, (i + 1) * V) }));
  }

  /** One bad step fails the whole native call: the others run again alone, unaffected. */
  private isolate(steps: Step[], e: unknown): void {
    if (steps.length === 1) return steps[0].reject(e);
    for (const p of steps) {
      const t0 = performance.now();
      this.model.decode(Int32Array.of(p.session), Int32Array.of(p.token), Int32Array.of(p.position)).then(
        (logits) => p.resolve({ logits }, { size: 1, ms: performance.now() - t0 }),
        (err: Error) => p.reject(err),
      );
    }
  }
}
