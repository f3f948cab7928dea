/**
 * DecodeBatcher's BatchInfo.gapMs: the native side's idle time between two calls (what the
 * scheduler logs before each prefill chunk). Undefined for the first call; afterwards the time from
 * the end of the previous call to the start of this one, a failed call included.
 */
import { describe, expect, it } from "vitest";
import { DecodeBatcher, type BatchInfo, type BatchItem } from "../../services/compute/decode-batcher.js";
import { prng } from "../helpers/prng.js";

const seed = (Date.now() ^ (process.pid << 7)) >>> 0;
const rand = prng(seed);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Item extends BatchItem<number> {
  x: number;
}

describe(`DecodeBatcher gapMs (seed ${seed})`, () => {
  it("is the time between the previous call's end and this call's start", async () => {
    const seen: (number | undefined)[] = [];
    const callMs = 15 + Math.floor(rand() * 20);
    let failNext = false;
    const b = new DecodeBatcher<Item, number>({
      maxBatch: 4,
      windowUs: 0,
      call: async (items) => {
        await sleep(callMs);
        if (failNext) {
          failNext = false;
          throw new Error("native call failed");
        }
        return items.map((i) => i.x + 1);
      },
      observe: (_items, info) => seen.push(info.gapMs),
    });
    const run = (x: number) =>
      new Promise<{ r: number; info: BatchInfo }>((resolve, reject) => b.submit({ session: 1, group: "", x, resolve: (r, info) => resolve({ r, info }), reject }));
    const first = await run(1);
    expect(first.r).toBe(2);
    expect(first.info.gapMs).toBeUndefined();
    const idle = 30 + Math.floor(rand() * 40);
    await sleep(idle);
    const second = await run(2);
    expect(second.info.gapMs!).toBeGreaterThanOrEqual(idle - 2);
    expect(second.info.gapMs!).toBeLessThan(idle + 200);
    // A failed call ends too: the gap after it counts from its end, not from the last success.
    failNext = true;
    await expect(run(3)).rejects.toThrow(/native call failed/);
    const third = await run(4);
    expect(third.info.gapMs!).toBeLessThan(callMs + 200);
    expect(third.info.gapMs!).toBeGreaterThanOrEqual(0);
    expect(seen).toEqual([undefined, second.info.gapMs, third.info.gapMs]);
  });
});
