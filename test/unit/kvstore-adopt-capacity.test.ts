/**
 * A kvstore whose capacity follows the free space of /dev/shm (FREEKV_KVSTORE_CAPACITY_BYTES=0),
 * restarted over sessions it adopts: their memory is missing from the free space measured at the
 * restart and adopt() counts it as used, so the capacity adds it back (config.ts defaultCapacity,
 * KvStore.adopt). The restarted store must admit exactly the new reservations the first one did.
 *
 * In process, as kvstore/main.ts starts: the free space of /dev/shm is a number the test keeps
 * (F0 at the first start; at the restart F0 less what the sessions' segments really hold, their
 * st_blocks), the segments and the directory are real. One session's memory is left partly
 * unallocated before the restart (a background commit its process did not finish): adopt()
 * allocates it out of the free space, so it must count once too. Where the memory limit bounds the
 * capacity instead, the adopted sessions stay counted against it.
 */
import { afterEach, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { loadShm } from "../../native/shm.js";
import { createLogger } from "../../services/common/log.js";
import { defaultCapacity } from "../../services/kvstore/config.js";
import { MemoryDirectory } from "../../services/kvstore/directory.js";
import { KvStore } from "../../services/kvstore/store.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
console.log(`kvstore-adopt-capacity: seed ${seed} (set FREEKV_TEST_SEED to repeat)`);
const rand = prng(seed);
const int = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));

const log = createLogger("test", "silent");
const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 32 } as never;
const EXTENT = 256;
const MiB = 2 ** 20;
/** A probe session's context: its whole reservation is more than any capacity here. */
const PROBE_MAX = 1 << 16;

const stores: KvStore[] = [];
afterEach(async () => {
  for (const s of stores.splice(0).reverse()) await s.shutdown(false);
});

/** A store started as kvstore/main.ts starts one with the default capacity: free space measured, then adopt(). */
async function start(dir: MemoryDirectory, shmFree: number, memoryLimit: number): Promise<{ store: KvStore; adopted: number }> {
  const store = new KvStore(dir, defaultCapacity(0, shmFree, memoryLimit), log, undefined, false, EXTENT);
  stores.push(store);
  const adopted = await store.adopt((bytes) => defaultCapacity(bytes, shmFree, memoryLimit));
  return { store, adopted };
}

/** The largest reservation (tokens) of a new session that `s` admits now; the probe is released after each try. */
async function largestAdmitted(s: KvStore): Promise<number> {
  let k = 0;
  const admits = async (tokens: number) => {
    const id = `probe-${k++}`;
    try {
      await s.attach({ sessionId: id, geometry: G, retrieval: R, maxContextTokens: PROBE_MAX, metadata: Buffer.alloc(0), reserveTokens: tokens });
    } catch (e) {
      if ((e as { code?: number }).code === status.RESOURCE_EXHAUSTED) return false;
      throw e;
    }
    expect(await s.release(id)).toBe(true);
    return true;
  };
  expect(await admits(0), "a session reserving nothing fits").toBe(true);
  expect(await admits(PROBE_MAX), "a probe reserving its whole context does not fit").toBe(false);
  let lo = 0;
  let hi = PROBE_MAX;
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (await admits(mid)) lo = mid;
    else hi = mid;
  }
  return lo;
}

const free = (s: KvStore) => s.stats().capacityBytes - s.stats().reservedBytes;

describe("a kvstore restarted over adopted sessions, its capacity defaulted from /dev/shm", () => {
  for (const bound of ["shm", "memory"] as const) {
    it(`admits exactly the new reservations it admitted before the restart (capacity bounded by ${bound === "shm" ? "the free space of /dev/shm" : "the memory limit"})`, async () => {
      const dir = new MemoryDirectory();
      // shm: F0 of free space and memory to spare; memory: a limit below F0 bounds the capacity.
      const F0 = int(16 * MiB, 24 * MiB);
      const memoryLimit = bound === "shm" ? 2 ** 50 : F0 - int(0, 2 * MiB) + 512 * MiB;
      const first = await start(dir, F0, memoryLimit);
      expect(first.adopted).toBe(0);
      const capacity = first.store.capacityBytes;
      expect(capacity).toBe(bound === "shm" ? F0 : memoryLimit - 512 * MiB);

      // N sessions of random context and reservation.
      const n = int(1, 3);
      const sessions = [];
      for (let i = 0; i < n; i++) {
        const max = int(512, 8192);
        sessions.push(await first.store.attach({ sessionId: `s${i}`, geometry: G, retrieval: R, maxContextTokens: max, metadata: Buffer.from(`m${i}`), reserveTokens: int(1, max) }));
      }
      const reserved = first.store.stats().reservedBytes;
      expect(first.store.allocatedBytes()).toBe(reserved);
      // One session's store loses the last pages of its layer-1 reservation (a commit not finished).
      const v = sessions[int(0, n - 1)];
      const pageBytes = Number(v.layout!.pageBytes);
      const reservedPages = Math.min(Number(v.layout!.capacityPages), Math.ceil(Number(v.reservedTokens) / 16));
      const missing = int(1, reservedPages);
      const seg = loadShm().ShmSegment.open(v.store!.name);
      seg.punch(Number(v.layout!.layerStrideBytes) + (reservedPages - missing) * pageBytes, missing * pageBytes);
      seg.close();
      const held = first.store.allocatedBytes();
      expect(held).toBe(reserved - missing * pageBytes);

      const roomBefore = free(first.store);
      const probeBefore = await largestAdmitted(first.store);
      await first.store.shutdown(true);

      // The restart: /dev/shm has F0 less what the kept segments hold.
      const second = await start(dir, F0 - held, memoryLimit);
      expect(second.adopted).toBe(n);
      expect(second.store.list()).toEqual(sessions.map((s) => s.sessionId));
      expect(second.store.stats().reservedBytes).toBe(reserved);
      // adopt() allocated what was missing.
      expect(second.store.allocatedBytes()).toBe(reserved);
      expect(second.store.capacityBytes).toBe(capacity);
      expect(free(second.store)).toBe(roomBefore);
      expect(await largestAdmitted(second.store)).toBe(probeBefore);
    });
  }
});
