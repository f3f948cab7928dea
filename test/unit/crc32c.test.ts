/**
 * The native CRC32C (native/src/shm/Crc32c.h, the checksum of commits and of the scrubber) against
 * the JavaScript definition on random bytes of random lengths, offsets and seeds, and the
 * standard check value.
 */
import { describe, expect, it } from "vitest";
import { loadShm } from "../../native/shm.js";
import { crc32c, crc32cJs, crc32cNative, crc32cPages } from "../../services/common/crc32c.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
const rand = prng(seed);
const why = `seed ${seed} (FREEKV_TEST_SEED)`;

function randomBytes(n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(rand() * 256);
  return b;
}

describe("CRC32C", () => {
  it("runs natively here", () => {
    expect(crc32cNative()).toBe(true);
  });

  it("gives the standard check value: crc32c('123456789') = 0xe3069283", () => {
    const b = new TextEncoder().encode("123456789");
    expect(crc32cJs(b)).toBe(0xe3069283);
    expect(crc32c(b)).toBe(0xe3069283);
  });

  it("native equals the JavaScript definition on random bytes, lengths, unaligned views and seeds", () => {
    const buf = randomBytes(70_000);
    for (let t = 0; t < 300; t++) {
      const off = Math.floor(rand() * 64);
      const len = t < 20 ? t : Math.floor(rand() * (buf.length - off));
      const view = buf.subarray(off, off + len);
      const s = rand() < 0.5 ? 0 : Math.floor(rand() * 2 ** 32);
      expect(crc32c(view, s), why).toBe(crc32cJs(view, s));
    }
    // Continuing from a seed is a checksum of the concatenation.
    const a = buf.subarray(0, 12_345), b = buf.subarray(12_345, 40_000);
    expect(crc32c(b, crc32c(a))).toBe(crc32cJs(buf.subarray(0, 40_000)));
  });

  it("crc32cPages: one checksum per page, each equal to the JavaScript one; bounds checked", () => {
    const page = 1 + Math.floor(rand() * 4000);
    const count = 1 + Math.floor(rand() * 20);
    const off = Math.floor(rand() * 100);
    const buf = randomBytes(off + page * count + Math.floor(rand() * 50));
    const sums = crc32cPages(buf, off, page, count);
    expect(sums).toHaveLength(count);
    for (let k = 0; k < count; k++) expect(sums[k], why).toBe(crc32cJs(buf.subarray(off + k * page, off + (k + 1) * page)));
    // A flipped bit changes exactly its page's checksum.
    const k = Math.floor(rand() * count);
    buf[off + k * page + Math.floor(rand() * page)] ^= 1 << Math.floor(rand() * 8);
    const after = crc32cPages(buf, off, page, count);
    for (let j = 0; j < count; j++) expect(after[j] !== sums[j], why).toBe(j === k);
    const shm = loadShm();
    expect(() => shm.crc32cPages(buf, off, page, count + 1000)).toThrow(RangeError);
    expect(() => shm.crc32cPages(buf, -1, page, 1)).toThrow(RangeError);
    expect(() => shm.crc32cPages(buf, 0, 0, 1)).toThrow(RangeError);
    expect(() => shm.crc32cPages(buf, 0.5, page, 1)).toThrow(RangeError);
    expect(() => shm.crc32cPages("x" as never, 0, 1, 1)).toThrow(TypeError);
    expect(shm.crc32cPages(buf, buf.length, page, 0)).toHaveLength(0);
  });
});
