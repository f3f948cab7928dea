/**
 * Admission: the request queue in front of the served model. A Generate request runs once it
 * holds a running slot (at most `maxRunning` at a time) and its memory (a fresh session's segments
 * at the kvstore); until then it waits here instead of being refused.
 *
 * - Order: FIFO within a tenant, round-robin between tenants (the tenant whose head was admitted
 *   goes to the back of the rotation), so one tenant's burst cannot hold the others back.
 * - One admission attempt at a time. An attempt that comes back short of memory (the kvstore
 *   refused a session for capacity) keeps its place; requests that need memory wait behind it
 *   (they would take what it waits for), requests that need none (a named session's next turn)
 *   may pass it. It is tried again when memory may have come back: a running request finished
 *   (`release`), a session closed (`poke`), or every `retryMs` (memory freed elsewhere).
 * - Bounded: more than `maxWaiting` waiting requests, and the new one is refused with
 *   RESOURCE_EXHAUSTED. An attempt may also refuse a request for good (it can never fit): that
 *   request alone fails and the queue moves on. A request that needs memory and must wait behind
 *   one short of it is not attempted until that one is admitted, so its `fits` check (read-only:
 *   is it bigger than the whole capacity?) runs as soon as it has to wait: one that can never fit
 *   is refused then, not at its deadline.
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
  /** How often a request short of memory tries again when nothing here frees any. */
  retryMs?: number;
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
   * Takes nothing; throws when the request can never fit (it is refused with that error). Run
   * once, when a request that needs memory has to wait behind one short of it.
   */
  fits?(): Promise<void>;
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
  fits?(): Promise<void>;
  /** Its `fits` check has been started. */
  checked: boolean;
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
  private attempting: Entry | undefined;
  /** The request that came back short of memory, until memory may have come back. */
  private short: Entry | undefined;
  private retryTimer: unknown;
  private readonly timers: AdmissionTimers;
  private readonly retryMs: number;

  constructor(private readonly opts: AdmissionOptions) {
    if (!Number.isInteger(opts.maxWaiting) || opts.maxWaiting < 0) throw new RangeError(`maxWaiting: must be an integer >= 0, got ${opts.maxWaiting}`);
    if (!Number.isInteger(opts.maxRunning) || opts.maxRunning < 0) throw new RangeError(`maxRunning: must be an integer >= 0, got ${opts.maxRunning}`);
    this.timers = opts.timers ?? realTimers;
    this.retryMs = opts.retryMs ?? 250;
  }

  /** Requests waiting (an attempt in flight included). */
  get waiting(): number {
    return this.waitingCount;
  }

  /** Requests admitted and not yet released. */
  get running(): number {
    return this.runningCount;
  }

  /** Waits for admission; rejects when the queue is full, the signal aborts or the attempt refuses the request. */
  enter<T>(r: AdmissionRequest<T>): Promise<Admitted<T>> {
    if (r.signal?.aborted) return Promise.reject(r.signal.reason ?? new ServiceError(status.CANCELLED, "call cancelled"));
    if (this.waitingCount >= this.opts.maxWaiting && !(this.waitingCount === 0 && this.hasSlot())) {
      return Promise.reject(resourceExhausted(`the request queue is full: ${this.waitingCount} requests wait (FREEKV_QUEUE_MAX_REQUESTS ${this.opts.maxWaiting})`));
    }
    return new Promise<Admitted<T>>((resolve, reject) => {
      const onAbort = () => {
        if (this.attempting === e) return; // its attempt decides; the caller sees the abort after
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

  /** Memory may have come back (a session was closed): a request short of it tries again. */
  poke(): void {
    if (!this.short) return;
    this.short = undefined;
    if (this.retryTimer !== undefined) this.timers.clear(this.retryTimer);
    this.retryTimer = undefined;
    this.pump();
  }

  /**
   * While a request is short of memory, the others that need memory are not attempted: each is
   * checked once (concurrently, taking nothing) for whether it could ever fit, and one that cannot
   * leaves now with the check's error.
   */
  private checkBlocked(): void {
    if (!this.short) return;
    for (const q of this.byTenant.values()) {
      for (const e of q) {
        if (e === this.short || e === this.attempting || !e.needsMemory || !e.fits || e.checked) continue;
        e.checked = true;
        let check: Promise<void>;
        try {
          check = e.fits();
        } catch (err) {
          check = Promise.reject(err);
        }
        check.then(
          () => undefined,
          (err: unknown) => {
            // Still waiting (not admitted, attempted or aborted meanwhile): refused now.
            if (this.attempting === e || !this.byTenant.get(e.tenant)?.includes(e)) return;
            this.remove(e);
            e.reject(err);
            this.pump();
          },
        );
      }
    }
  }

  private hasSlot(): boolean {
    return this.opts.maxRunning === 0 || this.runningCount < this.opts.maxRunning;
  }

  /** The next request to try: the first eligible tenant head in rotation order. */
  private next(): Entry | undefined {
    if (!this.hasSlot()) return undefined;
    for (const t of this.rotation) {
      const head = this.byTenant.get(t)![0];
      if (head.needsMemory && this.short) continue;
      return head;
    }
    return undefined;
  }

  private remove(e: Entry): void {
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
    if (this.short === e) this.poke();
  }

  private pump(): void {
    if (this.attempting) return;
    const e = this.next();
    if (!e) return;
    this.attempting = e;
    let outcome: Promise<unknown>;
    try {
      outcome = e.attempt();
    } catch (err) {
      outcome = Promise.reject(err);
    }
    outcome.then(
      (v) => {
        this.attempting = undefined;
        if (v === SHORT_OF_MEMORY && e.signal?.aborted) {
          // Aborted during its attempt: it leaves now (an admitted one is the caller's to undo).
          this.remove(e);
          e.reject(e.signal.reason ?? new ServiceError(status.CANCELLED, "call cancelled"));
        } else if (v === SHORT_OF_MEMORY) {
          this.short = e;
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
        this.attempting = undefined;
        this.remove(e);
        e.reject(err);
        this.pump();
      },
    );
  }

  private admit(e: Entry, value: unknown): void {
    // The tenant goes to the back of the rotation (if it has more waiting).
    this.remove(e);
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
        if (this.short) this.poke();
        else this.pump();
      },
    });
  }
}
