/**
 * The engine's store reservation (HostSegments.reservedPages, Engine.reserveStore): appends that
 * would fill a page past the reservation are refused and change nothing; a reservation grown step
 * by step as the context grows gives outputs identical, bit for bit, to a session reserved whole
 * from the start (random inputs, freekv mode); shrinking or passing the capacity is refused.
 */
import { afterAll, describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import type { PolicyConfig } from "../../tools/reference/policy.js";
import { Prng, testSeed } from "./reference/prng.js";
import { createHost, geometryOf, retrievalOf, type Host } from "./reference/harness.js";

const c: PolicyConfig = {
  qHeads: 4, kvHeads: 2, headDim: 8, pageSize: 4, sinkTokens: 4, windowTokens: 8, selectTokens: 8,
  tau: 0.9, summary: "maxmin", combine: "softmax_mean", mode: "freekv", dtype: "f32",
};
const LAYERS = 2;
const CAP = 64;
const g = geometryOf(c, LAYERS);
const r = retrievalOf(c);
const seed = testSeed();
const rng = new Prng(seed);
const hosts: Host[] = [];
afterAll(async () => {
  for (const h of hosts) await h.dispose();
});

describe(`engine store reservation (seed ${seed})`, () => {
  it("refuses appends past the reservation, grows only upward, and matches a whole reservation bit for bit", async () => {
    const engine = new (loadAddon().Engine)({ backend: "cpu", threads: 2 });
    const whole = createHost(g, r, CAP);
    const grown = createHost(g, r, CAP);
    hosts.push(whole, grown);
    const a = engine.createSession(g, r, whole.segments, false);
    let reserved = 1 + Math.floor(rng.next() * 3);
    const b = engine.createSession(g, r, { ...grown.segments, reservedPages: reserved }, false);
    expect(() => engine.createSession(g, r, { ...grown.segments, reservedPages: CAP + 1 }, false)).toThrow(/reservedPages/);
    const kv = (n: number) => rng.normals(n * c.kvHeads * c.headDim);
    const qv = (n: number) => rng.normals(n * c.qHeads * c.headDim);
    // A prompt that fits the first reservation (full pages <= reserved), then decode steps.
    const prompt = reserved * c.pageSize + Math.floor(rng.next() * c.pageSize);
    for (let l = 0; l < LAYERS; l++) {
      const [q, k, v] = [qv(prompt), kv(prompt), kv(prompt)];
      const oa = await engine.prefillAttend(a, l, q, k, v, prompt);
      const ob = await engine.prefillAttend(b, l, q, k, v, prompt);
      expect(Buffer.from(ob.buffer).equals(Buffer.from(oa.buffer))).toBe(true);
    }
    let refused = 0;
    for (let step = 0; step < 30 * c.pageSize; step++) {
      const ctx = engine.contextTokens(b);
      for (let l = 0; l < LAYERS; l++) {
        const item = { q: qv(1), k: kv(1), v: kv(1) };
        if (Math.floor((ctx + 1) / c.pageSize) > reserved) {
          // The step would fill a page past the reservation: refused, nothing appended.
          await expect(Promise.resolve().then(() => engine.decode(l, [{ session: b, ...item }]))).rejects.toThrow(/past the session's reservation/);
          expect(engine.contextTokens(b)).toBe(ctx);
          refused++;
          // The kvstore grew the reservation by a random extent; shrinking is refused.
          const next = Math.min(CAP, reserved + 1 + Math.floor(rng.next() * 4));
          expect(() => engine.reserveStore(b, reserved - 1)).toThrow(/reservedPages must be in/);
          engine.reserveStore(b, next);
          engine.reserveStore(b, next); // the same again: nothing
          reserved = next;
        }
        const [oa] = await engine.decode(l, [{ session: a, ...item }]);
        const [ob] = await engine.decode(l, [{ session: b, ...item }]);
        expect(Buffer.from(ob.buffer).equals(Buffer.from(oa.buffer)), `step ${step} layer ${l}`).toBe(true);
      }
    }
    expect(refused).toBeGreaterThan(3);
    expect(engine.contextTokens(b)).toBe(engine.contextTokens(a));
    expect(() => engine.reserveStore(b, CAP + 1)).toThrow(/reservedPages must be in/);
    expect(() => engine.reserveStore(999, 2)).toThrow(/session 999 is not open/);
    for (let l = 0; l < LAYERS; l++) expect(engine.filledPages(b, l)).toBe(engine.filledPages(a, l));
    // The same pages landed in both stores.
    const pages = engine.filledPages(a, 0);
    const layout = loadAddon().layout(g, r, CAP);
    for (let l = 0; l < LAYERS; l++) {
      const off = l * layout.layerStride;
      const sa = new Uint8Array(whole.segments.store.buffer(), off, pages * layout.pageBytes);
      const sb = new Uint8Array(grown.segments.store.buffer(), off, pages * layout.pageBytes);
      expect(Buffer.from(sb).equals(Buffer.from(sa))).toBe(true);
    }
    engine.closeSession(a);
    engine.closeSession(b);
  });
});
