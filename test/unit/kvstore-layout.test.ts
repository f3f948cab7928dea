/**
 * The segment layout (the native one definition, through native/shm.ts) is consistent on random
 * shapes, an engine session works over segments of exactly that size, and CRC32C agrees with a
 * bit-at-a-time reference.
 */
import { describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import { loadShm } from "../../native/shm.js";
import { toNativeGeometry } from "../../services/common/geometry.js";
import { resolveRetrieval, toNativeRetrieval } from "../../services/common/retrieval.js";
import { crc32c } from "../../services/common/crc32c.js";
import { capacityPages, computeLayout, totalBytes } from "../../services/kvstore/layout.js";
import { attachLocalHost } from "../../services/compute/model/localHost.js";
import { prng, randomBytes, randomF32 } from "../helpers/prng.js";

const elemBytes = (d: number) => (d === 1 ? 4 : 2);

function randomShape(rand: () => number) {
  const pick = <T>(a: T[]) => a[Math.floor(rand() * a.length)];
  const kvHeads = pick([1, 2, 4, 8]);
  const g = { layers: 1 + Math.floor(rand() * 40), queryHeads: kvHeads * pick([1, 2, 4, 7]), kvHeads, headDim: pick([16, 64, 96, 128, 256]), kvDtype: pick([1, 2, 3]) };
  const P = pick([8, 16, 32, 64]);
  const r = resolveRetrieval({ pageSize: P, sinkTokens: P * Math.floor(rand() * 8), windowTokens: P * (1 + Math.floor(rand() * 8)), selectTokens: P * (1 + Math.floor(rand() * 64)) } as never, g.layers);
  const cap = capacityPages(1 + Math.floor(rand() * 100000), P);
  return { g, r, P, cap };
}

describe("segment layout", () => {
  it("refuses a layout past 2^50 bytes with a RangeError instead of wrapping in 64 bits", () => {
    const g = { layers: 1024, queryHeads: 1024, kvHeads: 1024, headDim: 1024, kvDtype: 1 };
    const r = resolveRetrieval({ pageSize: 1024, sinkTokens: 1024, windowTokens: 1024, selectTokens: 1024 } as never, g.layers);
    expect(() => computeLayout(g, r, 2 ** 30)).toThrow(RangeError);
    expect(() => computeLayout(g, r, 2 ** 30)).toThrow(/would pass 2\^50 bytes/);
    // Just below the bound it is computed exactly.
    const ok = computeLayout({ ...g, layers: 1 }, r, 2 ** 10);
    expect(ok.storeBytes).toBe(2 * 1024 * 1024 * 4 * 1024 * 2 ** 10);
  });

  it("is consistent on 300 random shapes: offsets inside sizes, records apart, sizes that grow as they must", () => {
    const rand = prng(31337);
    for (let i = 0; i < 300; i++) {
      const { g, r, P, cap } = randomShape(rand);
      const l = computeLayout(g as never, r, cap);
      const at = JSON.stringify({ g, P, cap });
      const e = elemBytes(g.kvDtype);
      // Page and tail sizes from the shape, independently of the native arithmetic.
      expect(l.headPageBytes, at).toBe(2 * P * g.headDim * e);
      expect(l.pageBytes, at).toBe(g.kvHeads * l.headPageBytes);
      expect(l.layerStride, at).toBe(cap * l.pageBytes);
      expect(l.tailLayerBytes, at).toBe(P * 2 * g.kvHeads * g.headDim * e);
      // Every region lies inside its segment; segments are whole 4 KiB pages.
      expect(l.storeBytes, at).toBeGreaterThanOrEqual(g.layers * l.layerStride);
      expect(l.tailBytes, at).toBeGreaterThanOrEqual(g.layers * l.tailLayerBytes);
      const selected = Math.max(1, Math.floor(r.selectTokens / P)) * g.kvHeads * l.headPageBytes;
      expect(l.stagingBufferBytes, at).toBeGreaterThanOrEqual(selected);
      for (const b of [l.storeBytes, l.stagingBufferBytes, l.tailBytes, l.manifestBytes]) expect(b % 4096, at).toBe(0);
      // Manifest: header (16 bytes) + 8 bytes per layer, then 2 records per layer that hold q.
      expect(l.manifestQueryOffset, at).toBeGreaterThanOrEqual(16 + 8 * g.layers);
      expect(l.manifestQueryRecordBytes, at).toBeGreaterThanOrEqual(16 + 4 * g.queryHeads * g.headDim);
      expect(l.manifestQueryOffset % 64 + (l.manifestQueryRecordBytes % 64), at).toBe(0);
      expect(l.manifestBytes, at).toBeGreaterThanOrEqual(l.manifestQueryOffset + 2 * g.layers * l.manifestQueryRecordBytes);
      expect(totalBytes(l)).toBe(l.storeBytes + 2 * l.stagingBufferBytes + l.tailBytes + l.manifestBytes);
      // One more layer, page of capacity or query head never shrinks anything.
      const more = [
        computeLayout({ ...g, layers: g.layers + 1 } as never, r, cap),
        computeLayout(g as never, r, cap + 1),
        computeLayout({ ...g, queryHeads: g.queryHeads + g.kvHeads } as never, r, cap),
      ];
      for (const m of more) for (const k of Object.keys(l) as (keyof typeof l)[]) expect(m[k], `${k} ${at}`).toBeGreaterThanOrEqual(l[k]);
    }
  });

  it("is the same through both addons", () => {
    const rand = prng(7);
    for (let i = 0; i < 20; i++) {
      const { g, r, cap } = randomShape(rand);
      expect(loadAddon().layout(toNativeGeometry(g as never), toNativeRetrieval(r), cap)).toEqual(loadShm().layout(toNativeGeometry(g as never), toNativeRetrieval(r), cap));
    }
  });

  it("store holds layers x capacity HND pages", () => {
    const g = { layers: 3, queryHeads: 8, kvHeads: 2, headDim: 64, kvDtype: 2 };
    const r = resolveRetrieval(undefined, 3);
    const cap = capacityPages(1000, r.pageSize);
    const l = computeLayout(g as never, r, cap);
    expect(cap).toBe(32);
    expect(l.headPageBytes).toBe(2 * 32 * 64 * 2);
    expect(l.pageBytes).toBe(2 * l.headPageBytes);
    expect(l.storeBytes).toBeGreaterThanOrEqual(3 * 32 * l.pageBytes);
    expect(l.storeBytes % 4096).toBe(0);
  });

  it("an engine session over segments of exactly that size prefills, decodes and fills the manifest", async () => {
    const rand = prng(5);
    const engine = new (loadAddon().Engine)({ backend: "cpu", threads: 1 });
    for (let i = 0; i < 4; i++) {
      const kvHeads = [1, 2][i % 2];
      const geometry = { layers: 2, qHeads: kvHeads * 2, kvHeads, headDim: 16, kvDtype: 1 };
      const P = [4, 8][i % 2];
      const retrieval = toNativeRetrieval(resolveRetrieval({ pageSize: P, sinkTokens: P, windowTokens: 2 * P, selectTokens: 2 * P } as never, 2));
      const n = 9 * P + 3;
      const cap = Math.ceil((n + 1) / P);
      const local = attachLocalHost(geometry as never, retrieval, cap, "layout-test");
      const l = loadShm().layout(geometry as never, retrieval, cap);
      expect(local.host.store.size).toBe(l.storeBytes);
      expect(local.host.manifest.size).toBe(l.manifestBytes);
      const s = engine.createSession(geometry as never, retrieval, local.host, false);
      const KV = kvHeads * 16;
      for (let layer = 0; layer < 2; layer++) await engine.prefill(s, layer, randomF32(n * KV, rand), randomF32(n * KV, rand), n);
      for (let layer = 0; layer < 2; layer++) {
        const [out] = await engine.decode(layer, [{ session: s, q: randomF32(2 * KV, rand), k: randomF32(KV, rand), v: randomF32(KV, rand) }]);
        expect(out.every(Number.isFinite)).toBe(true);
      }
      await engine.sync(s);
      const m = loadShm().readManifest(local.host.manifest.buffer(), 2);
      expect(m.valid).toBe(true);
      expect(m.contextTokens).toBe(n + 1);
      expect(m.committedPages).toEqual([Math.floor((n + 1) / P), Math.floor((n + 1) / P)]);
      expect(m.tailTokens).toEqual([(n + 1) % P, (n + 1) % P]);
      engine.closeSession(s);
      await local.release();
    }
  });
});

function crc32cBitwise(b: Uint8Array): number {
  let c = 0xffffffff;
  for (const x of b) {
    c ^= x;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}

describe("crc32c", () => {
  it("matches a bit-at-a-time reference on random buffers of many lengths", () => {
    const rand = prng(99);
    for (const n of [0, 1, 7, 8, 9, 63, 64, 1000, 4097, 65536]) {
      const b = randomBytes(n, rand);
      expect(crc32c(b)).toBe(crc32cBitwise(b));
    }
  });
});
