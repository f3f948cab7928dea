/**
 * Admission: the request queue in front of the served model. A Generate request runs once it
 * holds a running slot (at most `maxRunning` at a time) and its memory (a fresh session's segments
 * at the kvstore); until then it waits here instead of being refused.
 *
 * - Order: FIFO within a tenant, round-robin between tenants (the tenant whose head was admitted
 *   goes to the back of the rotation), so one tenant's burst cannot hold the others back.
 * - Up to `maxAttempts` admission attempts at a time, never more than the free running slots. An
 *   attempt is a kvstore call and, on the CUDA engine, the pinning of the new session's host
 *   store (~0.3 s for a 32K-token 8B session), so one at a time made a burst of requests queue
 *   behind each other's set-up while the memory and the slots were there (a short request behind
 *   a long one waited for the long one's pinning). The kvstore counts each reservation before it
 *   answers, so concurrent attempts can never over-commit: of two that fit only alone, one comes
 *   back short of memory. An attempt that comes back short keeps its place and is tried again
 *   when memory may have come back: a running request finished (`release`), a session closed
 *   (`poke`), another attempt failed, or every `retryMs` (memory freed elsewhere). Requests that
 *   need no memory (a named session's next turn) pass it.
 * - Backfill with aging: while the oldest request short of memory has waited less than
 *   `backfillMs`, the requests behind it that need memory are still tried, each once per chance
 *   that memory came back, so a small request takes memory a large one cannot use yet instead of
 *   idling behind it. Past `backfillMs` only that oldest one may take memory (the others wait
 *   behind it), so a large request is never starved by a stream of small ones. backfillMs 0 is
 *   strict head-of-line order. (Measured with bench:serving on the CPU at 0.2 requests/s against
 *   a kvstore of about 2-3 of the largest requests: strict order made half the requests wait over
 *   3 s for memory a smaller one could have used.)
 * - Bounded: more than `maxWaiting` waiting requests, and the new one is refused with
 *   RESOURCE_EXHAUSTED. An attempt may also refuse a request for good (it can never fit): that
 *   request alone fails and the queue moves on. A request that needs memory may not get to an
 *   attempt while others are short of it, so its `fits` check (read-only: is it bigger than the
 *   whole capacity?) runs as soon as memory is short: one that can never fit is refused then, not
 *   at its deadline.
 * - A waiting request whose signal aborts (cancelled by the client, deadline passed) leaves at once
 *   with the abort's reason; no work is done for it.
 */
import { status } from "@grpc/grpc-js";
import { ServiceError, resourceExhausted } from "../../common/errors.js";

/** What an attempt returns when the memory is short now (the request keeps its place). */
export const SHORT_OF_MEMORY: unique symbol = Symbol("short of memory");

export interface AdmissionTimers {
  now(): number;
  set(fn: () => void, ms: number): unknown;
  clear(handle: unknown): void;
}

const realTimers: AdmissionTimers = {
  now: () => performance.now(),
  set: (fn, ms) => {
    const t = setTimeout(fn, ms);
    t.unref();
    return t;
  },
  clear: (h) => clearTimeout(h as NodeJS.Timeout),
};

export interface AdmissionOptions {
  /** Most requests waiting; one more is refused (RESOURCE_EXHAUSTED). */
  maxWaiting: number;
  /** Most requests running at once (0: no limit). */
  maxRunning: number;
  /** Most admission attempts in flight at once (default 4). */
  maxAttempts?: number;
  /** How often a request short of memory tries again when nothing here frees any. */
  retryMs?: number;
  /** How long requests needing memory may pass the oldest one short of it (0: never). */
  backfillMs?: number;
  timers?: AdmissionTimers;
}

