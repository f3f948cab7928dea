/**
 * Invalid input to the Engine gives a clear error that names the argument, never a crash, and
 * the engine keeps working afterwards.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadAddon, type Engine } from "../../native/binding.js";
import type { PolicyConfig } from "../../tools/reference/policy.js";
import { Prng, testSeed } from "./reference/prng.js";
import { createHost, geometryOf, retrievalOf, type Host } from "./reference/harness.js";

const c: PolicyConfig = {
  qHeads: 4, kvHeads: 2, headDim: 8, pageSize: 4, sinkTokens: 4, windowTokens: 8, selectTokens: 8,
  tau: 0.9, summary: "maxmin", combine: "softmax_mean", mode: "freekv", dtype: "f32",
};
const g = geometryOf(c, 2);
const r = retrievalOf(c);
const rng = new Prng(testSeed());

describe("engine argument errors", () => {
  let engine: Engine;
  let host: Host;
  let session: number;
  beforeAll(() => {
    engine = new (loadAddon().Engine)({ backend: "cpu", threads: 1 });
    host = createHost(g, r, 4);
    session = engine.createSession(g, r, host.segments, false);
  });
  afterAll(async () => {
    engine.closeSession(session);
    await host.dispose();
  });

  it("constructor options", () => {
    const E = loadAddon().Engine;
    expect(() => new E({ backend: "tpu" as "cpu" })).toThrow(/options.backend/);
    expect(() => new E({ backend: "cpu", threads: -1 })).toThrow(/options.threads/);
    if (!loadAddon().backendInfo().cuda.available) expect(() => new E({ backend: "cuda" })).toThrow(/^no CUDA device/);
  });

  it("layout and session geometry/config", () => {
    const E = loadAddon().Engine;
    expect(() => loadAddon().layout({ ...g, qHeads: 3 }, r, 4)).toThrow(/geometry.qHeads/);
    expect(() => loadAddon().layout(g, r, 0)).toThrow(/capacityPages/);
    expect(() => engine.createSession({ ...g, headDim: 0 }, r, host.segments, false)).toThrow(/geometry.headDim/);
    expect(() => engine.createSession(g, { ...r, windowTokens: 6 }, host.segments, false)).toThrow(/retrieval.windowTokens/);
    expect(() => engine.createSession(g, { ...r, sinkTokens: 3 }, host.segments, false)).toThrow(/retrieval.sinkTokens/);
    expect(() => engine.createSession(g, { ...r, mode: 9 as 1 }, host.segments, false)).toThrow(/retrieval.mode/);
    expect(() => engine.createSession(g, { ...r, denseLayers: [2] }, host.segments, false)).toThrow(/retrieval.denseLayers/);
    expect(() => engine.createSession(g, { ...r, tau: Number.NaN }, host.segments, false)).toThrow(/retrieval.tau/);
    expect(() => engine.createSession(g, r, { ...host.segments, store: {} as never }, false)).toThrow(/host.store/);
    // Segments sized for 4 pages cannot hold 64.
    expect(() => engine.createSession(g, r, { ...host.segments, capacityPages: 64 }, false)).toThrow(/host.store segment is smaller/);
    expect(() => engine.createSession(g, r, host.segments, "yes" as never)).toThrow(/reattach/);
  });

  it("prefill, decode and introspection arguments", async () => {
    const kv = (n: number) => rng.normals(n * c.kvHeads * c.headDim);
    const qv = (n: number) => rng.normals(n * c.qHeads * c.headDim);
    expect(() => engine.prefill(999, 0, kv(1), kv(1), 1)).toThrow(/session 999 is not open/);
    expect(() => engine.prefill(session, 2, kv(1), kv(1), 1)).toThrow(/layer 2 is out of range/);
    expect(() => engine.prefill(session, 0, kv(2), kv(1), 1)).toThrow(/k has 32 elements, expected 16/);
    expect(() => engine.prefill(session, 0, new Float64Array(16) as never, kv(1), 1)).toThrow(/k must be a Float32Array/);
    expect(() => engine.prefill(session, 0, kv(1), kv(1), 0)).toThrow(/\bn\b/);
    expect(() => engine.prefillAttend(session, 0, qv(2), kv(2), kv(2), 1)).toThrow(/q has/);
    const item = { session, q: qv(1), k: kv(1), v: kv(1) };
    expect(() => engine.decode(0, [])).toThrow(/items/);
    expect(() => engine.decode(0, [{ ...item, session: 77 }])).toThrow(/items\[0\].session 77 is not open/);
    expect(() => engine.decode(0, [item, item])).toThrow(/appears twice/);
    expect(() => engine.decode(0, [{ ...item, v: kv(2) }])).toThrow(/items\[0\].v has/);
    expect(() => engine.decode(5, [item])).toThrow(/layer 5 is out of range/);
    expect(() => engine.lastAttendedTokens(session, 0, 2)).toThrow(/kvHead 2/);
    expect(() => engine.stats(12345)).toThrow(/not open/);
    // Capacity: the store holds 4 full pages of 4 tokens, the tail the partial page: 19 tokens.
    // The 20th token would fill a fifth page: rejected (asynchronously), nothing changes.
    await engine.prefill(session, 0, kv(15), kv(15), 15);
    await engine.prefill(session, 1, kv(15), kv(15), 15);
    await expect(engine.prefill(session, 0, kv(5), kv(5), 5)).rejects.toThrow(/capacity/);
    // The engine still works.
    for (let t = 0; t < 4; t++)
      for (let l = 0; l < 2; l++) expect((await engine.decode(l, [item]))[0].length).toBe(c.qHeads * c.headDim);
    expect(engine.contextTokens(session)).toBe(19);
    await expect(engine.decode(0, [item])).rejects.toThrow(/capacity/);
    expect(engine.contextTokens(session)).toBe(19);
    expect(engine.stats(session).pagesOffloaded).toBe(8);
  });
});
