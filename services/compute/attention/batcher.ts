/**
 * Decode batching across Attention streams: the items of decode requests for the same layer
 * that arrive within a short window (FREEKV_DECODE_BATCH_WINDOW_US, 200 us by default) run as one
 * engine.decode call through the DecodeBatcher. A batch holds only sessions of one shape and
 * KV storage type (the engine's contract). A request resolves when all its items have run; the
 * first failing item fails it.
 */
import type { Engine } from "../../../native/binding.js";
import { notFound, quoteId, resourceExhausted } from "../../common/errors.js";
import { DecodeBatcher, type BatchItem } from "../decode-batcher.js";
import { acquireAll } from "../sessions/lock.js";
import type { ComputeSession } from "../sessions/session.js";
import type { DecodeItemOp } from "./validate.js";

/** One decode request of a stream: a layer's items, one per session. */
interface Request {
  outputs: Float32Array[];
  remaining: number;
  signal: AbortSignal;
  settled: boolean;
  resolve(out: Float32Array[]): void;
  reject(e: unknown): void;
}

interface Item extends BatchItem<Float32Array> {
  layer: number;
  op: DecodeItemOp;
}

export interface BatchObserver {
  /** One engine.decode call: how many sessions it held and how long it took. */
  batch(layer: number, size: number, seconds: number): void;
  /** After a session's layer got one more token. */
  appended(session: ComputeSession, layer: number): void;
}

/** Items that may share one engine call: same layer, shapes and KV storage type. */
const groupKey = (layer: number, s: ComputeSession) => `${layer}/${s.geometry.queryHeads}/${s.geometry.kvHeads}/${s.geometry.headDim}/${s.geometry.kvDtype}`;

/** Why an item of a settled request no longer runs (its request already failed). */
const SETTLED = new Error("the request already failed");

export class AttentionBatcher {
  private readonly batcher: DecodeBatcher<Item, Float32Array>;

  constructor(
    private readonly engine: Engine,
    windowUs: number,
    private readonly observer: BatchObserver,
  ) {
    this.batcher = new DecodeBatcher<Item, Float32Array>({
      maxBatch: Infinity,
      windowUs,
      admit: (items) => this.admit(items),
      call: (items) =>
        this.engine.decode(
          items[0].layer,
          items.map(({ op }) => ({ session: op.session.engineSession, q: op.q, k: op.k, v: op.v })),
        ),
      observe: (items, b) => this.observer.batch(items[0].layer, b.size, b.ms / 1000),
    });
  }

  submit(layer: number, items: DecodeItemOp[], signal: AbortSignal): Promise<Float32Array[]> {
    return new Promise((resolve, reject) => {
      const req: Request = { outputs: new Array<Float32Array>(items.length), remaining: items.length, signal, settled: false, resolve, reject };
      items.forEach((op, index) =>
        this.batcher.submit({
          session: op.session.id,
          group: groupKey(layer, op.session),
          layer,
          op,
          abandoned: () => (req.settled ? SETTLED : req.signal.aborted ? req.signal.reason : undefined),
          resolve: (out) => {
            op.session.layerTokens[layer]++;
            this.observer.appended(op.session, layer);
            req.outputs[index] = out;
            if (--req.remaining === 0) settle(req);
          },
          reject: (e) => settle(req, e),
        }),
      );
    });
  }

  /** Locks the batch's sessions and keeps the items that may still run. */
  private async admit(items: Item[]): Promise<{ items: Item[]; release(): void }> {
    const release = await acquireAll(items.map(({ op }) => ({ key: op.session.id, lock: op.session.lock })));
    const live: Item[] = [];
    for (const it of items) {
      const { session: s } = it.op;
      const why = it.abandoned?.();
      if (why !== undefined) it.reject(why);
      else if (s.closed) it.reject(notFound(`session ${quoteId(s.id)} was closed`));
      else if (s.lost) it.reject(s.lost);
      else if (s.layerTokens[it.layer] + 1 > s.maxContextTokens) {
        it.reject(resourceExhausted(`decode: layer ${it.layer} of session ${s.id} is full (max_context_tokens ${s.maxContextTokens})`));
      } else live.push(it);
    }
    return { items: live, release };
  }
}

function settle(r: Request, err?: unknown): void {
  if (r.settled) return;
  r.settled = true;
  if (err !== undefined) r.reject(err);
  else r.resolve(r.outputs);
}
