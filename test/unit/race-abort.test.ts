/**
 * raceAbort: the value or the error of the raced promise, or the signal's reason when it aborts
 * first, and no abort listener left behind once the race is over (a stream races every message's
 * wait against one call signal; whenAborted left one listener per message).
 */
import { getEventListeners } from "node:events";
import { describe, expect, it } from "vitest";
import { raceAbort, whenAborted } from "../../services/common/cancellation.js";
import { prng } from "../helpers/prng.js";

const seed = (Date.now() ^ (process.pid << 3)) >>> 0;
const rand = prng(seed);

describe(`raceAbort (seed ${seed})`, () => {
  it("settles as the raced promise and leaves no listener; an abort wins while it waits", async () => {
    const ac = new AbortController();
    const n = 200 + Math.floor(rand() * 300);
    for (let i = 0; i < n; i++) {
      const v = Math.floor(rand() * 1e6);
      if (rand() < 0.5) expect(await raceAbort(Promise.resolve(v), ac.signal)).toBe(v);
      else await expect(raceAbort(Promise.reject(new Error(`e${v}`)), ac.signal)).rejects.toThrow(`e${v}`);
    }
    expect(getEventListeners(ac.signal, "abort")).toHaveLength(0);
    // The old way leaves one per wait.
    for (let i = 0; i < 5; i++) await Promise.race([Promise.resolve(i), whenAborted(ac.signal)]);
    expect(getEventListeners(ac.signal, "abort")).toHaveLength(5);
    // Waiting, then aborted: the reason wins.
    const pending = raceAbort(new Promise(() => {}), ac.signal);
    ac.abort(new Error("gone"));
    await expect(pending).rejects.toThrow("gone");
    // Already aborted: rejects at once.
    await expect(raceAbort(Promise.resolve(1), ac.signal)).rejects.toThrow("gone");
  });
});
