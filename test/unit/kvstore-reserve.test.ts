/**
 * Memory that follows the context, in process over real /dev/shm segments: a session's store is
 * backed only as far as its reservation, and what the kvstore counts (reserved_bytes) is what the
 * kernel really allocated (st_blocks), checked after every change on random shapes; reservations
 * grow in extents, never shrink, stop at the capacity (RESOURCE_EXHAUSTED, falling back to exactly
 * what was asked near it), are refused past max_context_tokens; commits past the reservation are
 * refused; released memory is reused.
 *
 * Not here: fallocate failing with ENOSPC (mapped to RESOURCE_EXHAUSTED). On a host whose
 * /dev/shm is larger than its memory, a reservation past the memory meets the OOM killer before
 * ENOSPC; it needs a small private tmpfs (a mount namespace) to test safely.
 */
import { afterEach, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { createLogger } from "../../services/common/log.js";
import { MemoryDirectory } from "../../services/kvstore/directory.js";
import { KvStore, MAX_MAPPED_BYTES } from "../../services/kvstore/store.js";
import { capacityPages, computeLayout } from "../../services/kvstore/layout.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
import { crc32c } from "../../services/common/crc32c.js";
import { loadAddon } from "../../native/binding.js";
import { shmSegments } from "../helpers/services.js";
import { ownerTag } from "../../services/common/process-owner.js";
import { prng } from "../helpers/prng.js";

const log = createLogger("test", "silent");
const stores: KvStore[] = [];
afterEach(async () => {
  for (const s of stores.splice(0)) await s.shutdown(false);
});
const seed = Number(process.env.FREEKV_TEST_SEED) || (Date.now() ^ (process.pid << 10)) >>> 0;
const rand = prng(seed);
const int = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));

/** A random small geometry (float32 K/V) and page size; pages often not a multiple of 4 KiB. */
function randomShape() {
  const kvHeads = int(1, 3);
  const G = { layers: int(1, 5), queryHeads: kvHeads * int(1, 2), kvHeads, headDim: 4 * int(1, 8), kvDtype: 1 };
  const pageSize = [4, 8, 16, 32][int(0, 3)];
  const R = { pageSize, sinkTokens: pageSize, windowTokens: pageSize, selectTokens: 2 * pageSize };
  return { G, R };
}

/**
 * The bytes a session should hold, from first principles: the three small segments (their sizes
 * as made) plus, for the store, the 4 KiB pages that any layer's reserved bytes
 * [l*stride, l*stride + pages*pageBytes) touch, counted once.
 */
function expectedBytes(G: { layers: number }, layout: ReturnType<typeof computeLayout>, pages: number): number {
  const fixed = 2 * layout.stagingBufferBytes + layout.tailBytes + layout.manifestBytes;
  const touched = new Set<number>();
  for (let l = 0; l < G.layers && pages > 0; l++) {
    const a = l * layout.layerStride;
    const b = a + pages * layout.pageBytes;
    for (let p = Math.floor(a / 4096); p < Math.ceil(b / 4096); p++) touched.add(p);
  }
  return fixed + touched.size * 4096;
}

const commit = (sessionId: string, layer: number, firstPage: number, count: number, contextTokens: number, checksums: number[] = []) => ({
  sessionId,
  layer,
  firstPage,
  count,
  contextTokens,
  checksums,
  metadata: Buffer.alloc(0),
  layers: [],
});

