/**
 * CRC32C (Castagnoli), the checksum a committing compute may send for each page so the kvstore
 * can verify that what sits in shared memory is what compute meant to write.
 */
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

export function crc32c(bytes: Uint8Array, seed = 0): number {
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
