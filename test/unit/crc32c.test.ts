/**
 * The native CRC32C (native/src/shm/Crc32c.h, the checksum of commits and of the scrubber) against
 * the JavaScript definition on random bytes of random lengths, offsets and seeds, and the
 * standard check value. ShmSegment.crc32cPages and crc32cPagesAsync (split over threads for many
 * pages, the async one off the main thread) against each other and the JavaScript definition, their
 * argument errors, and close() while the asynchronous one runs.
 */
import { afterEach, describe, expect, it } from "vitest";
import { loadAddon } from "../../native/binding.js";
import { loadShm, type ShmSegment, type ShmSegmentStatic } from "../../native/shm.js";
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

// Mirrors native/src/shm/Crc32c.h: below this many pages, or under 2 MiB in all, one thread.
const THREAD_MIN_PAGES = 64;

const segs: { seg: ShmSegment; name: string; Seg: ShmSegmentStatic }[] = [];
afterEach(() => {
  for (const { seg, name, Seg } of segs.splice(0)) {
    try {
      seg.close();
    } catch {
      // closed by the test
    }
    Seg.unlink(name);
  }
});

/** A segment of `size` bytes of seeded random data (no zero runs), unlinked after the test. */
function randomSegment(Seg: ShmSegmentStatic, size: number): { seg: ShmSegment; bytes: Uint8Array } {
  const name = `/fkv-crc-test-${process.pid}-${Math.floor(rand() * 1e9).toString(36)}`;
  const seg = Seg.create(name, size);
  segs.push({ seg, name, Seg });
  const bytes = new Uint8Array(seg.buffer());
  const words = new Uint32Array(seg.buffer(), 0, size >> 2);
  for (let i = 0; i < words.length; i++) words[i] = Math.floor(rand() * 2 ** 32);
  for (let i = words.length * 4; i < size; i++) bytes[i] = Math.floor(rand() * 256);
  return { seg, bytes };
}

/** The JavaScript checksums of `count` pages of `page` bytes from `off`. */
function jsPages(bytes: Uint8Array, off: number, page: number, count: number): number[] {
  const out: number[] = [];
  for (let k = 0; k < count; k++) out.push(crc32cJs(bytes.subarray(off + k * page, off + (k + 1) * page)));
  return out;
}

/** The error a call throws synchronously (undefined when it does not throw). */
function thrown(f: () => unknown): Error | undefined {
  try {
    f();
  } catch (e) {
    return e as Error;
  }
  return undefined;
}

const addons: [string, () => ShmSegmentStatic][] = [
  ["freekv_shm", () => loadShm().ShmSegment],
  ["freekv", () => loadAddon().ShmSegment],
];

