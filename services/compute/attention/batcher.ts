/**
 * Decode batching across Attention streams: the items of decode requests for the same layer
 * that arrive within a short window (FREEKV_DECODE_BATCH_WINDOW_US, 200 us by default) run as one
 * engine.decode call through the DecodeBatcher. A batch holds only sessions of one shape and
 * KV storage type (the engine's contract). A request resolves when all its items have run; the
 * first failing item fails it.
 *
 * Session locks. Each item takes its session's lock before it enters the DecodeBatcher's queue
 * and keeps it until the item settles (it ran, failed, or was dropped). A session whose lock is
 * held elsewhere for long (a prefill on another stream, an export or move, a CloseSession) so
 * delays only its own items: they wait on that lock in its FIFO order and join the next batch
 * once it is theirs, while the batches of the other sessions run; forming a batch never waits for
 * a lock (admit only checks the sessions). Consequences:
 * - a batch holds a session at most once, and a session's items run in the order they were
 *   submitted: the next item of a session waits for the lock until the one before it settled;
 * - no deadlock: the items of one request take their locks independently, and no item waits for a
 *   lock while it holds another; an item that holds its lock settles with the batch it joins,
 *   whatever the request's other items wait for (so two requests over the same sessions in
 *   opposite orders both complete, without ordering the locks);
 * - a cancelled call or an expired deadline ends the request at once: items still waiting for a
 *   lock give up their place (AsyncLock.acquire with a signal), items queued are dropped when the
 *   next batch is formed, and neither appends anything. The request rejects with the signal's
 *   reason. The first failing item of a request likewise ends the waits of the others.
 *
 * A failed engine.decode. What a throwing batched decode leaves in the engine:
 * - The binding checks every item (session open, no session twice, layer in range, q/k/v
 *   lengths) before it queues the native call, and throws synchronously on the first bad one
 *   (native/src/engine/AddonEngine.cpp:387-418, AddonEngine::Decode; the worker's failures reach
 *   JavaScript as an Error with the native message, AddonEngine.cpp:56-63): nothing ran.
 * - The backends then check every item again before they change anything, and name it in the
 *   message as "items[i]: ..." (capacity and reservation of the store, nulls, duplicates, and on
 *   CUDA the shapes): CpuEngine::Decode, native/src/engine/cpu/CpuEngine.cpp:364-378;
 *   CudaEngine::Decode and CheckBatch, native/src/engine/cuda/CudaDecode.cu:510-517 and 208-231.
 * - Past those checks the call is not atomic. The CPU engine waits for each item's background
 *   recall (rethrowing its failure, CpuEngine.cpp:380-381), appends every item's k/v in turn
 *   (CpuEngine.cpp:383: tokens, pages offloaded to the host store, manifest), then selects and
 *   attends (CpuEngine.cpp:384-500), where a throw leaves every item appended. The CUDA engine
 *   advances every item's layer tokens at the end of DecodeCore (CudaDecode.cu:492-503) and only
 *   then checks the copy of the outputs (CudaDecode.cu:554-558) and writes the manifests
 *   (CudaDecode.cu:562). Such a failure may thus have appended the token to any of the batch's
 *   sessions, and the caller cannot tell which: the engine reports no per-layer token count.
 * So: a failure of the first two kinds (nothing appended: a synchronous throw, or a rejection
 * whose message starts with "items[i]: ") runs the batch's items again, each in a call of its own
 * (the bad one then fails alone, with its own error). Any other failure (a failed recall rethrown
 * before the appends included: it cannot be told from the rest) rejects the items with the
 * engine's error and marks every session of the batch diverged (sessions/diverged.ts; reported to
 * the observer): its layer counts here may no longer agree with the engine's, and every later
 * call on it (decode, prefill, Generate, a move) fails with DATA_LOSS until it is closed. The
 * failed items of a session this call marked are answered once the observer saved the mark at
 * the kvstore (or SAVE_WAIT_MS passed): a client told of the failure can count on a compute that
 * re-attaches the session after this one died refusing it too. This
 * relies on the native checks above throwing before any change and naming the item as
 * "items[i]: "; a failure classified wrongly as before the append would append a token twice.
 */
