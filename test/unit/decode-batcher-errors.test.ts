/**
 * DecodeBatcher when a policy hook throws outside the native call (admission, observation): every
 * item of that batch fails with the error instead of waiting forever, and the batcher goes on
 * serving the next items.
 */
import { describe, expect, it } from "vitest";
import { DecodeBatcher, type BatchItem, type BatchInfo } from "../../services/compute/decode-batcher.js";
import { prng } from "../helpers/prng.js";

const seed = (Date.now() ^ (process.pid << 6)) >>> 0;
const rand = prng(seed);

interface Item extends BatchItem<number> {
  x: number;
}

function item(session: number, x: number): { it: Item; done: Promise<number> } {
  let resolve!: (v: number) => void, reject!: (e: unknown) => void;
  const done = new Promise<number>((a, b) => ((resolve = a), (reject = b)));
  return { it: { session, group: "g", x, resolve: (r: number, _b: BatchInfo) => resolve(r), reject }, done };
}

describe(`DecodeBatcher errors (seed ${seed})`, () => {
  for (const hook of ["admit", "observe"] as const) {
    it(`a throwing ${hook} fails its batch's items; the next batch runs`, async () => {
      let fail = true;
      const b = new DecodeBatcher<Item, number>({
        maxBatch: 64,
        windowUs: 0,
        call: async (items) => items.map((i) => i.x * 2),
        admit:
          hook === "admit"
            ? async (items) => {
                if (fail) throw new Error("admission broke");
                return { items, release() {} };
              }
            : undefined,
        observe:
          hook === "observe"
            ? () => {
                if (fail) throw new Error("observation broke");
              }
            : undefined,
      });
      const n = 2 + Math.floor(rand() * 8);
      const first = Array.from({ length: n }, (_, i) => item(i, Math.floor(rand() * 1000)));
      for (const f of first) b.submit(f.it);
      const outcomes = await Promise.allSettled(first.map((f) => f.done));
      for (const o of outcomes) {
        expect(o.status).toBe("rejected");
        expect(((o as PromiseRejectedResult).reason as Error).message).toMatch(/broke/);
      }
      fail = false;
      const next = Array.from({ length: n }, (_, i) => item(i, Math.floor(rand() * 1000)));
      for (const f of next) b.submit(f.it);
      expect(await Promise.all(next.map((f) => f.done))).toEqual(next.map((f) => f.it.x * 2));
    });
  }
});
