/**
 * What a call's end does to the waits inside it:
 * - callScope's deadline timer beyond setTimeout's range (2^31 - 1 ms) fires at the deadline, not
 *   at once (Node runs such a timer after 1 ms);
 * - AsyncLock: a wait ended by its signal rejects with the reason and passes the lock on when its
 *   turn comes, so later waiters still get it in order;
 * - CreateSession whose session is made after the call's deadline closes that session (its caller
 *   never learns the id).
 */
import { EventEmitter } from "node:events";
import { describe, expect, it } from "vitest";
import { Metadata, status, type ServiceError } from "@grpc/grpc-js";
import { callScope } from "../../services/common/cancellation.js";
import { createLogger } from "../../services/common/log.js";
import { AsyncLock } from "../../services/compute/sessions/lock.js";
import { sessionHandlers } from "../../services/compute/sessions/handlers.js";
import type { SessionManager } from "../../services/compute/sessions/manager.js";
import { prng } from "../helpers/prng.js";

const seed = (Date.now() ^ (process.pid << 5)) >>> 0;
const rand = prng(seed);

class FakeCall extends EventEmitter {
  constructor(
    private readonly deadline: Date | number,
    readonly request: unknown = {},
    readonly metadata = new Metadata(),
  ) {
    super();
  }
  getDeadline() {
    return this.deadline;
  }
}

describe(`call ends (seed ${seed})`, () => {
  it("a deadline beyond setTimeout's range does not abort the call at once", async () => {
    const far = callScope(new FakeCall(new Date(Date.now() + 3_000_000_000 + Math.floor(rand() * 1e9))) as never);
    const near = callScope(new FakeCall(new Date(Date.now() + 30 + Math.floor(rand() * 30))) as never);
    await new Promise((r) => setTimeout(r, 120));
    expect(far.signal.aborted).toBe(false);
    expect(near.signal.aborted).toBe(true);
    expect((near.signal.reason as ServiceError).code).toBe(status.DEADLINE_EXCEEDED);
    far.done();
    near.done();
  });

  it("AsyncLock: waits ended by their signal give up their turn; the others keep their order", async () => {
    const lock = new AsyncLock();
    const n = 6 + Math.floor(rand() * 10);
    const order: number[] = [];
    const outcomes: Promise<string>[] = [];
    const first = await lock.acquire();
    const cancelled = new Set<number>();
    const controllers: AbortController[] = [];
    for (let i = 0; i < n; i++) {
      const ac = new AbortController();
      controllers.push(ac);
      if (rand() < 0.5) cancelled.add(i);
      outcomes.push(
        lock.run(async () => {
          order.push(i);
          await new Promise((r) => setTimeout(r, 1 + Math.floor(rand() * 3)));
          return "ran";
        }, ac.signal).catch((e: Error) => e.message),
      );
    }
    for (const i of cancelled) controllers[i].abort(new Error(`gave up ${i}`));
    expect(lock.busy).toBe(true);
    first();
    const got = await Promise.all(outcomes);
    for (let i = 0; i < n; i++) expect(got[i]).toBe(cancelled.has(i) ? `gave up ${i}` : "ran");
    expect(order).toEqual([...Array(n).keys()].filter((i) => !cancelled.has(i)));
    // Waiters that gave up after the last one that ran pass the lock on as their turn comes.
    await new Promise((r) => setImmediate(r));
    expect(lock.busy).toBe(false);
    // An already-aborted signal is refused at once, without queueing.
    const ac = new AbortController();
    ac.abort(new Error("late"));
    await expect(lock.acquire(ac.signal)).rejects.toThrow("late");
    expect(lock.busy).toBe(false);
  });

  it("CreateSession whose session is made after the deadline closes it and reports the deadline", async () => {
    const closed: string[] = [];
    const id = `s-${Math.floor(rand() * 1e9)}`;
    const sessions = {
      // Made after the call's deadline: resolves once the signal has aborted.
      create: (_req: unknown, signal: AbortSignal) =>
        new Promise((resolve) => signal.addEventListener("abort", () => setTimeout(() => resolve({ id }), 5), { once: true })),
      close: async (sid: string) => {
        closed.push(sid);
        return true;
      },
      toProto: (s: { id: string }) => ({ sessionId: s.id }),
    } as unknown as SessionManager;
    const h = sessionHandlers(sessions, createLogger("test", "error"));
    const err = await new Promise<ServiceError | null>((resolve) => h.createSession(new FakeCall(new Date(Date.now() + 20)) as never, (e) => resolve(e as ServiceError | null)));
    expect(err?.code).toBe(status.DEADLINE_EXCEEDED);
    expect(closed).toEqual([id]);
  });
});