import type { DecodeInput, Engine } from "../../../native/binding.js";
import { notFound, quoteId, resourceExhausted, type ServiceError } from "../../common/errors.js";
import { DecodeBatcher, type BatchItem } from "../decode-batcher.js";
import { divergedError, markDiverged } from "../sessions/diverged.js";
import type { ComputeSession } from "../sessions/session.js";
import type { DecodeItemOp } from "./validate.js";

/** One decode request of a stream: a layer's items, one per session. */
interface Request {
  outputs: Float32Array[];
  remaining: number;
  settled: boolean;
  /** Aborted when the caller's signal aborts or an item fails: ends the items' waits. */
  stop: AbortController;
  /** Removes the listener on the caller's signal. */
  detach(): void;
  resolve(out: Float32Array[]): void;
  reject(e: unknown): void;
}

interface Item extends BatchItem<Float32Array> {
  layer: number;
  op: DecodeItemOp;
  /** Run again, in a call of its own, after a batch failed before appending anything. */
  retry?: boolean;
}

export interface BatchObserver {
  /** One engine.decode call: how many sessions it held and how long it took. */
  batch(layer: number, size: number, seconds: number): void;
  /** After a session's layer got one more token. */
  appended(session: ComputeSession, layer: number): void;
  /**
   * After a failed call marked a session diverged (once per session): `error` is the DATA_LOSS
   * error its later calls get, `cause` the engine's failure. The session's failed item is answered
   * when the returned promise settles (SAVE_WAIT_MS at most). Never throws.
   */
  diverged?(session: ComputeSession, layer: number, error: ServiceError, cause: unknown): Promise<unknown> | void;
}

/** Items that may share one engine call: same layer, shapes and KV storage type. */
const groupKey = (layer: number, s: ComputeSession) => `${layer}/${s.geometry.queryHeads}/${s.geometry.kvHeads}/${s.geometry.headDim}/${s.geometry.kvDtype}`;

/** Why an item of a settled request no longer runs (its request already failed). */
const SETTLED = new Error("the request already failed");

/** A backend's message for an item its checks refused before the call changed anything. */
const REFUSED_ITEM = /^items\[\d+\]: /;

/** Errors of engine.decode calls that failed before anything was appended. */
const beforeAppend = new WeakSet<object>();

