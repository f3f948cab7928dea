/**
 * The decode batcher: the one queue behind both decode paths (Generate's whole-model steps and
 * the Attention stream's per-layer steps). Items that wait when the native side is free run as
 * one native call; while a call runs, new items (and the next steps of the ones in it) queue for
 * the next call, so batches grow by themselves under load. A batch holds a session at most once
 * and only items of one group (same layer and shapes, say); the rest go into a later batch, in
 * arrival order. Native calls run one at a time. What differs between the two paths (the native
 * call, the group, what a failed call does) is passed in as a BatchPolicy.
 *
 * Items a policy marks `alone` (Generate's prefill chunks) run as a batch of their own and yield
 * to the rest: after one of them, the next batch is of other items when any wait. So a long
 * prompt, cut into chunks, runs at most one chunk between two decode batches, and sessions that
 * are decoding keep their pace while it is read (chunked prefill).
 */
import { status } from "@grpc/grpc-js";
import { ServiceError } from "../common/errors.js";

/** How long the batch took and how many items it held, as each of its items learns it. */
export interface BatchInfo {
  size: number;
  ms: number;
  /** Time from the end of the previous call to the start of this one (ms; undefined for the first): what the native side sat idle between them, when work was waiting. */
  gapMs?: number;
}

export interface BatchItem<R> {
  /** A batch holds each session at most once. */
  readonly session: string | number;
  /** Only items of one group share a batch. */
  readonly group: string;
  /** The reason the item no longer waits (its call was cancelled), or undefined while it does. */
  abandoned?(): unknown;
  resolve(result: R, batch: BatchInfo): void;
  reject(e: unknown): void;
}

export interface BatchPolicy<I extends BatchItem<R>, R> {
  /** The one native call of a batch: one result per item, in order. */
  call(items: I[]): Promise<R[]>;
  /** Most items per batch. */
  maxBatch: number;
  /**
   * How long the first item of an idle batcher waits for others to join (microseconds); 0: one
   * setImmediate (every request whose previous step just resolved enqueues its next one).
   */
  windowUs: number;
  /**
   * Start the next batch at once when the last session of the previous one asks for its next
   * step, instead of after the window: whatever those callers still do for the step just
   * finished (writing their results out) then overlaps the next native call.
   */
  eager?: boolean;
  /**
   * Before the call: e.g. reject the items that may no longer run (a closed session). Returns the
   * items to call with and what to do once they are settled. Batches run one at a time, so it must
   * not wait for anything that may take long, such as a session lock held elsewhere: that would
   * hold up the other items of the batch and every batch behind it. A policy that locks sessions
   * takes each item's lock before it submits the item (AttentionBatcher).
   */
  admit?(items: I[]): Promise<{ items: I[]; release(): void }>;
  /**
   * A call that threw; by default every item of the batch fails with its error. It may submit
   * items again instead (e.g. marked `alone`, to run one by one).
   */
  failed?(items: I[], e: unknown): void;
  /** After every successful call (metrics). */
  observe?(items: I[], batch: BatchInfo): void;
  /** Items that run alone and never twice in a row while other items wait (prefill chunks). */
  alone?(item: I): boolean;
  /** Among waiting `alone` items the lowest rank runs first (ties: queue order); unset: queue order. */
  rank?(item: I): number;
  /**
   * Items held back for now (they stay queued, in order): asked each time a batch is chosen.
   * While only held items wait, the choice is made again after holdRecheckMs (default 2), so a
   * hold that ends with time alone (nobody else asks to run) is noticed.
   */
  hold?(item: I): boolean;
  holdRecheckMs?: number;
}

export class DecodeBatcher<I extends BatchItem<R>, R> {
  private queue: I[] = [];
  private running = false;
  /** When the latest call returned (performance.now()). */
  private lastCallEnd: number | undefined;
  private scheduled = false;
  /** Sessions of the last batch that have not submitted their next item yet (eager policy). */
  private awaited = new Set<string | number>();
  /** Whether the last batch was an `alone` item. */
  private lastAlone = false;
  /** The pending re-check while only held items wait. */
  private recheck: ReturnType<typeof setTimeout> | undefined;
  /** Batches run so far. */
  batches = 0;

  constructor(private readonly policy: BatchPolicy<I, R>) {}

  /** Whether an item that satisfies `pred` waits in the queue. */
  hasWaiting(pred: (item: I) => boolean): boolean {
    return this.queue.some(pred);
  }

