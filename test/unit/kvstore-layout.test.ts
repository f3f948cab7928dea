/**
 * The kvstore's layout mirror against the native ComputeLayout on random shapes, and CRC32C
 * against a bit-at-a-time reference.
 */
import { describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import { toNativeGeometry } from "../../services/common/geometry.js";
import { resolveRetrieval, toNativeRetrieval } from "../../services/common/retrieval.js";
import { crc32c } from "../../services/common/crc32c.js";
import { mirrorLayout, capacityPages, totalBytes } from "../../services/kvstore/layout.js";
import { prng, randomBytes } from "../helpers/prng.js";

const Engine = loadAddon().Engine;
const hasLayout = typeof Engine === "function" && typeof Engine.layout === "function";
if (!hasLayout) console.warn("layout mirror check skipped: the addon has no Engine.layout");

describe("segment layout", () => {
  it.skipIf(!hasLayout)("mirror equals native ComputeLayout on 200 random shapes", () => {
    const rand = prng(31337);
    const pick = <T>(a: T[]) => a[Math.floor(rand() * a.length)];
    for (let i = 0; i < 200; i++) {
      const kvHeads = pick([1, 2, 4, 8]);
      const g = { layers: 1 + Math.floor(rand() * 40), queryHeads: kvHeads * pick([1, 2, 4, 7]), kvHeads, headDim: pick([16, 64, 96, 128, 256]), kvDtype: pick([1, 2, 3]) };
      const P = pick([8, 16, 32, 64]);
      const r = resolveRetrieval({ pageSize: P, sinkTokens: P * Math.floor(rand() * 8), windowTokens: P * (1 + Math.floor(rand() * 8)), selectTokens: P * (1 + Math.floor(rand() * 64)) } as never, g.layers);
      const cap = capacityPages(1 + Math.floor(rand() * 100000), P);
      const mine = mirrorLayout(g as never, r, cap);
      const native = Engine.layout(toNativeGeometry(g as never), toNativeRetrieval(r), cap) as unknown as Record<string, number>;
      for (const [k, v] of Object.entries(mine)) expect(native[k], `${k} for ${JSON.stringify({ g, P, cap })}`).toBe(v);
      expect(totalBytes(mine)).toBe(mine.storeBytes + 2 * mine.stagingBufferBytes + mine.tailBytes + mine.manifestBytes);
    }
  });

  it("store holds layers x capacity HND pages", () => {
    const g = { layers: 3, queryHeads: 8, kvHeads: 2, headDim: 64, kvDtype: 2 };
    const r = resolveRetrieval(undefined, 3);
    const cap = capacityPages(1000, r.pageSize);
    const l = mirrorLayout(g as never, r, cap);
    expect(cap).toBe(32);
    expect(l.headPageBytes).toBe(2 * 32 * 64 * 2);
    expect(l.pageBytes).toBe(2 * l.headPageBytes);
    expect(l.storeBytes).toBeGreaterThanOrEqual(3 * 32 * l.pageBytes);
    expect(l.storeBytes % 4096).toBe(0);
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
