/**
 * The import's digest, read in pieces (transfer.ts crc32cPiecewise): the same CRC32C as one pass
 * over the bytes (checked with the JavaScript definition, crc32cJs), whatever the piece size
 * (boundaries that do not divide the range, a base offset, a seed carried in), from a segment or
 * an ArrayBuffer, and never through a buffer larger than a piece: what lets a layer past Node's
 * 2^32-byte ArrayBuffer limit be checked. Then imports over gRPC into a kvstore whose digest reads
 * small pieces (4 KiB and an odd size): the session verifies and is published byte for byte; a
 * byte changed in the middle of a later piece, in a chunk whose own checksum was made to match (so
 * only the digest can see it), or in the kvstore's segment after the chunks were written, is
 * DATA_LOSS with nothing imported.
 */
import { closeSync, openSync, readSync, writeSync } from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { Metadata, Server, ServerCredentials, credentials, status, type ServiceError } from "@grpc/grpc-js";
import {
  KvStoreTransferServiceClient,
  KvStoreTransferServiceService,
  SessionPart,
  SessionTransferHeader,
  type AttachSessionResponse,
  type ExportSessionResponse,
  type ImportSessionRequest,
  type ImportSessionResponse,
} from "../../proto/gen/freekv/v1/kvstore.js";
import { loadShm, type ShmSegment } from "../../native/shm.js";
import { crc32cJs } from "../../services/common/crc32c.js";
import { createLogger } from "../../services/common/log.js";
import { rejectMalformed } from "../../services/common/malformed.js";
import { MemoryDirectory } from "../../services/kvstore/directory.js";
import { KvStore } from "../../services/kvstore/store.js";
import { DIGEST_PIECE_BYTES, MIN_CHUNK_BYTES, SessionImport, crc32cPiecewise, crc32cPiecewiseAsync, exportSession, transferService } from "../../services/kvstore/transfer.js";
import { prng, randomBytes } from "../helpers/prng.js";
import { shmSegments } from "../helpers/services.js";

const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
console.log(`transfer-digest: seed ${seed} (set FREEKV_TEST_SEED to repeat)`);
const rand = prng(seed);
const int = (lo: number, hi: number) => lo + Math.floor(rand() * (hi - lo + 1));
const log = createLogger("test", "silent");

const cleanups: (() => void | Promise<void>)[] = [];
afterEach(async () => {
  for (const f of cleanups.splice(0).reverse()) await f();
});

/** A piece size in [lo, hi] that does not divide n. */
function nonDividing(n: number, lo: number, hi: number): number {
  for (;;) {
    const p = int(lo, hi);
    if (n % p !== 0) return p;
  }
}

describe("crc32cPiecewise", () => {
  it("equals one pass over the range for any piece size, and maps no more than a piece at a time", async () => {
    const { ShmSegment } = loadShm();
    const n = int(3 << 20, 5 << 20) | 1; // odd: no power of two divides it
    const base = int(1, 1 << 16);
    const data = randomBytes(n, rand);
    const prefix = randomBytes(int(1, 64), rand);
    const name = `/freekv-test-digest-${process.pid}-${int(0, 1e9)}`;
    const seg = ShmSegment.create(name, base + n + int(0, 4096));
    cleanups.push(() => {
      seg.close();
      ShmSegment.unlink(name);
    });
    new Uint8Array(seg.buffer()).set(data, base);
    // One pass over prefix ++ data; the piecewise CRC continues from the prefix's.
    const joined = new Uint8Array(prefix.length + n);
    joined.set(prefix);
    joined.set(data, prefix.length);
    const whole = crc32cJs(joined);
    const seedCrc = crc32cJs(prefix);
    expect(crc32cJs(data, seedCrc)).toBe(whole);

    const pieces = [4096, nonDividing(n, 3, 4095), nonDividing(n, 4097, 1 << 20), n - int(1, 4096), n, n + int(1, 4096), DIGEST_PIECE_BYTES];
    for (const p of pieces) {
      const lengths: number[] = [];
      // The segment as the import holds a region past MAX_RANGE: every piece mapped on its own;
      // a mapping larger than the piece fails, as one past Node's ArrayBuffer limit does.
      const limited = {
        crc32cPages: seg.crc32cPages.bind(seg),
        buffer: (offset?: number, length?: number) => {
          if (offset === undefined || length === undefined || length > p) throw new RangeError(`a mapping of ${length ?? seg.size} bytes, more than the piece (${p})`);
          lengths.push(length);
          return seg.buffer(offset, length);
        },
      } as unknown as ShmSegment;
      expect(crc32cPiecewise(limited, base, n, seedCrc, p), `piece ${p}`).toBe(whole);
      expect(lengths.length, `piece ${p}`).toBe(Math.ceil(n / p));
      expect(lengths.reduce((a, b) => a + b, 0)).toBe(n);
      // A mapped ArrayBuffer (a region that fits one): the same value.
      expect(crc32cPiecewise(seg.buffer(), base, n, seedCrc, p), `piece ${p}, ArrayBuffer`).toBe(whole);
    }
    // The default piece, and a range of nothing (the seed as it came).
    expect(crc32cPiecewise(seg, base, n, seedCrc)).toBe(whole);
    expect(crc32cPiecewise(seg, base, 0, seedCrc, 4096)).toBe(seedCrc);
    for (const bad of [0, -1, 1.5, NaN, 2 ** 31 + 1]) expect(() => crc32cPiecewise(seg, base, n, 0, bad), String(bad)).toThrow(RangeError);

    // The import's digest: the same value, with the event loop turning between pieces (other
    // calls are answered meanwhile).
    const p = nonDividing(n, 4097, 1 << 18);
    let turns = 0;
    let ticking = true;
    const tick = () => {
      if (!ticking) return;
      turns++;
      setImmediate(tick);
    };
    setImmediate(tick);
    const asyncCrc = await crc32cPiecewiseAsync(seg, base, n, seedCrc, p);
    ticking = false;
    expect(asyncCrc).toBe(whole);
    expect(turns).toBeGreaterThanOrEqual(Math.ceil(n / p) - 1);
    await expect(crc32cPiecewiseAsync(seg, base, n, 0, 0)).rejects.toThrow(RangeError);
  });
});