export interface AdmissionRequest<T> {
  /** Fairness key ("" for requests without a tenant: one tenant of their own). */
  tenant: string;
  /** Aborting it takes a waiting request out of the queue. */
  signal?: AbortSignal;
  /** Whether the attempt takes memory (a fresh session); only those wait behind one short of it. */
  needsMemory: boolean;
  /** Takes what the request needs; SHORT_OF_MEMORY to wait; a throw refuses the request. */
  attempt(): Promise<T | typeof SHORT_OF_MEMORY>;
  /**
   * Takes nothing; throws when the request can never fit (it is refused with that error), resolves
   * true when it could fit, false when it could not tell (the capacity could not be read: the
   * request keeps waiting and is checked again the next time memory comes back short). Run when a
   * request that needs memory has to wait behind one short of it.
   */
  fits?(): Promise<boolean>;
}

export interface Admitted<T> {
  value: T;
  /** Time spent waiting, in ms (from enter to admission). */
  queuedMs: number;
  /** Gives the running slot back (once the request's memory is freed). Idempotent. */
  release(): void;
}

interface Entry {
  tenant: string;
  needsMemory: boolean;
  enteredAt: number;
  signal?: AbortSignal;
  attempt(): Promise<unknown>;
  fits?(): Promise<boolean>;
  /** Its `fits` check has been started (and did not come back undecided). */
  checked: boolean;
  /** When an attempt of it first came back short of memory. */
  shortAt?: number;
  /** An attempt came back short since memory last may have come back. */
  triedShort: boolean;
  /** Its `fits` check failed while it was being attempted: refused if that attempt comes back short. */
  refusal?: unknown;
  resolve(v: Admitted<unknown>): void;
  reject(e: unknown): void;
  /** Detaches the abort listener. */
  cleanup(): void;
}

export class AdmissionQueue {
  private readonly byTenant = new Map<string, Entry[]>();
  /** Tenants with waiting requests, in round-robin order. */
  private readonly rotation: string[] = [];
  private waitingCount = 0;
  private runningCount = 0;
  /** Entries whose attempt is in flight. */
  private readonly attempting = new Set<Entry>();
  private readonly maxAttempts: number;
  /** An attempt came back short of memory and none may have come back since. */
  private blocked = false;
  private retryTimer: unknown;
  private readonly timers: AdmissionTimers;
  private readonly retryMs: number;
  private readonly backfillMs: number;

  constructor(private readonly opts: AdmissionOptions) {
    if (!Number.isInteger(opts.maxWaiting) || opts.maxWaiting < 0) throw new RangeError(`maxWaiting: must be an integer >= 0, got ${opts.maxWaiting}`);
    if (!Number.isInteger(opts.maxRunning) || opts.maxRunning < 0) throw new RangeError(`maxRunning: must be an integer >= 0, got ${opts.maxRunning}`);
    this.timers = opts.timers ?? realTimers;
    this.retryMs = opts.retryMs ?? 250;
    this.backfillMs = opts.backfillMs ?? 2000;
    this.maxAttempts = opts.maxAttempts ?? 4;
    if (!Number.isInteger(this.maxAttempts) || this.maxAttempts < 1) throw new RangeError(`maxAttempts: must be an integer >= 1, got ${opts.maxAttempts}`);
    if (!(this.backfillMs >= 0)) throw new RangeError(`backfillMs: must be >= 0, got ${opts.backfillMs}`);
  }

  /** Requests waiting (an attempt in flight included). */
  get waiting(): number {
    return this.waitingCount;
  }

  /** Requests admitted and not yet released. */
  get running(): number {
    return this.runningCount;
  }

  /**
   * Runs `wait`, a request's wait before it enters (a named session's turn waiting for the turns
   * before it on that session), counted as a waiting request: refused as enter() refuses when the
   * queue is full, so that no wait of a request is unbounded.
   */
  async waitBefore<T>(wait: () => Promise<T>): Promise<T> {
    if (this.waitingCount >= this.opts.maxWaiting) {
      throw resourceExhausted(`the request queue is full: ${this.waitingCount} requests wait (FREEKV_QUEUE_MAX_REQUESTS ${this.opts.maxWaiting})`);
    }
    this.waitingCount++;
    try {
      return await wait();
    } finally {
      this.waitingCount--;
    }
  }