  submit(item: I): void {
    this.queue.push(item);
    if (this.policy.eager && this.awaited.delete(item.session) && this.awaited.size === 0 && !this.running) void this.runBatch();
    else this.schedule(this.policy.windowUs);
  }

  private schedule(windowUs: number): void {
    if (this.running || this.scheduled || this.queue.length === 0) return;
    this.scheduled = true;
    const start = process.hrtime.bigint();
    const windowNs = BigInt(windowUs) * 1000n;
    // setTimeout cannot wait 200 us; yield to I/O with setImmediate until the window is over.
    const tick = () => {
      if (process.hrtime.bigint() - start >= windowNs) {
        this.scheduled = false;
        void this.runBatch();
      } else setImmediate(tick);
    };
    setImmediate(tick);
  }

  /**
   * The next batch: the first waiting item's group (after an `alone` item, the first other
   * item's group when there is one), each session once, at most maxBatch; an `alone` item alone
   * (the lowest-ranked one waiting, when the policy ranks them).
   */
  private take(): I[] {
    const waiting: I[] = [];
    for (const it of this.queue) {
      const why = it.abandoned?.();
      if (why === undefined) waiting.push(it);
      else it.reject(why ?? new ServiceError(status.CANCELLED, "call cancelled"));
    }
    const alone = this.policy.alone;
    const hold = this.policy.hold;
    const held = hold ? new Set(waiting.filter((it) => hold(it))) : undefined;
    const eligible = held?.size ? waiting.filter((it) => !held.has(it)) : waiting;
    if (held?.size && eligible.length === 0) {
      this.queue = waiting;
      if (!this.recheck)
        this.recheck = setTimeout(() => {
          this.recheck = undefined;
          this.schedule(0);
        }, this.policy.holdRecheckMs ?? 2);
      return [];
    }
    let lead = eligible[0];
    if (alone && this.lastAlone) lead = eligible.find((it) => !alone(it)) ?? lead;
    const batch: I[] = [];
    const rest: I[] = [];
    if (lead && alone?.(lead)) {
      const rank = this.policy.rank;
      if (rank) for (const it of eligible) if (alone(it) && rank(it) < rank(lead)) lead = it;
      this.queue = waiting.filter((it) => it !== lead);
      this.lastAlone = true;
      return [lead];
    }
    this.lastAlone = false;
    const seen = new Set<string | number>();
    const group = lead?.group;
    for (const it of waiting) {
      if (batch.length < this.policy.maxBatch && it.group === group && !seen.has(it.session) && !alone?.(it) && !held?.has(it)) {
        seen.add(it.session);
        batch.push(it);
      } else rest.push(it);
    }
    this.queue = rest;
    return batch;
  }

  private async runBatch(): Promise<void> {
    if (this.running || this.queue.length === 0) return;
    this.running = true;
    let taken: I[] = [];
    try {
      taken = this.take();
      if (taken.length) await this.run(taken);
    } catch (e) {
      // A throw outside the call itself (admission, observation): every item of the batch gets
      // it (settled ones ignore it), instead of waiting forever behind an unhandled rejection.
      for (const it of taken) it.reject(e);
    } finally {
      this.running = false;
    }
    // The next batch after setImmediate, so callers whose step just resolved can join it (when
    // nothing was taken, only held items wait: the re-check timer or the next submit comes back).
    if (taken.length) this.schedule(0);
  }

  private async run(taken: I[]): Promise<void> {
    const admitted = this.policy.admit ? await this.policy.admit(taken) : { items: taken, release() {} };
    const items = admitted.items;
    try {
      if (!items.length) return;
      const t0 = performance.now();
      const gapMs = this.lastCallEnd === undefined ? undefined : t0 - this.lastCallEnd;
      let results: R[];
      try {
        results = await this.policy.call(items);
      } catch (e) {
        this.lastCallEnd = performance.now();
        this.awaited.clear();
        if (this.policy.failed) this.policy.failed(items, e);
        else for (const it of items) it.reject(e);
        return;
      }
      this.lastCallEnd = performance.now();
      const batch: BatchInfo = { size: items.length, ms: this.lastCallEnd - t0, gapMs };
      this.batches++;
      this.policy.observe?.(items, batch);
      if (this.policy.eager) this.awaited = new Set(items.map((it) => it.session));
      items.forEach((it, i) => it.resolve(results[i], batch));
    } finally {
      admitted.release();
    }
  }
}
