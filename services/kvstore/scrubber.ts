/**
 * Integrity of committed pages. A page the kvstore accepted stays in shared memory for the whole
 * session and is read back (recalled) at many later decode steps; a flipped bit there (a stray
 * write by another process mapping the segment, a faulty DIMM) would otherwise be attended
 * silently. So:
 *
 * - at every commit the kvstore checksums the newly committed pages itself (CRC32C, natively,
 *   through the segment's mapping: ShmSegment.crc32cPages), compares them with the checksums compute sent (when it sent them),
 *   and keeps them here;
 * - a scrubber re-reads committed pages continuously at a bounded rate (FREEKV_SCRUB_BYTES_PER_S,
 *   in slices of a tenth of that every 100 ms, so the event loop is never held for long) and
 *   compares;
 * - a mismatch marks the session corrupt (KvStore.markCorrupt): the kvstore answers DATA_LOSS for
 *   it from then on and writes a corrupt marker into the session's manifest, which compute checks
 *   at the start of every turn and which makes any re-attach fail; compute then answers DATA_LOSS
 *   for the session (never a generation over the bad page), logs it and counts it.
 *
 * Checksums are kept per layer as a prefix [0, known) that the passes compare, and commits past
 * that prefix (a session adopted after a restart or imported, whose earlier pages the first pass
 * has not reached yet) wait beside it until the pass reaches their pages and compares them there:
 * a commit's checksum is never dropped. An export verifies the pages it sent (`verify`), and an
 * import records the checksums of what it verified, so a moved session is compared from its
 * first pass on the new kvstore.
 *
 * What this does not cover, and says so: the window between a corruption and the scrubber's next
 * pass over that page (a full pass over B bytes of committed pages takes B / rate seconds:
 * freekv_kvstore_scrub_pass_seconds); the partial page of each layer (the tail segment, rewritten
 * at every step); and the pages a restarted kvstore adopted (their checksums are not persisted:
 * the first pass records them, later passes compare).
 */
import type { ShmSegment } from "../../native/shm.js";
import type { Logger } from "../common/log.js";
import type { KvStoreMetrics } from "./metrics.js";

/** One live session as the scrubber reads it. */
export interface ScrubSession {
  id: string;
  /** Committed full pages per layer. */
  committed: readonly number[];
  pageBytes: number;
  layerStride: number;
  /** The store segment (read through its mapping: it may be larger than a JS buffer can cover). */
  store: Pick<ShmSegment, "crc32cPages">;
}

export interface ScrubHost {
  scrubSessions(): ScrubSession[];
  markCorrupt(id: string, layer: number, page: number, got: number, expected: number): void;
}

interface Sums {
  /** Per layer, the checksums of pages [0, known[layer]). */
  sums: Uint32Array[];
  known: number[];
  /** Per layer, commits' checksums of pages at or past known[layer] (page -> CRC32C). */
  ahead: Map<number, number>[];
}

/** A page whose bytes no longer match the checksum taken at its commit. */
export interface Mismatch {
  layer: number;
  page: number;
  got: number;
  expected: number;
}

export class Scrubber {
  private readonly sessions = new Map<string, Sums>();
  private cursor = { id: "", layer: 0, page: 0 };
  private timer: NodeJS.Timeout | undefined;
  private passStarted = Date.now();
  private passBytes = 0;
  private lastErrorAt = 0;

  constructor(
    private readonly host: ScrubHost,
    private readonly opts: { bytesPerSecond: number; log: Logger; metrics?: KvStoreMetrics },
  ) {}

  /** The checksums of pages [firstPage, firstPage + sums.length) of a layer, as committed. */
  record(id: string, layers: number, layer: number, firstPage: number, sums: Uint32Array): void {
    let s = this.sessions.get(id);
    if (!s) {
      s = { sums: Array.from({ length: layers }, () => new Uint32Array(0)), known: new Array<number>(layers).fill(0), ahead: Array.from({ length: layers }, () => new Map()) };
      this.sessions.set(id, s);
    }
    const known = s.known[layer];
    const ahead = s.ahead[layer];
    // Past the prefix (an adopted or imported session the pass has not reached): kept aside, and
    // compared when the pass reaches those pages. A page's first checksum wins (a retried commit).
    if (firstPage > known) {
      sums.forEach((c, k) => {
        if (!ahead.has(firstPage + k)) ahead.set(firstPage + k, c);
      });
      return;
    }
    const end = firstPage + sums.length;
    if (end <= known) return;
    let arr = s.sums[layer];
    if (arr.length < end) {
      const grown = new Uint32Array(Math.max(end, arr.length * 2, 64));
      grown.set(arr.subarray(0, known));
      arr = s.sums[layer] = grown;
    }
    for (let p = known; p < end; p++) {
      const first = ahead.get(p);
      arr[p] = first ?? sums[p - firstPage];
      if (first !== undefined) ahead.delete(p);
    }
    s.known[layer] = end;
    // Pages kept aside that now continue the prefix join it.
    for (let p = end; ahead.has(p); p++) {
      if (arr.length <= p) {
        const grown = new Uint32Array(Math.max(p + 1, arr.length * 2));
        grown.set(arr.subarray(0, p));
        arr = s.sums[layer] = grown;
      }
      arr[p] = ahead.get(p)!;
      ahead.delete(p);
      s.known[layer] = p + 1;
    }
  }