// A session of two layers of a few MB each (pages of 4096 bytes).
const G = { layers: 2, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 32, tau: 0.9, tauSet: true };
const MAX = 16384;

interface Source {
  id: string;
  pages: number[];
  pageBytes: number;
  stride: number;
  store: Uint8Array[];
  tail: Uint8Array;
  exported: ExportSessionResponse[];
}

/** A session in `src` with random committed pages (1.6 to 3.6 MB a layer) and tail, exported in random-sized chunks. */
async function makeSource(src: KvStore, id: string): Promise<Source> {
  const pages = Array.from({ length: G.layers }, () => int(400, 900));
  const a = await src.attach({ sessionId: id, geometry: G, retrieval: R as never, maxContextTokens: MAX, metadata: Buffer.from(`meta-${int(0, 1e9)}`), reserveTokens: Math.max(...pages) * R.pageSize });
  const pageBytes = Number(a.layout!.pageBytes);
  const stride = Number(a.layout!.layerStrideBytes);
  const store = pages.map((p) => randomBytes(p * pageBytes, rand));
  const fd = openSync(`/dev/shm${a.store!.name}`, "r+");
  store.forEach((b, l) => writeSync(fd, b, 0, b.length, l * stride));
  closeSync(fd);
  const { ShmSegment } = loadShm();
  const tailSeg = ShmSegment.open(a.tail!.name);
  const tail = randomBytes(tailSeg.size, rand);
  new Uint8Array(tailSeg.buffer()).set(tail);
  tailSeg.close();
  await src.commitPages({
    sessionId: id,
    layer: 0,
    firstPage: 0,
    count: 0,
    checksums: [],
    contextTokens: Math.max(...pages) * R.pageSize,
    metadata: Buffer.alloc(0),
    layers: pages.map((count, layer) => ({ layer, firstPage: 0, count, checksums: [] })),
  });
  const exported: ExportSessionResponse[] = [];
  await exportSession(src, { sessionId: id, chunkBytes: int(MIN_CHUNK_BYTES, 64 << 10) }, async (m) => void exported.push(m));
  return { id, pages, pageBytes, stride, store, tail, exported };
}

/** A byte in the middle of a later piece (not its first or last byte) of a random store layer; its chunk's message index and offset in the data. */
function laterPieceByte(s: Source, piece: number): { layer: number; at: number; msg: number; within: number } {
  const layer = int(0, G.layers - 1);
  const bytes = s.pages[layer] * s.pageBytes;
  const count = Math.ceil(bytes / piece);
  // A last piece of fewer than 3 bytes has no middle: then one before it.
  const k = int(1, bytes - (count - 1) * piece >= 3 ? count - 1 : count - 2);
  const len = Math.min(piece, bytes - k * piece);
  const at = k * piece + int(1, len - 2);
  const msg = s.exported.findIndex((m) => {
    if (m.item?.$case !== "chunk") return false;
    const c = m.item.value;
    return c.part === SessionPart.SESSION_PART_STORE && c.layer === layer && c.offset <= at && at < c.offset + c.data.length;
  });
  expect(msg).toBeGreaterThan(0);
  const c = (s.exported[msg].item as { value: { offset: number } }).value;
  return { layer, at, msg, within: at - c.offset };
}

