/** The kvstore's state machine in process: attach / re-attach, capacity, commit rules, release. */
import { afterEach, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { createLogger } from "../../services/common/log.js";
import { MemoryDirectory } from "../../services/kvstore/directory.js";
import { KvStore, MAX_METADATA_BYTES } from "../../services/kvstore/store.js";
import { MIN_PAGE_BYTES, computeLayout, totalBytes, capacityPages } from "../../services/kvstore/layout.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
import { shmSegments } from "../helpers/services.js";
import { crc32c } from "../../services/common/crc32c.js";
import { loadAddon } from "../../native/binding.js";
import { prng } from "../helpers/prng.js";

const log = createLogger("test", "silent");
const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 32 } as never;
const stores: KvStore[] = [];

afterEach(async () => {
  for (const s of stores.splice(0)) await s.shutdown(false);
});

const req = (sessionId: string, maxContextTokens = 256) => ({ sessionId, geometry: G, retrieval: R, maxContextTokens, metadata: Buffer.from("m") });
const bytesOf = (max: number) => totalBytes(computeLayout(G, resolveRetrieval(R, 2), capacityPages(max, 16)));

describe("KvStore", () => {
  it("re-attach returns the same segments; a different geometry is refused", async () => {
    const s = new KvStore(new MemoryDirectory(), 1 << 30, log);
    stores.push(s);
    const a = await s.attach(req("x"));
    const b = await s.attach({ ...req("x"), geometry: undefined, retrieval: undefined, maxContextTokens: 0 });
    expect(a.created).toBe(true);
    expect(b.created).toBe(false);
    expect(b.store!.name).toBe(a.store!.name);
    expect(b.metadata.toString()).toBe("m");
    await expect(s.attach({ ...req("x"), geometry: { ...G, headDim: 32 } })).rejects.toMatchObject({ code: status.FAILED_PRECONDITION });
  });

  it("an attach whose caller gave up releases what it made before a retry of the same id is answered", async () => {
    const rand = prng(0xa77ac4);
    for (let round = 0; round < 6; round++) {
      const s = new KvStore(new MemoryDirectory(), 1 << 30, log);
      stores.push(s);
      const id = `r${round}`;
      const ac = new AbortController();
      // The first call's caller gives up while its session is being made (the attach awaits the
      // commit of its memory); the retry (same id) is queued behind it on the session's lock.
      const first = s.attach({ ...req(id, 4096), reserveTokens: 1024 + Math.floor(rand() * 2048) }, ac.signal);
      const retry = s.attach({ ...req(id, 4096), reserveTokens: 1024 });
      ac.abort(new Error(`gave up ${round}`));
      await expect(first).rejects.toThrow(`gave up ${round}`);
      const r = await retry;
      // The retry made its own session and it stays: nothing released it after the answer.
      expect(r.created).toBe(true);
      await new Promise((res) => setTimeout(res, 10));
      expect(s.list()).toEqual([id]);
      expect(s.stats().sessions).toBe(1);
      expect(shmSegments().has(r.store!.name)).toBe(true);
    }
  });

  it("a release with a creation token frees only the session its creation made, while nobody opened it since", async () => {
    const s = new KvStore(new MemoryDirectory(), 1 << 30, log);
    stores.push(s);
    // What compute checks before it relies on a token-guarded release.
    expect(s.stats().features).toContain("creation_token");
    const made = await s.attach({ ...req("t1", 65536), reserveTokens: 16, creationToken: "tok-1", createOnly: true });
    expect(made.created).toBe(true);
    // Another token, or none recorded: kept.
    await expect(s.release("t1", "tok-2")).rejects.toMatchObject({ code: status.FAILED_PRECONDITION, message: expect.stringMatching(/not created with this creation_token/) });
    // A CreateSession retry (create_only) answered with the existing session neither opens it nor
    // grows its reservation.
    const before = s.stats().segmentBytes;
    const again = await s.attach({ ...req("t1", 65536), creationToken: "tok-3", createOnly: true, reserveTokens: 65536 });
    expect(again.created).toBe(false);
    expect(again.reservedTokens).toBe(made.reservedTokens);
    expect(s.stats().segmentBytes).toBe(before);
    expect(await s.release("t1", "tok-1")).toBe(true);
    expect(s.list()).toEqual([]);
    expect(shmSegments().has(made.store!.name)).toBe(false);
    // Opened since (a re-attach that is not create_only): kept, and releasable without a token.
    await s.attach({ ...req("t2"), creationToken: "tok-4", createOnly: true });
    await s.attach({ sessionId: "t2" } as never);
    await expect(s.release("t2", "tok-4")).rejects.toMatchObject({ code: status.FAILED_PRECONDITION, message: expect.stringMatching(/opened again/) });
    expect(s.list()).toEqual(["t2"]);
    expect(await s.release("t2")).toBe(true);
    // An unknown id: nothing to do; an oversized token: INVALID_ARGUMENT before anything.
    expect(await s.release("t3", "tok-5")).toBe(false);
    expect(() => s.release("t1", "x".repeat(129))).toThrow(expect.objectContaining({ code: status.INVALID_ARGUMENT }));
    // An id no session can have (empty, too long, a path): INVALID_ARGUMENT, before the directory is asked.
    for (const bad of ["", "x".repeat(129), "../t2", "a/b", "t\n1"])
      expect(() => s.release(bad), JSON.stringify(bad)).toThrow(expect.objectContaining({ code: status.INVALID_ARGUMENT, message: expect.stringMatching(/^session_id: /) }));
    expect(() => s.attach({ ...req("t4"), creationToken: "x".repeat(129) })).toThrow(expect.objectContaining({ code: status.INVALID_ARGUMENT }));
    expect(s.list()).toEqual([]);
  });

  it("commits a new session's memory off the event loop: other work runs while its segments are allocated", async () => {
    // The staging, tail and manifest segments follow the client's geometry (the tail is a page a
    // layer: 512 MiB here): a synchronous fallocate of them held every other call for as long as it
    // took (two thirds of the attach). The longest the event loop is held must be under half of it.
    const s = new KvStore(new MemoryDirectory(), 4 * 2 ** 30, log, undefined, false, 512);
    stores.push(s);
    const big = { layers: 32, queryHeads: 32, kvHeads: 32, headDim: 128, kvDtype: 1 };
    let last = performance.now();
    let longest = 0;
    const tick = setInterval(() => {
      const now = performance.now();
      longest = Math.max(longest, now - last);
      last = now;
    }, 1);
    const t0 = performance.now();
    try {
      const made = await s.attach({ ...req("async"), geometry: big, retrieval: { pageSize: 512, sinkTokens: 512, windowTokens: 512, selectTokens: 512 } as never, maxContextTokens: 2048, reserveTokens: 1 });
      expect(made.tail!.sizeBytes).toBeGreaterThanOrEqual(256 << 20);
    } finally {
      clearInterval(tick);
    }
    const took = performance.now() - t0;
    longest = Math.max(longest, performance.now() - last);
    expect(longest, `the attach took ${took.toFixed(1)} ms; the event loop was held for ${longest.toFixed(1)} ms at most`).toBeLessThan(Math.max(40, took / 2));
  });

  it("metadata past the import limit is refused at attach and commit (a session that could never move)", async () => {
    const s = new KvStore(new MemoryDirectory(), 1 << 30, log);
    stores.push(s);
    const big = Buffer.alloc(MAX_METADATA_BYTES + 1, 7);
    expect(() => s.attach({ ...req("big"), metadata: big })).toThrow(expect.objectContaining({ code: status.INVALID_ARGUMENT, message: expect.stringMatching(/^metadata: must be at most 33554432 bytes/) }));
    expect(s.stats().sessions).toBe(0);
    await s.attach(req("ok"));
    expect(() => s.commitPages({ sessionId: "ok", layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: 0, metadata: big, layers: [] })).toThrow(expect.objectContaining({ code: status.INVALID_ARGUMENT }));
    expect((await s.attach({ sessionId: "ok" } as never)).metadata.toString()).toBe("m");
  });

  it("adopting sessions after a restart: one whose segments are not all there is dropped whole, its survivors unlinked", async () => {
    const dir = new MemoryDirectory();
    const before = new KvStore(dir, 1 << 30, log);
    stores.push(before);
    const x = await before.attach(req("x"));
    const y = await before.attach(req("y"));
    const names = (r: typeof x) => [r.store!.name, r.staging!.name, r.tail!.name, r.manifest!.name];
    // One of x's four segments is lost (say, removed by hand); the next process adopts.
    const lost = names(x)[Math.floor(prng(0xad0)() * 4)];
    loadAddon().ShmSegment.unlink(lost);
    const after = new KvStore(dir, 1 << 30, log);
    stores.push(after);
    expect(await after.adopt()).toBe(1);
    expect(after.list()).toEqual(["y"]);
    const present = shmSegments();
    for (const n of names(x)) expect(present.has(n), n).toBe(false);
    for (const n of names(y)) expect(present.has(n), n).toBe(true);
    expect(await dir.get("x")).toBeUndefined();
  });

  it("refuses a session over the capacity with RESOURCE_EXHAUSTED and accepts it after a release", async () => {
    const one = bytesOf(256);
    const s = new KvStore(new MemoryDirectory(), 2 * one + 1, log);
    stores.push(s);
    await s.attach(req("a"));
    await s.attach(req("b"));
    await expect(s.attach(req("c"))).rejects.toMatchObject({ code: status.RESOURCE_EXHAUSTED });
    expect(s.stats()).toMatchObject({ sessions: 2, segmentBytes: 2 * one });
    const names = Object.values((await s.attach({ sessionId: "a" } as never)) as unknown as Record<string, { name?: string }>)
      .map((v) => v?.name)
      .filter((n): n is string => typeof n === "string" && n.startsWith("/freekv-"));
    expect(names).toHaveLength(4);
    expect(await s.release("a")).toBe(true);
    for (const n of names) expect(shmSegments().has(n)).toBe(false);
    expect(await s.release("a")).toBe(false);
    expect((await s.attach(req("c"))).created).toBe(true);
  });

  it("refuses a session past FREEKV_KVSTORE_MAX_SESSIONS with RESOURCE_EXHAUSTED naming it, whatever the capacity, and accepts it after a release", async () => {
    const rand = prng(0x5e55);
    const max = 2 + Math.floor(rand() * 6);
    const s = new KvStore(new MemoryDirectory(), 1 << 30, log);
    stores.push(s);
    s.maxSessions = max;
    for (let i = 0; i < max; i++) await s.attach(req(`m${i}`));
    const e = await s.attach(req("over")).catch((x: { code: number; message: string }) => x);
    expect(e).toMatchObject({ code: status.RESOURCE_EXHAUSTED, message: `session "over": this kvstore holds ${max} sessions, its limit (FREEKV_KVSTORE_MAX_SESSIONS=${max})` });
    // Re-attaching one held is not a new session.
    expect((await s.attach({ sessionId: "m0" } as never)).created).toBe(false);
    expect(s.stats().sessions).toBe(max);
    expect(await s.release(`m${Math.floor(rand() * max)}`)).toBe(true);
    expect((await s.attach(req("over"))).created).toBe(true);
  });

  it("refuses pages smaller than MIN_PAGE_BYTES (their checksums would outweigh the counted memory), naming the page size", async () => {
    const s = new KvStore(new MemoryDirectory(), 1 << 30, log);
    stores.push(s);
    const tiny = { layers: 2, queryHeads: 1, kvHeads: 1, headDim: 2, kvDtype: 1 };
    const e = await s.attach({ sessionId: "tiny", geometry: tiny, retrieval: { pageSize: 2, sinkTokens: 2, windowTokens: 2, selectTokens: 4 } as never, maxContextTokens: 1 << 20, metadata: Buffer.alloc(0), reserveTokens: 0 }).catch((x: { code: number; message: string }) => x);
    expect(e).toMatchObject({ code: status.INVALID_ARGUMENT, message: `retrieval.page_size: a page of 2 tokens holds 32 bytes of K and V for all KV heads; the kvstore takes pages of at least ${MIN_PAGE_BYTES} bytes` });
    // Twice the tokens a page: 64 bytes, taken.
    expect((await s.attach({ sessionId: "small", geometry: tiny, retrieval: { pageSize: 4, sinkTokens: 4, windowTokens: 4, selectTokens: 8 } as never, maxContextTokens: 64, metadata: Buffer.alloc(0), reserveTokens: 0 })).created).toBe(true);
    expect(s.stats().sessions).toBe(1);
  });

  it("commits in order per layer and keeps the largest context", async () => {
    const s = new KvStore(new MemoryDirectory(), 1 << 30, log);
    stores.push(s);
    await s.attach(req("c", 100));
    expect(await s.commit({ sessionId: "c", layer: 1, firstPage: 0, count: 2, contextTokens: 40, checksums: [], metadata: Buffer.alloc(0), layers: [] })).toBe(2);
    // Re-committing a prefix is idempotent; a gap is not allowed.
    expect(await s.commit({ sessionId: "c", layer: 1, firstPage: 1, count: 1, contextTokens: 40, checksums: [], metadata: Buffer.alloc(0), layers: [] })).toBe(2);
    await expect(s.commit({ sessionId: "c", layer: 0, firstPage: 1, count: 1, contextTokens: 40, checksums: [], metadata: Buffer.alloc(0), layers: [] })).rejects.toMatchObject({ code: status.FAILED_PRECONDITION });
    await expect(s.commit({ sessionId: "c", layer: 0, firstPage: 0, count: 3, contextTokens: 40, checksums: [], metadata: Buffer.alloc(0), layers: [] })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    await expect(s.commit({ sessionId: "c", layer: 0, firstPage: 0, count: 1, contextTokens: 101, checksums: [], metadata: Buffer.alloc(0), layers: [] })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    await expect(s.commit({ sessionId: "c", layer: 0, firstPage: 0, count: 1, contextTokens: 16, checksums: [1, 2], metadata: Buffer.alloc(0), layers: [] })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    expect(s.record("c")!.committedPages).toEqual([0, 2]);
    expect(s.record("c")!.contextTokens).toBe(40);
  });

  it("commits several layers in one call: all checked first, applied together, one directory write", async () => {
    class Counting extends MemoryDirectory {
      puts = 0;
      override async put(rec: Parameters<MemoryDirectory["put"]>[0]) {
        this.puts++;
        return super.put(rec);
      }
    }
    const dir = new Counting();
    const s = new KvStore(dir, 1 << 30, log);
    stores.push(s);
    const a = await s.attach(req("m", 100));
    // Random bytes in the store's first pages of both layers, and their CRC32C.
    const layout = computeLayout(G, resolveRetrieval(R, 2), capacityPages(100, 16));
    const seg = loadAddon().ShmSegment.open(a.store!.name);
    const store = new Uint8Array(seg.buffer());
    const u = prng(777);
    const crc = (layer: number, page: number) => {
      const off = layer * layout.layerStride + page * layout.pageBytes;
      return crc32c(store.subarray(off, off + layout.pageBytes));
    };
    for (const layer of [0, 1])
      for (let p = 0; p < 3; p++) {
        const off = layer * layout.layerStride + p * layout.pageBytes;
        for (let i = 0; i < layout.pageBytes; i++) store[off + i] = Math.floor(u() * 256);
      }
    const base = { sessionId: "m", layer: 0, firstPage: 0, count: 0, checksums: [] as number[], metadata: Buffer.alloc(0) };
    const puts0 = dir.puts;
    const ok = await s.commitPages({ ...base, contextTokens: 40, layers: [{ layer: 1, firstPage: 0, count: 2, checksums: [crc(1, 0), crc(1, 1)] }, { layer: 0, firstPage: 0, count: 1, checksums: [] }] });
    expect(ok).toEqual({ committedPages: 1, layerCommittedPages: [2, 1] });
    expect(dir.puts - puts0).toBe(1);
    expect(s.record("m")!.committedPages).toEqual([1, 2]);
    // One bad entry (a wrong checksum, a gap, a layer twice): nothing of the call is applied.
    const bad = [
      { layers: [{ layer: 0, firstPage: 1, count: 1, checksums: [crc(0, 1)] }, { layer: 1, firstPage: 2, count: 1, checksums: [crc(1, 2) ^ 1] }], code: status.FAILED_PRECONDITION, msg: /layers\[1\]\.checksums\[0\]/ },
      { layers: [{ layer: 0, firstPage: 1, count: 1, checksums: [] }, { layer: 1, firstPage: 3, count: 1, checksums: [] }], code: status.FAILED_PRECONDITION, msg: /layers\[1\]: layer 1: first_page 3 leaves a gap/ },
      { layers: [{ layer: 0, firstPage: 1, count: 1, checksums: [] }, { layer: 0, firstPage: 1, count: 1, checksums: [] }], code: status.INVALID_ARGUMENT, msg: /appears twice/ },
      { layers: [{ layer: 2, firstPage: 0, count: 1, checksums: [] }], code: status.INVALID_ARGUMENT, msg: /layers\[0\]\.layer/ },
    ];
    for (const b of bad) {
      const puts = dir.puts;
      await expect(s.commitPages({ ...base, contextTokens: 48, layers: b.layers })).rejects.toMatchObject({ code: b.code, message: expect.stringMatching(b.msg) });
      expect(dir.puts).toBe(puts);
      expect(s.record("m")!.committedPages).toEqual([1, 2]);
      expect(s.record("m")!.contextTokens).toBe(40);
    }
    // The single-layer fields and `layers` together are refused.
    await expect(s.commitPages({ ...base, layer: 1, contextTokens: 48, layers: [{ layer: 0, firstPage: 1, count: 1, checksums: [] }] })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT, message: expect.stringMatching(/^layers:/) });
    // And the good ones still apply afterwards.
    expect((await s.commitPages({ ...base, contextTokens: 48, layers: [{ layer: 0, firstPage: 1, count: 2, checksums: [crc(0, 1), crc(0, 2)] }, { layer: 1, firstPage: 2, count: 1, checksums: [crc(1, 2)] }] })).layerCommittedPages).toEqual([3, 3]);
    expect(s.record("m")!.contextTokens).toBe(48);
    seg.close();
  });

  it("commits of one session sent together are checked and applied in order (their checksums computed off the main thread)", async () => {
    const s = new KvStore(new MemoryDirectory(), 1 << 30, log);
    stores.push(s);
    const max = 65_536;
    const a = await s.attach(req("big", max));
    await s.reserve("big", max);
    const layout = computeLayout(G, resolveRetrieval(R, 2), capacityPages(max, 16));
    const seg = loadAddon().ShmSegment.open(a.store!.name);
    const u = prng(4242);
    const n = 1000; // pages per commit: over a MiB, so the checksums are split over threads
    const bytes = new Uint8Array(seg.buffer(0, 3 * n * layout.pageBytes));
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(u() * 256);
    const sums = (first: number, count: number) => Array.from({ length: count }, (_, k) => crc32c(bytes.subarray((first + k) * layout.pageBytes, (first + k + 1) * layout.pageBytes)));
    const commit = (first: number, count: number, checksums: number[]) =>
      s.commit({ sessionId: "big", layer: 0, firstPage: first, count, contextTokens: (first + count) * 16, checksums, metadata: Buffer.alloc(0), layers: [] });
    // The second and third leave a gap unless the ones before them were applied first.
    const wrong = sums(2 * n, n);
    wrong[n - 1] ^= 1;
    const results = await Promise.allSettled([commit(0, n, sums(0, n)), commit(n, n, sums(n, n)), commit(2 * n, n, wrong)]);
    expect(results[0]).toEqual({ status: "fulfilled", value: n });
    expect(results[1]).toEqual({ status: "fulfilled", value: 2 * n });
    expect(results[2]).toMatchObject({ status: "rejected", reason: { code: status.FAILED_PRECONDITION, message: expect.stringMatching(new RegExp(`checksums\\[${n - 1}\\]: page ${3 * n - 1} of layer 0`)) } });
    expect(s.record("big")!.committedPages).toEqual([2 * n, 0]);
    expect(await commit(2 * n, n, sums(2 * n, n))).toBe(3 * n);
    seg.close();
  });

  it("a shutdown while a commit's checksums are computed fails that commit with UNAVAILABLE (or it completed first)", async () => {
    const s = new KvStore(new MemoryDirectory(), 1 << 30, log);
    const max = 65_536;
    await s.attach(req("down", max));
    await s.reserve("down", max);
    const pages = capacityPages(max, 16);
    const pending = s.commit({ sessionId: "down", layer: 1, firstPage: 0, count: pages, contextTokens: max, checksums: [], metadata: Buffer.alloc(0), layers: [] });
    await new Promise((r) => setImmediate(r));
    await s.shutdown(false);
    const [r] = await Promise.allSettled([pending]);
    if (r.status === "rejected") expect(r.reason).toMatchObject({ code: status.UNAVAILABLE, message: expect.stringMatching(/closed its segments during the commit/) });
    else expect(r.value).toBe(pages);
  });
});
