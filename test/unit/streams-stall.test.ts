/**
 * The server streams' write (common/streams.ts `send`): a message the transport takes returns at
 * once; one it does not waits for 'drain', the call's signal, or the stall limit, whichever comes
 * first, and leaves no listener behind either way.
 */
import { EventEmitter } from "node:events";
import { status } from "@grpc/grpc-js";
import { describe, expect, it } from "vitest";
import { send, WriteStalled } from "../../services/common/streams.js";
import { ServiceError } from "../../services/common/errors.js";

/** A stream whose transport takes `room` messages, then is full until drain() is called. */
class FakeStream extends EventEmitter {
  written: number[] = [];
  constructor(private room: number) {
    super();
  }
  write(m: number): boolean {
    this.written.push(m);
    return --this.room > 0;
  }
  drain(room: number): void {
    this.room = room;
    this.emit("drain");
  }
}

const settle = <T>(p: Promise<T>) =>
  p.then(
    (v) => ({ ok: true as const, v }),
    (e: unknown) => ({ ok: false as const, e }),
  );

describe("send", () => {
  it("returns at once while the transport takes messages", async () => {
    const s = new FakeStream(3);
    await send(s, 1, new AbortController().signal, 50);
    await send(s, 2, new AbortController().signal, 50);
    expect(s.written).toEqual([1, 2]);
    expect(s.listenerCount("drain")).toBe(0);
  });

  it("waits for drain, and a drain before the limit is no stall", async () => {
    const s = new FakeStream(1);
    const ac = new AbortController();
    const p = settle(send(s, 1, ac.signal, 400));
    setTimeout(() => s.drain(10), 60);
    const r = await p;
    expect(r.ok).toBe(true);
    expect(s.listenerCount("drain")).toBe(0);
  });

  it("a client that reads nothing for the limit fails the write with DEADLINE_EXCEEDED naming the setting", async () => {
    const s = new FakeStream(1);
    const ac = new AbortController();
    const t0 = performance.now();
    const r = await settle(send(s, 1, ac.signal, 120));
    const took = performance.now() - t0;
    expect(r.ok).toBe(false);
    const e = (r as { e: unknown }).e;
    expect(e).toBeInstanceOf(WriteStalled);
    expect((e as ServiceError).code).toBe(status.DEADLINE_EXCEEDED);
    expect((e as Error).message).toMatch(/read nothing for 120 ms.*FREEKV_WRITE_STALL_MS/);
    expect(took).toBeGreaterThanOrEqual(110);
    expect(took).toBeLessThan(2000);
    expect(s.listenerCount("drain")).toBe(0);
    // The call is not aborted by it: the handler's error path ends the call with this status.
    expect(ac.signal.aborted).toBe(false);
  });

  it("the call's abort ends the wait with the abort's reason, not a stall", async () => {
    const s = new FakeStream(1);
    const ac = new AbortController();
    const reason = new ServiceError(status.CANCELLED, "call cancelled by the client");
    setTimeout(() => ac.abort(reason), 40);
    const r = await settle(send(s, 1, ac.signal, 5_000));
    expect(r).toEqual({ ok: false, e: reason });
    expect(s.listenerCount("drain")).toBe(0);
  });

  it("0 is no limit: the write waits past any stall limit until drain", async () => {
    const s = new FakeStream(1);
    let done = false;
    const p = send(s, 1, new AbortController().signal, 0).then(() => (done = true));
    await new Promise((r) => setTimeout(r, 250));
    expect(done).toBe(false);
    s.drain(1);
    await p;
    expect(done).toBe(true);
  });

  it("an aborted call writes nothing", async () => {
    const s = new FakeStream(5);
    const ac = new AbortController();
    ac.abort(new ServiceError(status.CANCELLED, "gone"));
    await expect(send(s, 1, ac.signal, 100)).rejects.toThrow("gone");
    expect(s.written).toEqual([]);
  });
});
