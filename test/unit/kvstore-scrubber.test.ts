/**
 * The kvstore's integrity checks in process: commits checksum their pages, the scrubber re-reads
 * committed pages and finds a flipped bit in any of them, the session then answers DATA_LOSS and
 * its manifest carries the corrupt marker; pages not yet committed are never judged; a scrubber
 * that starts without checksums (an adopted session) records them on its first pass, and keeps
 * the checksums of what is committed meanwhile. A session moved between kvstores keeps its
 * checks: the export compares what it sent with the commits' checksums, and the importing
 * kvstore compares its copy from its first pass.
 */
import { afterEach, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { Registry } from "prom-client";
import { createLogger } from "../../services/common/log.js";
import { MemoryDirectory } from "../../services/kvstore/directory.js";
import { createKvStoreMetrics } from "../../services/kvstore/metrics.js";
import { Scrubber } from "../../services/kvstore/scrubber.js";
import { KvStore } from "../../services/kvstore/store.js";
import { SessionImport, exportSession } from "../../services/kvstore/transfer.js";
import type { ExportSessionResponse } from "../../proto/gen/freekv/v1/kvstore.js";
import { loadShm } from "../../native/shm.js";
import { crc32cJs } from "../../services/common/crc32c.js";
import { prng } from "../helpers/prng.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
const resolveRetrievalFor = (r: never) => resolveRetrieval(r, 4);

const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
const rand = prng(seed);
const why = `seed ${seed} (FREEKV_TEST_SEED)`;
const log = createLogger("test", "silent");
const G = { layers: 3, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 16, selectTokens: 32 } as never;
const stores: KvStore[] = [];
afterEach(async () => {
  for (const s of stores.splice(0)) await s.shutdown(false);
});

/** A store with a scrubber, one session whose first `pages` pages of every layer hold random bytes and are committed. */
async function setup(pages: number, withScrubber = true) {
  const metrics = createKvStoreMetrics(new Registry());
  const store = new KvStore(new MemoryDirectory(), 1 << 30, log, metrics);
  stores.push(store);
  const scrubber = new Scrubber(store, { bytesPerSecond: 0, log, metrics });
  if (withScrubber) store.scrubber = scrubber;
  const a = await store.attach({ sessionId: "s", geometry: G, retrieval: R, maxContextTokens: 1024, metadata: Buffer.alloc(0) });
  const l = a.layout!;
  const shm = loadShm();
  const seg = shm.ShmSegment.open(a.store!.name);
  const bytes = new Uint8Array(seg.buffer());
  const pageBytes = Number(l.pageBytes), stride = Number(l.layerStrideBytes);
  // Random content in every page that will be committed and in the next (uncommitted) one.
  for (let layer = 0; layer < G.layers; layer++)
    for (let i = 0; i < (pages + 1) * pageBytes; i++) bytes[layer * stride + i] = Math.floor(rand() * 256);
  const sum = (layer: number, p: number) => crc32cJs(bytes.subarray(layer * stride + p * pageBytes, layer * stride + (p + 1) * pageBytes));
  // Committed in two calls per layer (some with compute's checksums, some without).
  const half = Math.floor(pages / 2);
  for (const [first, count] of [[0, half], [half, pages - half]] as const)
    await store.commitPages({
      sessionId: "s", layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: pages * 16, metadata: Buffer.alloc(0),
      layers: Array.from({ length: G.layers }, (_, layer) => ({ layer, firstPage: first, count, checksums: layer === 1 ? [] : Array.from({ length: count }, (_, k) => sum(layer, first + k)) })),
    });
  const manifest = shm.ShmSegment.open(a.manifest!.name);
  return { store, scrubber, metrics, bytes, pageBytes, stride, manifest, close: () => (seg.close(), manifest.close()) };
}

describe("kvstore scrubber", () => {
  it("a clean pass reads every committed page once and finds nothing", async () => {
    const pages = 3 + Math.floor(rand() * 6);
    const t = await setup(pages);
    const total = G.layers * pages * t.pageBytes;
    expect(t.scrubber.scrub(total), why).toBe(total);
    // In slices of 1-3 pages: one pass (plus at most the last slice's overshoot into the next).
    let read = 0;
    while (read < total) read += t.scrubber.scrub(t.pageBytes * (1 + Math.floor(rand() * 3)));
    expect(read - total, why).toBeLessThan(3 * t.pageBytes);
    expect(await t.metrics.corruptPages.get()).toMatchObject({ values: [{ value: 0 }] });
    expect(loadShm().manifestCorrupt(t.manifest.buffer())).toBe(false);
    // Changing the uncommitted page after the committed ones is not corruption.
    t.bytes[t.stride + pages * t.pageBytes + 3] ^= 0xff;
    for (let i = 0; i < 3; i++) t.scrubber.scrub(total);
    expect(await t.store.commitPages({ sessionId: "s", layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: pages * 16, metadata: Buffer.alloc(0), layers: [] })).toBeDefined();
    t.close();
  });

  it("a flipped bit in any committed page is found: DATA_LOSS on every call, the manifest marked, counted", async () => {
    const pages = 2 + Math.floor(rand() * 6);
    const t = await setup(pages);
    const layer = Math.floor(rand() * G.layers), page = Math.floor(rand() * pages);
    t.bytes[layer * t.stride + page * t.pageBytes + Math.floor(rand() * t.pageBytes)] ^= 1 << Math.floor(rand() * 8);
    for (let i = 0; i < 4; i++) t.scrubber.scrub(G.layers * pages * t.pageBytes);
    expect((await t.metrics.corruptPages.get()).values[0].value, why).toBe(1);
    expect(loadShm().manifestCorrupt(t.manifest.buffer())).toBe(true);
    expect(loadShm().readManifest(t.manifest.buffer(), G.layers)).toMatchObject({ valid: false, corrupt: true });
    const commit = t.store.commitPages({ sessionId: "s", layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: pages * 16, metadata: Buffer.alloc(0), layers: [] });
    await expect(commit).rejects.toMatchObject({ code: status.DATA_LOSS, message: expect.stringMatching(new RegExp(`page ${page} of layer ${layer} changed after it was committed`)) });
    await expect(t.store.attach({ sessionId: "s" } as never)).rejects.toMatchObject({ code: status.DATA_LOSS });
    // Neither grown nor exported: a corrupt session's pages go nowhere.
    await expect(t.store.reserve("s", pages * 16 + 2048)).rejects.toMatchObject({ code: status.DATA_LOSS });
    await expect(t.store.exclusive("s", async () => "exported")).rejects.toMatchObject({ code: status.DATA_LOSS });
    // Released like any other session; nothing left to scrub.
    expect(await t.store.release("s")).toBe(true);
    expect(t.scrubber.scrub(1 << 20)).toBe(0);
    t.close();
  });

  it("without recorded checksums (an adopted session) the first pass records them and a later pass compares", async () => {
    const pages = 2 + Math.floor(rand() * 4);
    const t = await setup(pages, false);
    const fresh = new Scrubber(t.store, { bytesPerSecond: 0, log, metrics: t.metrics });
    const total = G.layers * pages * t.pageBytes;
    expect(fresh.scrub(total)).toBe(total);
    const layer = Math.floor(rand() * G.layers), page = Math.floor(rand() * pages);
    t.bytes[layer * t.stride + page * t.pageBytes] ^= 0x80;
    for (let i = 0; i < 3; i++) fresh.scrub(total);
    expect((await t.metrics.corruptPages.get()).values[0].value, why).toBe(1);
    t.close();
  });

  it("an adopted session's later commits keep their checksums until the first pass reaches them", async () => {
    const pages = 2 + Math.floor(rand() * 4);
    const t = await setup(pages, false);
    const fresh = new Scrubber(t.store, { bytesPerSecond: 0, log, metrics: t.metrics });
    t.store.scrubber = fresh;
    // Two more pages of every layer, committed before any pass: past what the scrubber knows.
    for (let layer = 0; layer < G.layers; layer++)
      for (let i = 0; i < 2 * t.pageBytes; i++) t.bytes[layer * t.stride + (pages + 1) * t.pageBytes + i] = Math.floor(rand() * 256);
    await t.store.commitPages({
      sessionId: "s", layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: (pages + 3) * 16, metadata: Buffer.alloc(0),
      layers: Array.from({ length: G.layers }, (_, layer) => ({ layer, firstPage: pages, count: 3, checksums: [] })),
    });
    // One of them changes before the first pass gets there.
    const layer = Math.floor(rand() * G.layers), page = pages + Math.floor(rand() * 3);
    t.bytes[layer * t.stride + page * t.pageBytes + Math.floor(rand() * t.pageBytes)] ^= 1 << Math.floor(rand() * 8);
    const total = G.layers * (pages + 3) * t.pageBytes;
    for (let i = 0; i < 3; i++) fresh.scrub(total);
    expect((await t.metrics.corruptPages.get()).values[0].value, why).toBe(1);
    await expect(t.store.reserve("s", 16)).rejects.toMatchObject({ code: status.DATA_LOSS, message: expect.stringMatching(new RegExp(`page ${page} of layer ${layer} changed`)) });
    t.close();
  });

  it("a session that cannot be read does not stop the pass: the others are still checked", async () => {
    const pages = 2 + Math.floor(rand() * 4);
    const t = await setup(pages);
    // A session sorted before "s" whose reads fail (its segment closed under the scrubber).
    const broken = { id: "a-broken", committed: [3, 3, 3], pageBytes: t.pageBytes, layerStride: t.stride, store: { crc32cPages: () => { throw new Error("segment closed"); } } };
    const host = { scrubSessions: () => [broken, ...t.store.scrubSessions()], markCorrupt: (...a: Parameters<KvStore["markCorrupt"]>) => t.store.markCorrupt(...a) };
    const scrubber = new Scrubber(host, { bytesPerSecond: 0, log, metrics: t.metrics });
    t.store.scrubber = scrubber;
    const layer = Math.floor(rand() * G.layers), page = Math.floor(rand() * pages);
    const total = G.layers * pages * t.pageBytes;
    expect(scrubber.scrub(total), why).toBe(total);
    t.bytes[layer * t.stride + page * t.pageBytes] ^= 0x40;
    for (let i = 0; i < 3; i++) scrubber.scrub(total);
    expect((await t.metrics.corruptPages.get()).values[0].value, why).toBe(1);
    t.close();
  });

  it("a commit whose checksums do not match the store is refused (FAILED_PRECONDITION) and records nothing", async () => {
    const t = await setup(2);
    const bad = crc32cJs(t.bytes.subarray(2 * t.pageBytes, 3 * t.pageBytes)) ^ 1;
    await expect(
      t.store.commitPages({ sessionId: "s", layer: 0, firstPage: 2, count: 1, checksums: [bad], contextTokens: 48, metadata: Buffer.alloc(0), layers: [] }),
    ).rejects.toMatchObject({ code: status.FAILED_PRECONDITION });
    expect(t.store.record("s")!.committedPages[0]).toBe(2);
    t.close();
  });
});

describe("checksums across a move", () => {
  it("an export compares the pages it sent with their commits' checksums: a page changed since is DATA_LOSS, with no digest", async () => {
    const pages = 2 + Math.floor(rand() * 6);
    const t = await setup(pages);
    const layer = Math.floor(rand() * G.layers), page = Math.floor(rand() * pages);
    t.bytes[layer * t.stride + page * t.pageBytes + Math.floor(rand() * t.pageBytes)] ^= 1 << Math.floor(rand() * 8);
    const sent: ExportSessionResponse[] = [];
    const e = await exportSession(t.store, { sessionId: "s", chunkBytes: 4096 }, async (m) => void sent.push(m)).catch((x: { code: number; message: string }) => x);
    expect(e, why).toMatchObject({ code: status.DATA_LOSS, message: expect.stringMatching(new RegExp(`page ${page} of layer ${layer} changed`)) });
    expect(sent.some((m) => m.item?.$case === "digest")).toBe(false);
    expect((await t.metrics.corruptPages.get()).values[0].value).toBe(1);
    expect(loadShm().manifestCorrupt(t.manifest.buffer())).toBe(true);
    t.close();
  });

  it("an imported session is compared from the importing kvstore's first pass", async () => {
    const pages = 2 + Math.floor(rand() * 6);
    const t = await setup(pages);
    const sent: ExportSessionResponse[] = [];
    await exportSession(t.store, { sessionId: "s", chunkBytes: 4096 }, async (m) => void sent.push(m));
    await t.store.release("s");
    const metrics = createKvStoreMetrics(new Registry());
    const dst = new KvStore(new MemoryDirectory(), 1 << 30, log, metrics);
    stores.push(dst);
    const scrubber = new Scrubber(dst, { bytesPerSecond: 0, log, metrics });
    dst.scrubber = scrubber;
    const imp = new SessionImport(dst);
    for (const m of sent) await imp.take(m);
    await imp.finish();
    // A page of the copy changes before the importing kvstore's scrubber has read it once.
    const a = await dst.attach({ sessionId: "s" } as never);
    const seg = loadShm().ShmSegment.open(a.store!.name);
    const bytes = new Uint8Array(seg.buffer());
    const layer = Math.floor(rand() * G.layers), page = Math.floor(rand() * pages);
    bytes[layer * t.stride + page * t.pageBytes + Math.floor(rand() * t.pageBytes)] ^= 1 << Math.floor(rand() * 8);
    for (let i = 0; i < 3; i++) scrubber.scrub(G.layers * pages * t.pageBytes);
    expect((await metrics.corruptPages.get()).values[0].value, why).toBe(1);
    seg.close();
    t.close();
  });
});

describe("stores larger than 4 GiB", () => {
  it("commits and scrubs pages past 4 GiB through the mapping (no JS buffer can cover the segment)", async () => {
    const { openSync, writeSync, readSync, closeSync } = await import("node:fs");
    // 4 layers of 262144 tokens x 8 KiB: the last layer starts at 6 GiB (sparse: only
    // the pages written below are backed).
    const Gb = { layers: 4, queryHeads: 8, kvHeads: 8, headDim: 128, kvDtype: 1 };
    const Rb = { pageSize: 32, sinkTokens: 32, windowTokens: 32, selectTokens: 64 } as never;
    const metrics = createKvStoreMetrics(new Registry());
    const store = new KvStore(new MemoryDirectory(), 2 ** 40, log, metrics);
    stores.push(store);
    const scrubber = new Scrubber(store, { bytesPerSecond: 0, log, metrics });
    store.scrubber = scrubber;
    const a = store.attachLocal("big", Gb, { ...resolveRetrievalFor(Rb), tauSet: true } as never, 262144);
    const l = a.layout!;
    const pageBytes = Number(l.pageBytes), stride = Number(l.layerStrideBytes);
    expect(stride * 3).toBeGreaterThan(2 ** 32);
    const file = `/dev/shm${a.store!.name}`;
    const fd = openSync(file, "r+");
    const page = new Uint8Array(pageBytes);
    for (let i = 0; i < pageBytes; i++) page[i] = Math.floor(rand() * 256);
    for (let p = 0; p < 2; p++) writeSync(fd, page, 0, pageBytes, 3 * stride + p * pageBytes);
    const sum = crc32cJs(page);
    const r = await store.commitPages({ sessionId: "big", layer: 3, firstPage: 0, count: 2, checksums: [sum, sum], contextTokens: 64, metadata: Buffer.alloc(0), layers: [] });
    expect(r.committedPages).toBe(2);
    expect(scrubber.scrub(2 * pageBytes)).toBe(2 * pageBytes);
    // A flipped bit past 4 GiB is found.
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, 3 * stride + pageBytes + 17);
    b[0] ^= 4;
    writeSync(fd, b, 0, 1, 3 * stride + pageBytes + 17);
    closeSync(fd);
    for (let i = 0; i < 3; i++) scrubber.scrub(2 * pageBytes);
    expect((await metrics.corruptPages.get()).values[0].value).toBe(1);
  });
});