  /** Waits for admission; rejects when the queue is full, the signal aborts or the attempt refuses the request. */
  enter<T>(r: AdmissionRequest<T>): Promise<Admitted<T>> {
    if (r.signal?.aborted) return Promise.reject(r.signal.reason ?? new ServiceError(status.CANCELLED, "call cancelled"));
    if (this.waitingCount >= this.opts.maxWaiting && !(this.waitingCount === 0 && this.hasSlot())) {
      return Promise.reject(resourceExhausted(`the request queue is full: ${this.waitingCount} requests wait (FREEKV_QUEUE_MAX_REQUESTS ${this.opts.maxWaiting})`));
    }
    return new Promise<Admitted<T>>((resolve, reject) => {
      const onAbort = () => {
        if (this.attempting.has(e)) return; // its attempt decides; the caller sees the abort after
        this.remove(e);
        reject(r.signal!.reason ?? new ServiceError(status.CANCELLED, "call cancelled"));
        this.pump();
      };
      const e: Entry = {
        tenant: r.tenant,
        needsMemory: r.needsMemory,
        enteredAt: this.timers.now(),
        signal: r.signal,
        attempt: r.attempt,
        fits: r.fits,
        checked: false,
        triedShort: false,
        resolve: resolve as (v: Admitted<unknown>) => void,
        reject,
        cleanup: () => r.signal?.removeEventListener("abort", onAbort),
      };
      r.signal?.addEventListener("abort", onAbort, { once: true });
      let q = this.byTenant.get(r.tenant);
      if (!q) {
        q = [];
        this.byTenant.set(r.tenant, q);
        this.rotation.push(r.tenant);
      }
      q.push(e);
      this.waitingCount++;
      this.pump();
      this.checkBlocked();
    });
  }

  /** Memory may have come back (a session was closed): requests short of it try again. */
  poke(): void {
    if (!this.blocked) return;
    this.blocked = false;
    for (const q of this.byTenant.values()) for (const e of q) e.triedShort = false;
    if (this.retryTimer !== undefined) this.timers.clear(this.retryTimer);
    this.retryTimer = undefined;
    this.pump();
  }

  /**
   * While a request is short of memory, the others that need memory may not get to an attempt
   * (past the backfill window, or short themselves): each is checked once (concurrently, taking
   * nothing) for whether it could ever fit, and one that cannot leaves now with the check's error.
   */
  private checkBlocked(): void {
    if (!this.blocked) return;
    for (const q of this.byTenant.values()) {
      for (const e of q) {
        if (this.attempting.has(e) || !e.needsMemory || !e.fits || e.checked) continue;
        e.checked = true;
        let check: Promise<boolean>;
        try {
          check = e.fits();
        } catch (err) {
          check = Promise.reject(err);
        }
        check.then(
          (decided) => {
            // Undecided (the capacity could not be read): it keeps its place and is checked again.
            if (!decided) e.checked = false;
          },
          (err: unknown) => {
            // Being attempted: refused if that attempt comes back short. Gone (admitted or
            // aborted meanwhile): nothing to do. Still waiting: refused now.
            if (this.attempting.has(e)) {
              e.refusal = err;
              return;
            }
            if (!this.byTenant.get(e.tenant)?.includes(e)) return;
            this.remove(e);
            e.reject(err);
            this.pump();
          },
        );
      }
    }
  }

  /** The waiting request that first came back short of memory, the longest ago. */
  private oldestShort(): Entry | undefined {
    let oldest: Entry | undefined;
    for (const q of this.byTenant.values()) for (const e of q) if (e.shortAt !== undefined && (!oldest || e.shortAt < oldest.shortAt!)) oldest = e;
    return oldest;
  }

  /** A running slot is free for one more attempt (those in flight hold theirs). */
  private hasSlot(): boolean {
    return this.opts.maxRunning === 0 || this.runningCount + this.attempting.size < this.opts.maxRunning;
  }