/** The longest a failed item of a session just marked diverged waits for its mark to be saved. */
export const SAVE_WAIT_MS = 5_000;

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
      call: (items) => this.call(items),
      failed: (items, e) => this.failed(items, e),
      // Items run again after a failed batch: each in a call of its own, between the other batches.
      alone: (it) => it.retry === true,
      observe: (items, b) => this.observer.batch(items[0].layer, b.size, b.ms / 1000),
    });
  }

  submit(layer: number, items: DecodeItemOp[], signal: AbortSignal): Promise<Float32Array[]> {
    return new Promise((resolve, reject) => {
      if (signal.aborted) return reject(signal.reason);
      if (items.length === 0) return resolve([]);
      const stop = new AbortController();
      const forward = () => stop.abort(signal.reason);
      signal.addEventListener("abort", forward, { once: true });
      const req: Request = {
        outputs: new Array<Float32Array>(items.length),
        remaining: items.length,
        settled: false,
        stop,
        detach: () => signal.removeEventListener("abort", forward),
        resolve,
        reject,
      };
      stop.signal.addEventListener("abort", () => settle(req, true, stop.signal.reason), { once: true });
      items.forEach((op, index) =>
        op.session.lock.acquire(stop.signal).then(
          (release) => this.batcher.submit(this.item(req, layer, op, index, release)),
          (e: unknown) => settle(req, true, e),
        ),
      );
    });
  }

  /** An item that holds its session's lock; settling it (once) releases the lock. */
  private item(req: Request, layer: number, op: DecodeItemOp, index: number, release: () => void): Item {
    const s = op.session;
    return {
      session: s.id,
      group: groupKey(layer, s),
      layer,
      op,
      abandoned: () => (req.stop.signal.aborted ? (req.stop.signal.reason ?? SETTLED) : undefined),
      resolve: (out) => {
        // The engine appended the token: counted before anything else can fail.
        s.layerTokens[layer]++;
        try {
          this.observer.appended(s, layer);
        } catch (e) {
          release();
          return settle(req, true, e);
        }
        release();
        req.outputs[index] = out;
        if (--req.remaining === 0) settle(req);
      },
      reject: (e) => {
        release();
        settle(req, true, e);
      },
    };
  }

  /** Keeps the items that may still run (their sessions' locks are theirs already: nothing waits here). */
  private async admit(items: Item[]): Promise<{ items: Item[]; release(): void }> {
    const live: Item[] = [];
    for (const it of items) {
      const { session: s } = it.op;
      const why = it.abandoned?.();
      if (why !== undefined) it.reject(why);
      else if (s.closed) it.reject(notFound(`session ${quoteId(s.id)} was closed`));
      else if (s.lost) it.reject(s.lost);
      else if (divergedError(s)) it.reject(divergedError(s));
      else if (s.layerTokens[it.layer] + 1 > s.maxContextTokens) {
        it.reject(resourceExhausted(`decode: layer ${it.layer} of session ${s.id} is full (max_context_tokens ${s.maxContextTokens})`));
      } else live.push(it);
    }
    return { items: live, release() {} };
  }

  /** engine.decode, its error marked when the call failed before anything was appended. */
  private call(items: Item[]): Promise<Float32Array[]> {
    const inputs: DecodeInput[] = items.map(({ op }) => ({ session: op.session.engineSession, q: op.q, k: op.k, v: op.v }));
    let pending: Promise<Float32Array[]>;
    try {
      pending = this.engine.decode(items[0].layer, inputs);
    } catch (e) {
      // The binding's checks, before the native call was queued.
      if (typeof e === "object" && e !== null) beforeAppend.add(e);
      return Promise.reject(e);
    }
    return pending.catch((e: unknown) => {
      if (e instanceof Error && REFUSED_ITEM.test(e.message)) beforeAppend.add(e);
      throw e;
    });
  }

  /** A failed call: nothing appended, the items run again one by one; else their sessions diverged. */
  private failed(items: Item[], e: unknown): void {
    if (typeof e === "object" && e !== null && beforeAppend.has(e)) {
      if (items.length === 1) items[0].reject(e);
      // Still holding their locks: no later item of these sessions can run first.
      else for (const it of items) this.batcher.submit({ ...it, retry: true });
      return;
    }
    for (const it of items) {
      const error = markDiverged(it.op.session, it.layer, e);
      if (!error) {
        it.reject(e);
        continue;
      }
      // Answered once the mark is saved (bounded): the item keeps its session's lock meanwhile.
      let saved: Promise<unknown> | void;
      try {
        saved = this.observer.diverged?.(it.op.session, it.layer, error, e);
      } catch {
        saved = undefined; // the observer never throws; an answer is never held up by it
      }
      let timer: NodeJS.Timeout | undefined;
      const bound = new Promise((r) => (timer = setTimeout(r, SAVE_WAIT_MS)));
      void Promise.race([Promise.resolve(saved).catch(() => undefined), bound]).then(() => {
        clearTimeout(timer);
        it.reject(e);
      });
    }
  }
}

/** Ends the request: with its outputs, or (`failed`) with `err`. Only the first call counts. */
function settle(r: Request, failed = false, err?: unknown): void {
  if (r.settled) return;
  r.settled = true;
  r.detach();
  if (failed) {
    // Items still waiting for their locks, or queued, give up.
    r.stop.abort(err ?? SETTLED);
    r.reject(err);
  } else r.resolve(r.outputs);
}