  /** The checksum a commit gave page `page` of a layer, if one is kept. */
  private expected(s: Sums | undefined, layer: number, page: number): number | undefined {
    if (!s) return undefined;
    return page < s.known[layer] ? s.sums[layer][page] : s.ahead[layer].get(page);
  }

  /**
   * Compares the checksums of pages [firstPage, firstPage + got.length) of a layer, read now, with
   * those kept for them; the first page that differs is reported as the scrubber reports one
   * (logged, counted, the session marked corrupt) and returned. Pages without a kept checksum are
   * not compared.
   */
  verify(id: string, layer: number, firstPage: number, got: Uint32Array): Mismatch | undefined {
    const s = this.sessions.get(id);
    for (let k = 0; k < got.length; k++) {
      const expected = this.expected(s, layer, firstPage + k);
      if (expected !== undefined && expected !== got[k]) {
        const m = { layer, page: firstPage + k, got: got[k], expected };
        this.corrupt(id, m);
        return m;
      }
    }
    return undefined;
  }

  private corrupt(id: string, m: Mismatch): void {
    this.opts.metrics?.corruptPages.inc();
    this.opts.log.error({ session: id, layer: m.layer, page: m.page, crc: m.got.toString(16), expected: m.expected.toString(16) }, "scrubber: a committed page no longer matches its checksum");
    this.host.markCorrupt(id, m.layer, m.page, m.got, m.expected);
    this.sessions.delete(id);
  }

  forget(id: string): void {
    this.sessions.delete(id);
  }

  start(): void {
    if (this.opts.bytesPerSecond <= 0 || this.timer) return;
    this.timer = setInterval(() => {
      try {
        this.scrub(Math.max(1, Math.floor(this.opts.bytesPerSecond / 10)));
      } catch (e) {
        this.sliceFailed(e);
      }
    }, 100);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /**
   * Checks up to `budget` bytes of committed pages, continuing where the previous call stopped
   * (sessions in id order, layers, pages). Returns the bytes read. Pages without a recorded
   * checksum (an adopted session) get one recorded instead.
   */
  scrub(budget: number): number {
    const live = this.host.scrubSessions().sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    if (live.length === 0) return 0;
    const ids = new Set(live.map((s) => s.id));
    for (const id of this.sessions.keys()) if (!ids.has(id)) this.sessions.delete(id);
    let read = 0;
    let visited = 0;
    let i = live.findIndex((s) => s.id >= this.cursor.id);
    if (i < 0) i = 0;
    if (live[i].id !== this.cursor.id) this.cursor = { id: live[i].id, layer: 0, page: 0 };
    while (read < budget && visited <= live.length) {
      const s = live[i];
      const { layer, page } = this.cursor;
      if (layer >= s.committed.length) {
        i = (i + 1) % live.length;
        visited++;
        if (i === 0) this.passDone();
        this.cursor = { id: live[i].id, layer: 0, page: 0 };
        continue;
      }
      const end = s.committed[layer];
      if (page >= end) {
        this.cursor = { id: s.id, layer: layer + 1, page: 0 };
        continue;
      }
      const count = Math.max(1, Math.min(end - page, Math.floor((budget - read) / s.pageBytes)));
      let got: Uint32Array;
      try {
        got = s.store.crc32cPages(layer * s.layerStride + page * s.pageBytes, s.pageBytes, count);
      } catch (e) {
        // This session cannot be read now (released meanwhile, its segment closed): the pass goes
        // on with the next one instead of stopping at it forever.
        this.sliceFailed(e, s.id);
        this.cursor = { id: s.id, layer: s.committed.length, page: 0 };
        continue;
      }
      read += count * s.pageBytes;
      const sums = this.sessions.get(s.id);
      const known = sums ? sums.known[layer] : 0;
      let bad = false;
      for (let k = 0; k < count; k++) {
        const expected = this.expected(sums, layer, page + k);
        if (expected !== undefined && got[k] !== expected) {
          bad = true;
          this.corrupt(s.id, { layer, page: page + k, got: got[k], expected });
          this.cursor = { id: s.id, layer: s.committed.length, page: 0 };
          break;
        }
      }
      if (!bad && page + count > known) this.record(s.id, s.committed.length, layer, page, got);
      if (this.cursor.id === s.id && this.cursor.layer === layer) this.cursor = { id: s.id, layer, page: page + count };
    }
    this.passBytes += read;
    this.opts.metrics?.scrubbedBytes.inc(read);
    return read;
  }

  /** Reported once a minute at most (a slice runs ten times a second). */
  private sliceFailed(e: unknown, session?: string): void {
    const now = Date.now();
    if (now - this.lastErrorAt <= 60_000) return;
    this.lastErrorAt = now;
    this.opts.log.error({ err: (e as Error).message, session }, "scrubber slice failed");
  }

  private passDone(): void {
    const now = Date.now();
    this.opts.metrics?.scrubPassSeconds.set((now - this.passStarted) / 1000);
    this.opts.log.debug({ bytes: this.passBytes, seconds: (now - this.passStarted) / 1000 }, "scrubber: pass over every committed page done");
    this.passStarted = now;
    this.passBytes = 0;
  }
}