  /**
   * The next request to try: in rotation order, each tenant's first request in arrival order that
   * may be tried. A request that needs no memory always may; one that needs memory may unless its
   * attempt came back short since memory last may have come back, or the backfill window of the
   * oldest request short of memory is over and it is not that one.
   */
  private next(): Entry | undefined {
    if (!this.hasSlot()) return undefined;
    const oldest = this.oldestShort();
    const open = oldest === undefined || this.timers.now() - oldest.shortAt! < this.backfillMs;
    for (const t of this.rotation) {
      for (const e of this.byTenant.get(t)!) {
        if (this.attempting.has(e)) continue;
        if (!e.needsMemory) return e;
        if (!e.triedShort && (open || e === oldest)) return e;
      }
    }
    return undefined;
  }

  /** Takes e out of the queue (`admitted`: it took its memory, none came back). */
  private remove(e: Entry, admitted = false): void {
    const q = this.byTenant.get(e.tenant);
    const i = q ? q.indexOf(e) : -1;
    if (i < 0) return;
    q!.splice(i, 1);
    this.waitingCount--;
    e.cleanup();
    if (q!.length === 0) {
      this.byTenant.delete(e.tenant);
      this.rotation.splice(this.rotation.indexOf(e.tenant), 1);
    }
    // Gone while short of memory: the memory it waited for may go to the others.
    if (!admitted && e.shortAt !== undefined) {
      this.blocked = true;
      this.poke();
    }
  }

  /** Starts attempts while there are free attempt and running slots and requests that may be tried. */
  private pump(): void {
    while (this.attempting.size < this.maxAttempts) {
      const e = this.next();
      if (!e) return;
      this.start(e);
    }
  }

  private start(e: Entry): void {
    this.attempting.add(e);
    let outcome: Promise<unknown>;
    try {
      outcome = e.attempt();
    } catch (err) {
      outcome = Promise.reject(err);
    }
    outcome.then(
      (v) => {
        this.attempting.delete(e);
        if (v === SHORT_OF_MEMORY && e.signal?.aborted) {
          // Aborted during its attempt: it leaves now (an admitted one is the caller's to undo).
          this.remove(e);
          e.reject(e.signal.reason ?? new ServiceError(status.CANCELLED, "call cancelled"));
        } else if (v === SHORT_OF_MEMORY && e.refusal !== undefined) {
          this.remove(e);
          e.reject(e.refusal);
        } else if (v === SHORT_OF_MEMORY) {
          e.shortAt ??= this.timers.now();
          e.triedShort = true;
          // A request admitted as needing no memory that came back short (its session grew while
          // it waited) needs memory now: it waits for memory to come back like the others, not
          // tried again at once in a loop.
          e.needsMemory = true;
          this.blocked = true;
          this.checkBlocked();
          this.retryTimer ??= this.timers.set(() => {
            this.retryTimer = undefined;
            this.poke();
          }, this.retryMs);
        } else {
          this.admit(e, v);
        }
        this.pump();
      },
      (err: unknown) => {
        this.attempting.delete(e);
        this.remove(e);
        e.reject(err);
        // What a failed attempt held is back (with concurrent attempts, another may have come
        // back short because of it).
        if (this.blocked) this.poke();
        else this.pump();
      },
    );
  }

  private admit(e: Entry, value: unknown): void {
    // The tenant goes to the back of the rotation (if it has more waiting).
    this.remove(e, true);
    const q = this.byTenant.get(e.tenant);
    if (q) {
      this.rotation.splice(this.rotation.indexOf(e.tenant), 1);
      this.rotation.push(e.tenant);
    }
    this.runningCount++;
    let released = false;
    e.resolve({
      value,
      queuedMs: this.timers.now() - e.enteredAt,
      release: () => {
        if (released) return;
        released = true;
        this.runningCount--;
        // A finished request's memory is freed before its slot is given back.
        if (this.blocked) this.poke();
        else this.pump();
      },
    });
  }
}
