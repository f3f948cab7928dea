/**
 * AdmissionQueue with a fake clock and a fake memory pool: round-robin between tenants against a
 * reference order, FIFO within one, requests short of memory wait and all complete without the
 * pool ever going over, memory-free requests pass one short of memory, a request that can never
 * fit fails alone, a full queue refuses, and an aborted waiting request leaves at once without an
 * attempt; several attempts run at once, bounded and without over-committing. Fresh random workloads each run (the seed is in the test name).
 */
import { describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { AdmissionQueue, SHORT_OF_MEMORY, type AdmissionTimers, type Admitted } from "../../services/compute/generate/admission.js";
import { ServiceError, resourceExhausted } from "../../services/common/errors.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 4)) >>> 0;
const rand = prng(seed);
const pick = (n: number) => Math.floor(rand() * n);

class FakeTimers implements AdmissionTimers {
  t = 0;
  private pending = new Map<number, { at: number; fn: () => void }>();
  private id = 0;
  now = () => this.t;
  set = (fn: () => void, ms: number) => {
    const id = ++this.id;
    this.pending.set(id, { at: this.t + ms, fn });
    return id;
  };
  clear = (h: unknown) => void this.pending.delete(h as number);
  advance(ms: number): void {
    this.t += ms;
    for (const [id, p] of [...this.pending]) {
      if (p.at <= this.t) {
        this.pending.delete(id);
        p.fn();
      }
    }
  }
  get armed(): number {
    return this.pending.size;
  }
}

const settle = () => new Promise<void>((r) => setImmediate(r));

describe(`AdmissionQueue (seed ${seed})`, () => {
  it("admits tenants round-robin, each tenant in arrival order", async () => {
    for (let round = 0; round < 5; round++) {
      const q = new AdmissionQueue({ maxWaiting: 1000, maxRunning: 1, timers: new FakeTimers() });
      const tenants = ["a", "b", "c", "d", ""].slice(0, 2 + pick(4));
      const arrivals = Array.from({ length: 5 + pick(25) }, (_, i) => ({ tenant: tenants[pick(tenants.length)], i }));
      const order: number[] = [];
      const tickets: Promise<Admitted<number>>[] = arrivals.map((a) =>
        q.enter({ tenant: a.tenant, needsMemory: false, attempt: async () => a.i }).then((t) => {
          order.push(t.value);
          return t;
        }),
      );
      // Reference: the first arrival runs at once; then the rotation in order of first arrival,
      // the admitted tenant going to the back.
      const expected: number[] = [];
      const queues = new Map<string, number[]>();
      const rotation: string[] = [];
      for (const a of arrivals) {
        if (!queues.has(a.tenant)) {
          queues.set(a.tenant, []);
          rotation.push(a.tenant);
        }
        queues.get(a.tenant)!.push(a.i);
      }
      while (rotation.length) {
        const t = rotation.shift()!;
        const qq = queues.get(t)!;
        expected.push(qq.shift()!);
        if (qq.length) rotation.push(t);
      }
      await settle();
      expect(q.running).toBe(1);
      expect(q.waiting).toBe(arrivals.length - 1);
      for (let k = 0; k < arrivals.length; k++) {
        await settle();
        expect(order.length).toBe(k + 1);
        (await tickets[order[k]]).release();
      }
      await settle();
      expect(order).toEqual(expected);
      expect(q.waiting).toBe(0);
      expect(q.running).toBe(0);
    }
  });

  it("holds requests short of memory until memory comes back; all complete, the pool never over", async () => {
    const timers = new FakeTimers();
    const q = new AdmissionQueue({ maxWaiting: 1000, maxRunning: 0, timers, retryMs: 100 });
    const capacity = 10 + pick(20);
    let used = 0;
    let maxUsed = 0;
    const sizes = Array.from({ length: 20 + pick(20) }, () => 1 + pick(capacity));
    const attempts = new Array<number>(sizes.length).fill(0);
    const running: { t: Admitted<number>; size: number }[] = [];
    const done: number[] = [];
    const all = sizes.map((size, i) =>
      q
        .enter({
          tenant: "t" + pick(3),
          needsMemory: true,
          attempt: async () => {
            attempts[i]++;
            if (used + size > capacity) return SHORT_OF_MEMORY;
            used += size;
            maxUsed = Math.max(maxUsed, used);
            return i;
          },
        })
        .then((t) => running.push({ t, size })),
    );
    // Finish running requests in random order: free their memory, then their slot.
    while (done.length < sizes.length) {
      await settle();
      expect(running.length, "something runs while requests wait").toBeGreaterThan(0);
      const r = running.splice(pick(running.length), 1)[0];
      used -= r.size;
      done.push(r.t.value);
      r.t.release();
    }
    await Promise.all(all);
    expect(maxUsed).toBeLessThanOrEqual(capacity);
    expect(done.slice().sort((a, b) => a - b)).toEqual(sizes.map((_, i) => i));
    expect(q.waiting).toBe(0);
    // The retries came from releases (each short request is retried once per release at most).
    expect(Math.max(...attempts)).toBeLessThanOrEqual(sizes.length);
  });

  it("strict order (backfill 0): retries on its timer when memory is freed elsewhere, and lets memory-free requests pass", async () => {
    const timers = new FakeTimers();
    const q = new AdmissionQueue({ maxWaiting: 10, maxRunning: 0, timers, retryMs: 100, backfillMs: 0 });
    let free = 0;
    let big = false;
    const bigP = q.enter({ tenant: "x", needsMemory: true, attempt: async () => (free >= 5 ? ((big = true), 1) : SHORT_OF_MEMORY) });
    await settle();
    expect(big).toBe(false);
    expect(timers.armed).toBe(1);
    // Another tenant's memory-free request is admitted; a memory one waits behind the short one.
    let smallTried = false;
    const small = q.enter({ tenant: "y", needsMemory: true, attempt: async () => ((smallTried = true), 2) });
    const light = await q.enter({ tenant: "z", needsMemory: false, attempt: async () => 3 });
    expect(light.value).toBe(3);
    expect(smallTried).toBe(false);
    free = 5;
    timers.advance(99);
    await settle();
    expect(big).toBe(false);
    timers.advance(1);
    await settle();
    expect((await bigP).value).toBe(1);
    expect((await small).value).toBe(2);
  });

  it("a request that needed no memory but came back short waits for memory like the others, not retried in a loop", async () => {
    const timers = new FakeTimers();
    const q = new AdmissionQueue({ maxWaiting: 10, maxRunning: 0, timers, retryMs: 100 });
    let free = 0;
    let attempts = 0;
    // (Past 50 attempts it takes what it gets, so that a loop ends and fails the count below.)
    const p = q.enter({ tenant: "x", needsMemory: false, attempt: async () => (attempts++, free >= 1 || attempts > 50 ? 7 : SHORT_OF_MEMORY) });
    await settle();
    expect(attempts).toBe(1);
    // Nothing came back: no attempt until the retry timer.
    timers.advance(99);
    await settle();
    expect(attempts).toBe(1);
    free = 1;
    timers.advance(1);
    await settle();
    expect(attempts).toBe(2);
    expect((await p).value).toBe(7);
  });

  it("backfill: smaller requests take memory the oldest short one cannot use yet, until its window ends; then it is not starved", async () => {
    const timers = new FakeTimers();
    const backfillMs = 500 + pick(1000);
    const q = new AdmissionQueue({ maxWaiting: 1000, maxRunning: 0, timers, retryMs: 100, backfillMs });
    const capacity = 100;
    let used = 40 + pick(40); // held elsewhere: the big request (capacity - 10) cannot fit yet
    const take = (size: number) => async () => (used + size <= capacity ? ((used += size), size) : SHORT_OF_MEMORY);
    const admitted: number[] = [];
    const big = q.enter({ tenant: "", needsMemory: true, attempt: take(capacity - 10) }).then((t) => (admitted.push(t.value), t));
    await settle();
    expect(admitted).toEqual([]);
    // Inside the window a small request that fits passes it (same tenant, behind it).
    const small = await q.enter({ tenant: "", needsMemory: true, attempt: take(5) });
    expect(small.value).toBe(5);
    // Past the window a small one waits behind the big one, although it would fit.
    timers.advance(backfillMs);
    await settle();
    let lateAdmitted = false;
    const late = q.enter({ tenant: "other", needsMemory: true, attempt: take(1) }).then((t) => ((lateAdmitted = true), t));
    await settle();
    timers.advance(100);
    await settle();
    expect(lateAdmitted).toBe(false);
    // The memory held elsewhere and the small one's come back: the big one runs first, then the late one.
    used = 0;
    small.release();
    await settle();
    expect(admitted).toEqual([capacity - 10]);
    await settle();
    expect(lateAdmitted).toBe(true);
    (await big).release();
    (await late).release();
  });

  it("refuses a request that can never fit and moves on", async () => {
    const q = new AdmissionQueue({ maxWaiting: 10, maxRunning: 0, timers: new FakeTimers() });
    const never = q.enter({ tenant: "", needsMemory: true, attempt: async () => Promise.reject(resourceExhausted("never fits")) });
    const ok = q.enter({ tenant: "", needsMemory: true, attempt: async () => 7 });
    await expect(never).rejects.toMatchObject({ code: status.RESOURCE_EXHAUSTED });
    expect((await ok).value).toBe(7);
  });

  it("refuses a request that can never fit at once, also while it waits behind one short of memory", async () => {
    const timers = new FakeTimers();
    const q = new AdmissionQueue({ maxWaiting: 100, maxRunning: 0, timers });
    // The pool: `free` units; a request takes `size` or is short. Capacity bounds what could ever fit.
    const capacity = 10 + pick(20);
    let free = 0;
    const running = await q.enter({ tenant: "", needsMemory: true, attempt: async () => ((free = 0), 0) });
    const take = (size: number) => async () => (size <= free ? ((free -= size), size) : SHORT_OF_MEMORY);
    const fits = (size: number) => async () => {
      if (size > capacity) throw resourceExhausted(`needs ${size} > capacity ${capacity}: it can never fit`);
      return true;
    };
    // A request short of memory now (it fits the capacity: it waits) ...
    let waiterIn = false;
    const waiter = q.enter({ tenant: "a", needsMemory: true, attempt: take(capacity), fits: fits(capacity) }).then((t) => ((waiterIn = true), t));
    await settle();
    // ... and, behind it, requests from several tenants, some of which can never fit.
    const sizes = Array.from({ length: 4 + pick(8) }, () => (rand() < 0.5 ? capacity + 1 + pick(50) : 1 + pick(capacity)));
    if (!sizes.some((x) => x > capacity)) sizes[0] = capacity + 1;
    const outcomes: string[] = sizes.map(() => "waiting");
    const ps = sizes.map((size, i) =>
      q.enter({ tenant: String(pick(3)), needsMemory: true, attempt: take(size), fits: fits(size) }).then(
        (t) => ((outcomes[i] = "admitted"), t),
        (e: ServiceError) => ((outcomes[i] = status[e.code]), undefined),
      ),
    );
    await settle();
    await settle();
    // No clock moved, no memory came back: the never-fitting ones are refused, the rest wait.
    expect(outcomes).toEqual(sizes.map((x) => (x > capacity ? "RESOURCE_EXHAUSTED" : "waiting")));
    expect(q.waiting).toBe(1 + sizes.filter((x) => x <= capacity).length);
    // Memory comes back (the whole pool, again and again): all that fit complete, the large
    // waiter too (past its backfill window the others wait behind it).
    running.release();
    for (let k = 0; k < 200 && (!waiterIn || outcomes.some((o) => o === "waiting")); k++) {
      free = capacity;
      timers.advance(1000);
      await settle();
      for (const [i, p] of ps.entries()) if (outcomes[i] === "admitted") void p.then((t) => t?.release());
    }
    expect((await waiter).value).toBe(capacity);
    expect(outcomes).toEqual(sizes.map((x) => (x > capacity ? "RESOURCE_EXHAUSTED" : "admitted")));
  });

  it("keeps a request waiting while its fits check cannot tell, checks it again, and refuses it once it can tell", async () => {
    const timers = new FakeTimers();
    const q = new AdmissionQueue({ maxWaiting: 100, maxRunning: 0, timers, retryMs: 100 });
    const capacity = 10 + pick(20);
    let free = 0;
    const running = await q.enter({ tenant: "", needsMemory: true, attempt: async () => ((free = 0), 0) });
    const take = (size: number) => async () => (size <= free ? ((free -= size), size) : SHORT_OF_MEMORY);
    // The capacity cannot be read for the first `blind` checks (the kvstore does not answer).
    const blind = 2 + pick(4);
    let checks = 0;
    const fits = (size: number) => async () => {
      if (++checks <= blind) return false;
      if (size > capacity) throw resourceExhausted(`needs ${size} > capacity ${capacity}: it can never fit`);
      return true;
    };
    const waiter = q.enter({ tenant: "a", needsMemory: true, attempt: take(capacity), fits: async () => true });
    let outcome = "waiting";
    const never = q
      .enter({ tenant: "b", needsMemory: true, attempt: take(capacity + 1 + pick(9)), fits: fits(capacity + 5) })
      .then(
        () => (outcome = "admitted"),
        (e: ServiceError) => (outcome = status[e.code]),
      );
    await settle();
    // Undecided: it waits (not refused with the error of a failed read) ...
    expect(outcome).toBe("waiting");
    expect(q.waiting).toBe(2);
    // ... and is checked again each time memory comes back short, until the check can tell.
    for (let k = 0; k < 50 && outcome === "waiting"; k++) {
      timers.advance(100);
      await settle();
    }
    expect(checks).toBe(blind + 1);
    expect(outcome).toBe("RESOURCE_EXHAUSTED");
    // Memory comes back: the waiter, which could fit all along, is admitted.
    running.release();
    let waiterIn = false;
    void waiter.then(() => (waiterIn = true));
    for (let k = 0; k < 50 && !waiterIn; k++) {
      free = capacity;
      timers.advance(100);
      await settle();
    }
    expect((await waiter).value).toBe(capacity);
    await never;
  });

  it("sets up to maxAttempts requests at once, never more than the free running slots, and never over-commits", async () => {
    for (let round = 0; round < 4; round++) {
      const maxAttempts = 1 + pick(6);
      const maxRunning = rand() < 0.3 ? 0 : 1 + pick(8);
      const timers = new FakeTimers();
      const q = new AdmissionQueue({ maxWaiting: 1000, maxRunning, maxAttempts, timers, retryMs: 100 });
      // A pool counted when an attempt starts (as the kvstore counts a reservation before it
      // answers), the answer coming back after a random number of turns of the event loop.
      const capacity = 20 + pick(30);
      let used = 0;
      let inFlight = 0;
      let maxInFlight = 0;
      let maxUsed = 0;
      const sizes = Array.from({ length: 10 + pick(30) }, () => 1 + pick(capacity));
      const ends: Array<() => void> = [];
      const admitted: { t: Admitted<number>; size: number }[] = [];
      const all = sizes.map((size, i) =>
        q
          .enter({
            tenant: "t" + pick(3),
            needsMemory: true,
            attempt: async () => {
              inFlight++;
              maxInFlight = Math.max(maxInFlight, inFlight);
              expect(maxRunning === 0 || q.running + inFlight <= maxRunning, "an attempt without a free running slot").toBe(true);
              const fits = used + size <= capacity;
              if (fits) used += size;
              maxUsed = Math.max(maxUsed, used);
              await new Promise<void>((r) => ends.push(r));
              inFlight--;
              return fits ? i : SHORT_OF_MEMORY;
            },
          })
          .then((t) => admitted.push({ t, size })),
      );
      let finished = 0;
      for (let k = 0; k < 10_000 && finished < sizes.length; k++) {
        await settle();
        if (ends.length && rand() < 0.7) ends.splice(pick(ends.length), 1)[0]();
        else if (admitted.length) {
          const r = admitted.splice(pick(admitted.length), 1)[0];
          used -= r.size;
          r.t.release();
          finished++;
        } else if (ends.length) ends.shift()!();
        else timers.advance(100); // all short of memory and nothing running: their retry timer
      }
      expect(finished, `round ${round}: ${q.waiting} still waiting`).toBe(sizes.length);
      await Promise.all(all);
      expect(maxUsed).toBeLessThanOrEqual(capacity);
      expect(maxInFlight).toBeLessThanOrEqual(maxAttempts);
      // Several were set up at once whenever slots allowed (many waiting, none admitted yet at first).
      expect(maxInFlight).toBe(Math.min(maxAttempts, maxRunning || Infinity, sizes.length));
      expect(q.waiting).toBe(0);
      expect(q.running).toBe(0);
    }
  });

  it("refuses with RESOURCE_EXHAUSTED when the queue is full", async () => {
    const maxWaiting = 1 + pick(5);
    const q = new AdmissionQueue({ maxWaiting, maxRunning: 1, timers: new FakeTimers() });
    const first = await q.enter({ tenant: "", needsMemory: false, attempt: async () => 0 });
    const waiting = Array.from({ length: maxWaiting }, (_, i) => q.enter({ tenant: String(i % 2), needsMemory: false, attempt: async () => i + 1 }));
    expect(q.waiting).toBe(maxWaiting);
    const e = await q.enter({ tenant: "", needsMemory: false, attempt: async () => -1 }).catch((x: ServiceError) => x);
    expect(e).toBeInstanceOf(ServiceError);
    expect((e as ServiceError).code).toBe(status.RESOURCE_EXHAUSTED);
    expect((e as ServiceError).message).toMatch(/queue is full/);
    first.release();
    for (const w of waiting) (await w).release();
  });

  it("takes an aborted waiting request out at once, without an attempt", async () => {
    const q = new AdmissionQueue({ maxWaiting: 100, maxRunning: 1, timers: new FakeTimers() });
    const first = await q.enter({ tenant: "", needsMemory: false, attempt: async () => 0 });
    const n = 3 + pick(8);
    const acs = Array.from({ length: n }, () => new AbortController());
    const tried = new Array<boolean>(n).fill(false);
    const ps = acs.map((ac, i) => q.enter({ tenant: String(pick(3)), signal: ac.signal, needsMemory: true, attempt: async () => ((tried[i] = true), i) }));
    const gone = new Set<number>();
    while (gone.size < Math.ceil(n / 2)) gone.add(pick(n));
    for (const i of gone) acs[i].abort(new ServiceError(status.CANCELLED, "call cancelled by the client"));
    expect(q.waiting).toBe(n - gone.size);
    for (const i of gone) await expect(ps[i]).rejects.toMatchObject({ code: status.CANCELLED });
    // The rest run one at a time (maxRunning 1), in the queue's order.
    const admitted: Admitted<number>[] = [];
    for (let i = 0; i < n; i++) if (!gone.has(i)) void ps[i].then((t) => admitted.push(t));
    first.release();
    for (let k = 0; k < n - gone.size; k++) {
      await settle();
      expect(admitted.length).toBe(k + 1);
      admitted[k].release();
    }
    for (const i of gone) expect(tried[i]).toBe(false);
    expect(q.waiting).toBe(0);
    expect(q.running).toBe(0);
    // Already aborted: refused before it enters.
    const ac = new AbortController();
    ac.abort(new ServiceError(status.DEADLINE_EXCEEDED, "deadline exceeded"));
    await expect(q.enter({ tenant: "", signal: ac.signal, needsMemory: false, attempt: async () => 1 })).rejects.toMatchObject({ code: status.DEADLINE_EXCEEDED });
  });
});
