/**
 * CRC32C (Castagnoli), the checksum compute sends for each page it commits, that the kvstore
 * verifies at the commit and its scrubber re-checks later (services/kvstore/scrubber.ts).
 * `crc32c` and `crc32cPages` run natively (the shm addon, on the CPU's crc32 instruction: 6 GiB/s
 * measured on the development machine), so checksumming the pages of a commit
 * costs the event loop little; `crc32cJs` is the independent JavaScript definition the tests
 * compare against, and the fallback where the addon is not built.
 */
import { loadShm, type ShmAddon } from "../../native/shm.js";

let native: ShmAddon | null | undefined;
function nativeAddon(): ShmAddon | null {
  if (native === undefined) {
    try {
      const a = loadShm();
      native = typeof a.crc32cPages === "function" ? a : null;
    } catch {
      native = null;
    }
  }
  return native;
}

/** Whether crc32c and crc32cPages run natively. */
export function crc32cNative(): boolean {
  return nativeAddon() !== null;
}

export function crc32c(bytes: Uint8Array, seed = 0): number {
  const a = nativeAddon();
  return a ? a.crc32c(bytes, seed) : crc32cJs(bytes, seed);
}

/** The CRC32C of each of `count` pages of `pageBytes` bytes from `byteOffset` of `bytes`. */
export function crc32cPages(bytes: Uint8Array, byteOffset: number, pageBytes: number, count: number): Uint32Array {
  const a = nativeAddon();
  if (a) return a.crc32cPages(bytes, byteOffset, pageBytes, count);
  if (byteOffset + pageBytes * count > bytes.length) throw new RangeError("pages run past the end of bytes");
  const out = new Uint32Array(count);
  for (let i = 0; i < count; i++) out[i] = crc32cJs(bytes.subarray(byteOffset + i * pageBytes, byteOffset + (i + 1) * pageBytes));
  return out;
}
const TABLE = (() => {
  const t = new Uint32Array(256 * 8);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  // Slicing-by-8 tables.
  for (let i = 0; i < 256; i++) {
    let c = t[i];
    for (let s = 1; s < 8; s++) {
      c = t[c & 0xff] ^ (c >>> 8);
      t[s * 256 + i] = c >>> 0;
    }
  }
  return t;
})();

/** The JavaScript definition (slicing-by-8). */
export function crc32cJs(bytes: Uint8Array, seed = 0): number {
  let crc = ~seed >>> 0;
  let i = 0;
  const n = bytes.length;
  for (; i + 8 <= n; i += 8) {
    const a = (crc ^ (bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24))) >>> 0;
    crc =
      TABLE[7 * 256 + (a & 0xff)] ^
      TABLE[6 * 256 + ((a >>> 8) & 0xff)] ^
      TABLE[5 * 256 + ((a >>> 16) & 0xff)] ^
      TABLE[4 * 256 + (a >>> 24)] ^
      TABLE[3 * 256 + bytes[i + 4]] ^
      TABLE[2 * 256 + bytes[i + 5]] ^
      TABLE[1 * 256 + bytes[i + 6]] ^
      TABLE[bytes[i + 7]];
  }
  for (; i < n; i++) crc = TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return ~crc >>> 0;
}