describe(`kvstore reservations (seed ${seed})`, () => {
  it("a session with a huge max context commits only its extents; counted bytes equal the real allocation as it grows", async () => {
    for (let trial = 0; trial < 6; trial++) {
      const { G, R } = randomShape();
      const extent = R.pageSize * int(1, 40);
      // Memory committed with fallocate or by write faults from 1-4 threads.
      const commitThreads = int(0, 1) ? 0 : int(1, 4);
      const s = new KvStore(new MemoryDirectory(), Number.MAX_SAFE_INTEGER, log, undefined, false, extent, commitThreads);
      stores.push(s);
      const maxContext = int(200_000, 1_000_000);
      const first = int(1, 3 * extent);
      const a = await s.attach({ sessionId: `h${trial}`, geometry: G, retrieval: R as never, maxContextTokens: maxContext, metadata: Buffer.alloc(0), reserveTokens: first });
      const layout = computeLayout(G, resolveRetrieval(R as never, G.layers, "retrieval", maxContext), capacityPages(maxContext, R.pageSize));
      const check = (tokens: number) => {
        const st = s.stats();
        const pages = Math.ceil(tokens / R.pageSize);
        expect(Number(st.reservedBytes)).toBe(expectedBytes(G, layout, pages));
        expect(Number(st.allocatedBytes)).toBe(Number(st.reservedBytes));
        expect(Number(st.segmentBytes)).toBe(Number(st.reservedBytes));
        // The apparent size is every segment at its full size; the store's share of it is not counted.
        expect(Number(st.apparentBytes)).toBe(layout.storeBytes + 2 * layout.stagingBufferBytes + layout.tailBytes + layout.manifestBytes);
        expect(Number(st.reservedBytes)).toBeLessThan(Number(st.apparentBytes));
      };
      let reserved = Math.ceil(first / extent) * extent;
      expect(a.reservedTokens).toBe(reserved);
      expect(s.reservedTokens(`h${trial}`)).toBe(reserved);
      check(reserved);
      // Growth across extents as a context would; smaller and equal requests change nothing.
      for (let step = 0; step < 6; step++) {
        const want = rand() < 0.3 ? int(0, reserved) : reserved + int(1, 2 * extent);
        const r = await s.reserve(`h${trial}`, want);
        if (want > reserved) reserved = Math.ceil(want / extent) * extent;
        expect(r.reservedTokens).toBe(reserved);
        expect(r.reservedBytes).toBe(expectedBytes(G, layout, Math.ceil(reserved / R.pageSize)));
        check(reserved);
      }
    }
  });

  it("a reservation past the capacity is RESOURCE_EXHAUSTED; near it, exactly the tokens asked for; released memory is reused", async () => {
    const G = { layers: 2, queryHeads: 2, kvHeads: 1, headDim: 32, kvDtype: 1 }; // 4 KiB pages of 16 tokens
    const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 32 } as never;
    const extent = 1024;
    const layout = computeLayout(G, resolveRetrieval(R, 2, "retrieval", 100_000), capacityPages(100_000, 16));
    const bytesAt = (tokens: number) => expectedBytes(G, layout, Math.ceil(tokens / 16));
    // Room for one session at one extent and another at 200 tokens, not at a whole extent.
    const capacity = bytesAt(extent) + bytesAt(200) + 100;
    const s = new KvStore(new MemoryDirectory(), capacity, log, undefined, false, extent);
    stores.push(s);
    const base = { geometry: G, retrieval: R, maxContextTokens: 100_000, metadata: Buffer.alloc(0) };
    expect((await s.attach({ ...base, sessionId: "a", reserveTokens: 10 })).reservedTokens).toBe(extent);
    expect((await s.attach({ ...base, sessionId: "b", reserveTokens: 0 })).reservedTokens).toBe(0);
    // A whole extent does not fit, 200 tokens do: b gets exactly 200 (rounded to pages in memory).
    expect(await s.reserve("b", 200)).toEqual({ reservedTokens: 200, reservedBytes: bytesAt(200) });
    const e = await s.reserve("b", 300).catch((x) => x);
    expect(e).toMatchObject({ code: status.RESOURCE_EXHAUSTED, message: expect.stringMatching(/more bytes of shared memory to reserve 300 tokens/) });
    // Nothing changed by the refusal.
    expect(s.reservedTokens("b")).toBe(200);
    expect(Number(s.stats().allocatedBytes)).toBe(bytesAt(extent) + bytesAt(200));
    await expect(s.attach({ ...base, sessionId: "c", reserveTokens: 1 })).rejects.toMatchObject({ code: status.RESOURCE_EXHAUSTED });
    // Released memory is reused: a's extent goes to b.
    expect(await s.release("a")).toBe(true);
    expect(Number(s.stats().allocatedBytes)).toBe(bytesAt(200));
    expect((await s.reserve("b", 300)).reservedTokens).toBe(extent);
    expect(Number(s.stats().allocatedBytes)).toBe(bytesAt(extent));
    expect(Number(s.stats().reservedBytes)).toBe(bytesAt(extent));
  });

  it("refuses commits past the reservation (FAILED_PRECONDITION) and takes them once reserved; bad requests get their status", async () => {
    const G = { layers: 3, queryHeads: 2, kvHeads: 2, headDim: 12, kvDtype: 1 }; // 3 KiB pages: ranges share OS pages
    const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 32 } as never;
    const s = new KvStore(new MemoryDirectory(), Number.MAX_SAFE_INTEGER, log, undefined, false, 64);
    stores.push(s);
    const a = await s.attach({ sessionId: "p", geometry: G, retrieval: R, maxContextTokens: 4096, metadata: Buffer.alloc(0), reserveTokens: 64 });
    expect(a.reservedTokens).toBe(64); // 4 pages per layer
    const layout = computeLayout(G, resolveRetrieval(R, 3, "retrieval", 4096), capacityPages(4096, 16));
    // Random page contents within the reservation, committed with their CRC32C.
    const seg = loadAddon().ShmSegment.open(a.store!.name);
    const store = new Uint8Array(seg.buffer());
    const fill = (layer: number, page: number) => {
      const off = layer * layout.layerStride + page * layout.pageBytes;
      for (let i = 0; i < layout.pageBytes; i++) store[off + i] = int(0, 255);
      return crc32c(store.subarray(off, off + layout.pageBytes));
    };
    const crcs = [0, 1, 2, 3].map((p) => fill(2, p));
    expect(await s.commit(commit("p", 2, 0, 4, 70, crcs))).toBe(4);
    const past = await s.commit(commit("p", 2, 4, 1, 80)).catch((x) => x);
    expect(past).toMatchObject({ code: status.FAILED_PRECONDITION, message: expect.stringMatching(/reach past the session's reservation of 4 pages \(64 tokens\)/) });
    expect(s.record("p")!.committedPages).toEqual([0, 0, 4]);
    // Reserved: the page is written and committed (its checksum read from memory now backed).
    expect((await s.reserve("p", 65)).reservedTokens).toBe(128);
    const c4 = fill(2, 4);
    expect(await s.commit(commit("p", 2, 4, 1, 80, [c4]))).toBe(5);
    // The pages written before the growth are intact (the growth allocated around them).
    for (let p = 0; p < 4; p++) {
      const off = 2 * layout.layerStride + p * layout.pageBytes;
      expect(crc32c(store.subarray(off, off + layout.pageBytes))).toBe(crcs[p]);
    }
    // Bounds: past max_context_tokens, not an integer, an unknown or malformed session.
    await expect(s.reserve("p", 4097)).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    expect(() => s.reserve("p", 1.5)).toThrow(expect.objectContaining({ code: status.INVALID_ARGUMENT }));
    expect(() => s.reserve("p", -1)).toThrow(expect.objectContaining({ code: status.INVALID_ARGUMENT }));
    await expect(s.reserve("nobody", 10)).rejects.toMatchObject({ code: status.NOT_FOUND });
    expect(() => s.reserve("a b", 10)).toThrow(expect.objectContaining({ code: status.INVALID_ARGUMENT }));
    await expect(s.attach({ sessionId: "q", geometry: G, retrieval: R, maxContextTokens: 100, metadata: Buffer.alloc(0), reserveTokens: 101 })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    // A context past 2^30 pages a layer, or a store past 2^50 bytes, is the request's problem (not INTERNAL), named.
    const huge = { sessionId: "h", geometry: G, metadata: Buffer.alloc(0), reserveTokens: 0 };
    await expect(s.attach({ ...huge, retrieval: { ...(R as object), pageSize: 1, sinkTokens: 1, windowTokens: 1, selectTokens: 2 } as never, maxContextTokens: 2 ** 31 })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT, message: expect.stringMatching(/^max_context_tokens: 2147483648 tokens need 2147483648 pages/) });
    await expect(s.attach({ ...huge, geometry: { layers: 4096, queryHeads: 256, kvHeads: 256, headDim: 256, kvDtype: 1 }, retrieval: R, maxContextTokens: 2 ** 32 - 1 })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    // Within every geometry limit, but 2^65 bytes of store: refused by the native layout, named.
    const widest = { layers: 1024, queryHeads: 1024, kvHeads: 1024, headDim: 1024, kvDtype: 1 };
    await expect(s.attach({ ...huge, geometry: widest, retrieval: R, maxContextTokens: 2 ** 32 - 1 })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT, message: expect.stringMatching(/^max_context_tokens: .*2\^50 bytes/) });
    expect(s.stats().sessions).toBe(1);
    // Stores of huge contexts with nothing reserved: each maps its whole store, and together they
    // map at most MAX_MAPPED_BYTES of address space; the one past it is refused before any segment
    // is made, naming the limit, and fits again once another is released.
    const wide = { layers: 64, queryHeads: 64, kvHeads: 64, headDim: 256, kvDtype: 1 };
    const perToken = wide.layers * wide.kvHeads * wide.headDim * 2 * 4; // K and V in float32 (kvDtype 1)
    const tokens = Math.floor((0.3 * MAX_MAPPED_BYTES) / perToken); // ~0.3 of the bound each
    // This process's segments only: other test files running beside this one make theirs.
    const ours = () => [...shmSegments()].filter((n) => n.startsWith(`/freekv-kv-${ownerTag}-`)).length;
    const segsBefore = ours();
    for (const id of ["w1", "w2", "w3"]) await s.attach({ ...huge, sessionId: id, geometry: wide, retrieval: R, maxContextTokens: tokens });
    await expect(s.attach({ ...huge, sessionId: "w4", geometry: wide, retrieval: R, maxContextTokens: tokens })).rejects.toMatchObject({
      code: status.RESOURCE_EXHAUSTED,
      message: expect.stringMatching(/^session w4 maps \d+ bytes for max_context_tokens \d+; the sessions here map \d+, at most 35184372088832 together/),
    });
    expect(ours()).toBe(segsBefore + 3 * 4);
    await s.release("w2");
    await s.attach({ ...huge, sessionId: "w4", geometry: wide, retrieval: R, maxContextTokens: tokens });
    for (const id of ["w1", "w3", "w4"]) await s.release(id);
    // Asked for at once: the sessions still being made count toward the bound too.
    const ids = ["c1", "c2", "c3", "c4", "c5"];
    const together = await Promise.allSettled(ids.map((id) => s.attach({ ...huge, sessionId: id, geometry: wide, retrieval: R, maxContextTokens: tokens })));
    expect(together.filter((r) => r.status === "fulfilled").length).toBe(3);
    for (const r of together) if (r.status === "rejected") expect(r.reason).toMatchObject({ code: status.RESOURCE_EXHAUSTED });
    for (const [i, r] of together.entries()) if (r.status === "fulfilled") await s.release(ids[i]);
    // One alone past the bound can never fit: the request's problem, not a shortage to wait out.
    await expect(s.attach({ ...huge, sessionId: "w5", geometry: wide, retrieval: R, maxContextTokens: Math.ceil((1.05 * MAX_MAPPED_BYTES) / perToken) })).rejects.toMatchObject({
      code: status.INVALID_ARGUMENT,
      message: expect.stringMatching(/^max_context_tokens: .*can never fit/),
    });
    expect(s.stats().sessions).toBe(1);
    // Re-attach with reserve_tokens grows the reservation like ReserveContext.
    expect((await s.attach({ sessionId: "p", geometry: undefined, retrieval: undefined, maxContextTokens: 0, metadata: Buffer.alloc(0), reserveTokens: 1000 })).reservedTokens).toBe(1024);
    expect(Number(s.stats().allocatedBytes)).toBe(Number(s.stats().reservedBytes));
    seg.close();
  });
  it("commits a reservation's memory off the event loop, counted before it starts", async () => {
    // float32 K/V, 4 layers x 4 KV heads x 128: 16 KiB a token, so 16384 tokens are 256 MiB.
    const G = { layers: 4, queryHeads: 8, kvHeads: 4, headDim: 128, kvDtype: 1 };
    const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 32 } as never;
    const tokens = 16384 + int(0, 15) * 16;
    const layout = computeLayout(G, resolveRetrieval(R, G.layers, "retrieval", tokens), capacityPages(tokens, 16));
    const one = expectedBytes(G, layout, capacityPages(tokens, 16));
    // Room for one such session and a half: of two made at once, exactly one fits.
    const s = new KvStore(new MemoryDirectory(), Math.floor(one * 1.5), log, undefined, false, 16, int(0, 1) ? 0 : int(1, 8));
    stores.push(s);
    const attach = (id: string) => s.attach({ sessionId: id, geometry: G, retrieval: R, maxContextTokens: tokens, metadata: Buffer.alloc(0), reserveTokens: tokens });
    // The event loop turns while the memory is committed: an immediate queued before the call runs
    // before the call resolves (a synchronous fallocate of 256 MiB would come first).
    let turned = false;
    setImmediate(() => (turned = true));
    const [a, b] = await Promise.allSettled([attach("x"), attach("y")]);
    expect(turned).toBe(true);
    const ok = [a, b].filter((r) => r.status === "fulfilled");
    const refused = [a, b].filter((r): r is PromiseRejectedResult => r.status === "rejected");
    expect(ok).toHaveLength(1);
    expect(refused).toHaveLength(1);
    expect(refused[0].reason).toMatchObject({ code: status.RESOURCE_EXHAUSTED });
    const st = s.stats();
    expect(Number(st.reservedBytes)).toBe(one);
    expect(Number(st.allocatedBytes)).toBe(one);
    // A growth is counted before its allocation too: two concurrent growths of two sessions
    // that each fit alone leave the store within its capacity.
    const id = ok[0] === a ? "x" : "y";
    await s.release(id);
    expect(Number(s.stats().reservedBytes)).toBe(0);
    const small = { geometry: G, retrieval: R, maxContextTokens: tokens, metadata: Buffer.alloc(0), reserveTokens: 16 };
    await s.attach({ sessionId: "g1", ...small });
    await s.attach({ sessionId: "g2", ...small });
    const grown = await Promise.allSettled([s.reserve("g1", tokens), s.reserve("g2", tokens)]);
    expect(grown.filter((r) => r.status === "fulfilled")).toHaveLength(1);
    expect(Number(s.stats().reservedBytes)).toBeLessThanOrEqual(s.capacityBytes);
    expect(Number(s.stats().allocatedBytes)).toBe(Number(s.stats().reservedBytes));
  });
  it("caller_commits: the reservation is counted at once and its memory committed in the background; a release stops it", async () => {
    const G = { layers: int(1, 4), queryHeads: 8, kvHeads: 4, headDim: 128, kvDtype: 1 };
    const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 32 } as never;
    const tokens = 4096 * int(2, 6);
    const layout = computeLayout(G, resolveRetrieval(R, G.layers, "retrieval", tokens), capacityPages(tokens, 16));
    const full = expectedBytes(G, layout, capacityPages(tokens, 16));
    const s = new KvStore(new MemoryDirectory(), Math.floor(full * 1.5), log, undefined, false, 16, int(0, 1) ? 0 : int(1, 4));
    stores.push(s);
    const req = (id: string, reserveTokens: number) => ({ sessionId: id, geometry: G, retrieval: R, maxContextTokens: tokens, metadata: Buffer.alloc(0), reserveTokens, callerCommits: true });
    await s.attach(req("a", tokens));
    // Counted before any memory is there: a second one does not fit.
    expect(Number(s.stats().reservedBytes)).toBe(full);
    await expect(s.attach(req("b", tokens))).rejects.toMatchObject({ code: status.RESOURCE_EXHAUSTED });
    await s.backgroundCommits();
    expect(Number(s.stats().allocatedBytes)).toBe(full);
    // A growth too; then a release while a background commit may still run leaves nothing behind.
    await s.attach(req("c", 16));
    const small = expectedBytes(G, layout, 1);
    expect(Number(s.stats().reservedBytes)).toBe(full + small);
    await s.release("a");
    const grown = await s.reserve("c", tokens, true);
    expect(grown.reservedTokens).toBe(tokens);
    expect(Number(s.stats().reservedBytes)).toBe(full);
    await s.release("c");
    await s.backgroundCommits();
    expect(Number(s.stats().reservedBytes)).toBe(0);
    expect(Number(s.stats().allocatedBytes)).toBe(0);
  });
});