/** A kvstore in process serving KvStoreTransferService over gRPC, its digest read in pieces of `piece` bytes. */
async function serveImports(piece: number): Promise<{ store: KvStore; address: string }> {
  const store = new KvStore(new MemoryDirectory(), 1 << 30, log);
  const server = new Server({ "grpc.max_receive_message_length": 64 << 20 });
  const svc = rejectMalformed(KvStoreTransferServiceService, transferService(store, log, undefined, { digestPieceBytes: piece }));
  server.addService(svc.definition, svc.implementation);
  const port = await new Promise<number>((res, rej) => server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
  cleanups.push(async () => {
    await new Promise<void>((res) => server.tryShutdown(() => res()));
    await store.shutdown(false);
  });
  return { store, address: `127.0.0.1:${port}` };
}

function importAll(address: string, msgs: ImportSessionRequest[]): Promise<ImportSessionResponse | ServiceError> {
  const c = new KvStoreTransferServiceClient(address, credentials.createInsecure(), { "grpc.max_send_message_length": 64 << 20 });
  return new Promise((resolve) => {
    const call = c.importSession(new Metadata(), { deadline: Date.now() + 30_000 }, (err, res) => (c.close(), resolve(err ?? res!)));
    for (const m of msgs) call.write(m);
    call.end();
  });
}

/** The names of the segments the kvstores of this process make. */
const mine = `/freekv-kv-${process.pid}-`;

const isErr = (r: unknown): r is ServiceError => r instanceof Error;

/** Nothing of a failed import is left in `store`: no session, no bytes counted, no segment of this process's made since `before`. */
function nothingLeft(store: KvStore, before: Set<string>): void {
  expect(store.list()).toEqual([]);
  expect(store.stats().reservedBytes).toBe(0);
  expect([...shmSegments()].filter((n) => !before.has(n) && n.startsWith(mine))).toEqual([]);
}

describe("a session found corrupt while it moves", () => {
  it("an import whose manifest carries the corrupt marker is DATA_LOSS; an export during which the scrubber marks the session sends no digest", async () => {
    const src = new KvStore(new MemoryDirectory(), 1 << 30, log);
    cleanups.push(() => src.shutdown(false));
    const s = await makeSource(src, `corrupt-${int(0, 1e9)}`);
    const dst = await serveImports(DIGEST_PIECE_BYTES);
    const before = shmSegments();
    // The manifest as a kvstore that marked the session corrupt holds it, every CRC32C recomputed:
    // only the marker tells.
    const msgs = structuredClone(s.exported) as ImportSessionRequest[];
    const first = msgs.findIndex((m) => m.item?.$case === "chunk" && m.item.value.part === SessionPart.SESSION_PART_MANIFEST && m.item.value.offset === 0);
    expect(first).toBeGreaterThan(0);
    const c = (msgs[first].item as { value: { data: Uint8Array; crc32c: number } }).value;
    const marked = new Uint8Array(c.data);
    loadShm().markManifestCorrupt(marked.buffer);
    c.data = marked;
    c.crc32c = crc32cJs(marked);
    const header = msgs[0].item as { value: SessionTransferHeader };
    let digest = crc32cJs(SessionTransferHeader.encode(header.value).finish());
    for (const m of msgs) if (m.item?.$case === "chunk") digest = crc32cJs(m.item.value.data, digest);
    (msgs[msgs.length - 1].item as { value: { crc32c: number } }).value.crc32c = digest;
    const r = await importAll(dst.address, msgs);
    expect(isErr(r) ? status[r.code] : "imported").toBe("DATA_LOSS");
    expect((r as ServiceError).details).toMatch(/marked the session corrupt/);
    nothingLeft(dst.store, before);

    // The scrubber finds a page changed while the chunks go out: the export fails DATA_LOSS
    // before its digest, so the copy can never be published.
    const sent: ExportSessionResponse[] = [];
    const layer = int(0, G.layers - 1);
    const failed = await exportSession(src, { sessionId: s.id, chunkBytes: MIN_CHUNK_BYTES }, async (m) => {
      sent.push(m);
      if (sent.length === 2) src.markCorrupt(s.id, layer, int(0, s.pages[layer] - 1), 1, 2);
    }).then(
      () => undefined,
      (e: ServiceError) => e,
    );
    expect(failed?.code).toBe(status.DATA_LOSS);
    expect(failed?.message).toMatch(/is corrupt/);
    expect(sent.some((m) => m.item?.$case === "digest")).toBe(false);
  });
});

describe("an import whose digest is read in small pieces", () => {
  it("verifies and publishes the session over gRPC; a byte changed in a later piece of a re-checksummed chunk is DATA_LOSS", async () => {
    const src = new KvStore(new MemoryDirectory(), 1 << 30, log);
    cleanups.push(() => src.shutdown(false));
    const s = await makeSource(src, `digest-${int(0, 1e9)}`);
    const storeBytes = s.pages.map((p) => p * s.pageBytes);
    for (const piece of [4096, nonDividing(storeBytes[0] * storeBytes[1], 4097, 65535)]) {
      const dst = await serveImports(piece);
      const before = shmSegments();
      // Corrupted: one byte in the middle of a later piece, the chunk's CRC32C recomputed for it,
      // so each chunk passes its own check and only the digest (computed from the segments) differs.
      const bad = structuredClone(s.exported) as ImportSessionRequest[];
      const { msg, within, layer, at } = laterPieceByte(s, piece);
      const c = (bad[msg].item as { value: { data: Uint8Array; crc32c: number } }).value;
      const data = Buffer.from(c.data);
      data[within] ^= int(1, 255);
      c.data = data;
      c.crc32c = crc32cJs(data);
      const r = await importAll(dst.address, bad);
      expect(isErr(r) ? status[r.code] : "imported", `piece ${piece}, layer ${layer} byte ${at}: ${isErr(r) ? r.details : ""}`).toBe("DATA_LOSS");
      expect((r as ServiceError).details).toMatch(/^digest: the session's CRC32C/);
      nothingLeft(dst.store, before);

      // As exported: verified and published, byte for byte.
      const ok = await importAll(dst.address, s.exported as ImportSessionRequest[]);
      expect(isErr(ok) ? `${status[ok.code]}: ${ok.details}` : ok.sessionId, `piece ${piece}`).toBe(s.id);
      expect(dst.store.list()).toEqual([s.id]);
      const b: AttachSessionResponse = await dst.store.attach({ sessionId: s.id } as never);
      expect(b.committedPages).toEqual(s.pages);
      const fd = openSync(`/dev/shm${b.store!.name}`, "r");
      for (let l = 0; l < G.layers; l++) {
        const got = Buffer.alloc(storeBytes[l]);
        readSync(fd, got, 0, got.length, l * s.stride);
        expect(Buffer.compare(got, Buffer.from(s.store[l])), `piece ${piece}, layer ${l}`).toBe(0);
      }
      closeSync(fd);
      const tfd = openSync(`/dev/shm${b.tail!.name}`, "r");
      const tail = Buffer.alloc(s.tail.length);
      readSync(tfd, tail, 0, tail.length, 0);
      closeSync(tfd);
      expect(Buffer.compare(tail, Buffer.from(s.tail))).toBe(0);
    }
  });

  it("verifies in process, and is DATA_LOSS when the kvstore's own copy changed in a later piece after the chunks were written", async () => {
    const src = new KvStore(new MemoryDirectory(), 1 << 30, log);
    cleanups.push(() => src.shutdown(false));
    const s = await makeSource(src, `changed-${int(0, 1e9)}`);
    const storeBytes = s.pages.map((p) => p * s.pageBytes);
    for (const piece of [4096, nonDividing(storeBytes[0] * storeBytes[1], 4097, 65535)]) {
      const dst = new KvStore(new MemoryDirectory(), 1 << 30, log);
      cleanups.push(() => dst.shutdown(false));
      const msgs = s.exported as ImportSessionRequest[];
      // Unchanged, the same import verifies and publishes.
      const clean = new SessionImport(dst, { digestPieceBytes: piece });
      for (const m of msgs) await clean.take(m);
      expect((await clean.finish()).sessionId).toBe(s.id);
      expect(await dst.release(s.id)).toBe(true);
      const before = shmSegments();
      const imp = new SessionImport(dst, { digestPieceBytes: piece });
      for (const m of msgs.slice(0, -1)) await imp.take(m);
      // The import's store segment (the only new one of the store's size): a byte in it changes.
      const { ShmSegment } = loadShm();
      const storeSize = G.layers * s.stride;
      const made = [...shmSegments()].filter((n) => !before.has(n) && n.startsWith(mine)).map((n) => ShmSegment.open(n));
      expect(made).toHaveLength(4);
      const seg = made.find((x) => x.size === storeSize);
      expect(seg, "the import's store segment").toBeDefined();
      const { layer, at } = laterPieceByte(s, piece);
      const view = new Uint8Array(seg!.buffer(layer * s.stride + at, 1));
      view[0] ^= int(1, 255);
      for (const x of made) x.close();
      await expect(imp.take(msgs[msgs.length - 1]), `piece ${piece}, layer ${layer} byte ${at}`).rejects.toMatchObject({ code: status.DATA_LOSS, message: expect.stringMatching(/^digest: the session's CRC32C/) });
      imp.abort();
      nothingLeft(dst, before);
    }
  });
});