describe.each(addons)("ShmSegment page checksums (%s)", (_, segments) => {
  it("crc32cPagesAsync equals crc32cPages and the JavaScript definition, below and above the threading threshold", async () => {
    const Seg = segments();
    const size = (8 << 20) + 1 + Math.floor(rand() * 4096); // over the 2 MiB two threads need
    const { seg, bytes } = randomSegment(Seg, size);
    const cases: { off: number; page: number; count: number }[] = [];
    // Few pages (one thread), a threshold's worth of small pages (one thread: too few bytes),
    // many odd-sized pages over several MiB (several threads), one page, and the whole segment.
    cases.push({ off: Math.floor(rand() * 100), page: 1 + Math.floor(rand() * 5000), count: 1 + Math.floor(rand() * (THREAD_MIN_PAGES - 1)) });
    cases.push({ off: 3, page: 1001, count: THREAD_MIN_PAGES });
    const page = 16_384 + 1 + 2 * Math.floor(rand() * 2000);
    cases.push({ off: 7, page, count: Math.floor((size - 7) / page) });
    cases.push({ off: 1, page: 65_537, count: THREAD_MIN_PAGES + 1 + Math.floor(rand() * 50) });
    cases.push({ off: 0, page: 131_071, count: Math.floor(size / 131_071) });
    cases.push({ off: 0, page: size, count: 1 });
    cases.push({ off: size - 3, page: 3, count: 1 });
    for (const c of cases) {
      const tag = `${why}: offset ${c.off}, pageBytes ${c.page}, count ${c.count}`;
      expect(c.off + c.page * c.count, tag).toBeLessThanOrEqual(size);
      const sync = seg.crc32cPages(c.off, c.page, c.count);
      const pending = seg.crc32cPagesAsync(c.off, c.page, c.count);
      expect(pending, tag).toBeInstanceOf(Promise);
      const got = await pending;
      expect(got, tag).toBeInstanceOf(Uint32Array);
      expect(got, tag).toHaveLength(c.count);
      const js = jsPages(bytes, c.off, c.page, c.count);
      expect(Array.from(sync), tag).toEqual(js);
      expect(Array.from(got), tag).toEqual(js);
      // The module-level function over the same bytes agrees too.
      expect(Array.from(crc32cPages(bytes, c.off, c.page, c.count)), tag).toEqual(js);
    }
    // Several at once on one segment, each its own range.
    const all = await Promise.all(cases.map((c) => seg.crc32cPagesAsync(c.off, c.page, c.count)));
    for (const [i, c] of cases.entries()) expect(Array.from(all[i]), why).toEqual(Array.from(seg.crc32cPages(c.off, c.page, c.count)));
    // A flipped bit changes exactly its page's checksum, in both.
    const c = cases[2];
    const before = seg.crc32cPages(c.off, c.page, c.count);
    const k = Math.floor(rand() * c.count);
    bytes[c.off + k * c.page + Math.floor(rand() * c.page)] ^= 1 << Math.floor(rand() * 8);
    const [afterSync, afterAsync] = [seg.crc32cPages(c.off, c.page, c.count), await seg.crc32cPagesAsync(c.off, c.page, c.count)];
    for (let j = 0; j < c.count; j++) {
      expect(afterSync[j] !== before[j], why).toBe(j === k);
      expect(afterAsync[j], why).toBe(afterSync[j]);
    }
  });

  it("crc32cPagesAsync checks its arguments at the call, with crc32cPages' errors", async () => {
    const Seg = segments();
    const { seg } = randomSegment(Seg, 10_000);
    const bad: unknown[][] = [
      [0, 1000, 11], // past the end
      [9_001, 1000, 1],
      [10_001, 1, 1],
      [0, 0, 1], // pageBytes 0
      [-1, 100, 1],
      [0.5, 100, 1],
      [0, 100.5, 1],
      [0, 1, -1],
      [0, 1, 2 ** 30 + 1],
      [0, 1, Number.NaN],
      ["0", 1, 1],
      [0, undefined, 1],
      [0, 1],
      [],
    ];
    for (const args of bad) {
      const a = args as [number, number, number];
      const e1 = thrown(() => seg.crc32cPages(...a));
      const e2 = thrown(() => seg.crc32cPagesAsync(...a));
      expect(e1, `crc32cPages(${args.join(", ")})`).toBeDefined();
      expect(e2, `crc32cPagesAsync(${args.join(", ")})`).toBeDefined();
      expect(e2!.constructor, `crc32cPagesAsync(${args.join(", ")})`).toBe(e1!.constructor);
      expect(e2!.message).toBe(e1!.message);
    }
    // count 0 asks for nothing, wherever it starts.
    expect(await seg.crc32cPagesAsync(10_000, 7, 0)).toHaveLength(0);
    expect(await seg.crc32cPagesAsync(50_000, 0, 0)).toHaveLength(0);
    expect(Array.from(await seg.crc32cPagesAsync(9_000, 1000, 1))).toEqual(Array.from(seg.crc32cPages(9_000, 1000, 1)));
    seg.close();
    expect(() => seg.crc32cPages(0, 100, 1)).toThrow(/closed/);
    expect(() => seg.crc32cPagesAsync(0, 100, 1)).toThrow(/closed/);
  });

  it("close() while crc32cPagesAsync runs rejects it (or it finished first, with the right values); nothing crashes", async () => {
    const Seg = segments();
    const size = 32 << 20;
    for (const waitFirst of [false, true]) {
      const { seg } = randomSegment(Seg, size);
      const page = 4099;
      const count = Math.floor(size / page);
      const expected = Array.from(seg.crc32cPages(0, page, count));
      const pending = [0, 1, 2, 3].map(() => seg.crc32cPagesAsync(0, page, count));
      // Closed at once (as the workers start) or a turn of the event loop later (while they run).
      if (waitFirst) await new Promise((r) => setImmediate(r));
      const buf = seg.buffer(0, 16);
      seg.close();
      expect(buf.byteLength).toBe(0);
      for (const r of await Promise.allSettled(pending)) {
        if (r.status === "fulfilled") expect(Array.from(r.value)).toEqual(expected);
        else expect((r.reason as Error).message).toMatch(/was closed while its page checksums were computed/);
      }
    }
    // The process carries on: a fresh segment checksums as before.
    const { seg, bytes } = randomSegment(Seg, 1 << 16);
    expect(Array.from(await seg.crc32cPagesAsync(0, 4096, 16))).toEqual(jsPages(bytes, 0, 4096, 16));
  });

  it("the event loop keeps turning while crc32cPagesAsync runs", async () => {
    const Seg = segments();
    const size = 64 << 20;
    const { seg } = randomSegment(Seg, size);
    // Turns of the event loop that ran before the checksums were in (none when they block it).
    let turns = 0;
    let done = false;
    const pending = seg.crc32cPagesAsync(0, 65_536, size / 65_536).then((v) => {
      done = true;
      return v;
    });
    while (!done) {
      await new Promise((r) => setImmediate(r));
      if (!done) turns++;
    }
    const sums = await pending;
    expect(turns).toBeGreaterThan(0);
    expect(Array.from(sums)).toEqual(Array.from(seg.crc32cPages(0, 65_536, size / 65_536)));
  });
});
