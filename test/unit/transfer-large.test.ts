/**
 * Export and import of a session whose store segment is larger than the 4 GiB one ArrayBuffer can
 * cover (its apparent size; only its reserved pages are memory): pages written past 4 GiB travel
 * byte for byte into a second kvstore, in process.
 *
 * With FREEKV_TEST_LARGE_MEMORY=1 (it needs ~4.3 GiB of /dev/shm and of memory, more than a small
 * CI machine has to spare): the import of one layer of more than 4 GiB of pages, whose digest
 * cannot be read as one buffer (Node 20 makes no ArrayBuffer past 2^32 bytes) and is read in
 * pieces: it verifies and publishes, and a byte changed past 4 GiB is DATA_LOSS.
 */
import { closeSync, openSync, readSync, readdirSync, statSync, writeSync } from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { loadShm } from "../../native/shm.js";
import { crc32c } from "../../services/common/crc32c.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
import { capacityPages, computeLayout, toSegmentLayout } from "../../services/kvstore/layout.js";
import { createLogger } from "../../services/common/log.js";
import { MemoryDirectory } from "../../services/kvstore/directory.js";
import { KvStore } from "../../services/kvstore/store.js";
import { MAX_CHUNK_BYTES, SessionImport, exportSession } from "../../services/kvstore/transfer.js";
import { SessionPart, type ExportSessionResponse, type ImportSessionRequest, SessionTransferHeader } from "../../proto/gen/freekv/v1/kvstore.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
console.log(`transfer-large: seed ${seed} (set FREEKV_TEST_SEED to repeat)`);
const rand = prng(seed);
const large = process.env.FREEKV_TEST_LARGE_MEMORY === "1";
const log = createLogger("test", "silent");
const stores: KvStore[] = [];
afterEach(async () => {
  for (const s of stores.splice(0)) await s.shutdown(false);
});

describe("moving a session with a store over 4 GiB", () => {
  it("exports the pages past 4 GiB and imports them exactly", async () => {
    // 4 layers of 262144 tokens x 8 KiB: the last layer's pages start at 6 GiB of the store.
    const G = { layers: 4, queryHeads: 8, kvHeads: 8, headDim: 128, kvDtype: 1 };
    const R = { pageSize: 32, sinkTokens: 32, windowTokens: 32, selectTokens: 64 };
    const src = new KvStore(new MemoryDirectory(), 2 ** 34, log);
    const dst = new KvStore(new MemoryDirectory(), 2 ** 34, log);
    stores.push(src, dst);
    const a = await src.attach({ sessionId: "big", geometry: G, retrieval: R as never, maxContextTokens: 262144, metadata: Buffer.from("m"), reserveTokens: 64 });
    const pageBytes = Number(a.layout!.pageBytes), stride = Number(a.layout!.layerStrideBytes);
    expect(3 * stride).toBeGreaterThan(2 ** 32);
    const fd = openSync(`/dev/shm${a.store!.name}`, "r+");
    const pages = [0, 1, 2, 3].map(() => Uint8Array.from({ length: 2 * pageBytes }, () => Math.floor(rand() * 256)));
    for (let l = 0; l < 4; l++) writeSync(fd, pages[l], 0, 2 * pageBytes, l * stride);
    closeSync(fd);
    await src.commitPages({ sessionId: "big", layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: 64, metadata: Buffer.alloc(0), layers: [0, 1, 2, 3].map((layer) => ({ layer, firstPage: 0, count: 2, checksums: [] })) });
    const msgs: ExportSessionResponse[] = [];
    await exportSession(src, { sessionId: "big", chunkBytes: 1 << 20 }, async (m) => void msgs.push(m));
    const imp = new SessionImport(dst);
    for (const m of msgs) await imp.take({ item: m.item } as never);
    await imp.finish();
    const b = await dst.attach({ sessionId: "big" } as never);
    const fd2 = openSync(`/dev/shm${b.store!.name}`, "r");
    for (let l = 0; l < 4; l++) {
      const got = Buffer.alloc(2 * pageBytes);
      readSync(fd2, got, 0, 2 * pageBytes, l * stride);
      expect(Buffer.compare(got, Buffer.from(pages[l])), `layer ${l}`).toBe(0);
    }
    closeSync(fd2);
    expect(b.committedPages).toEqual([2, 2, 2, 2]);
  });

  it.skipIf(!large)("imports one layer of more than 4 GiB of pages: the digest is read in pieces; a byte changed past 4 GiB is DATA_LOSS (FREEKV_TEST_LARGE_MEMORY=1)", async () => {
    // One layer of pages of 128 KiB: 2^15 pages are 4 GiB, the session sends a few more.
    const G = { layers: 1, queryHeads: 8, kvHeads: 8, headDim: 128, kvDtype: 1 };
    const retrieval = resolveRetrieval({ pageSize: 32, sinkTokens: 32, windowTokens: 32, selectTokens: 64 } as never, 1);
    const pages = 2 ** 15 + 1 + Math.floor(rand() * 16);
    const maxCtx = pages * 32 + Math.floor(rand() * 32);
    const cap = capacityPages(maxCtx, 32);
    const L = computeLayout(G, retrieval, cap);
    const layerBytes = pages * L.pageBytes;
    expect(layerBytes).toBeGreaterThan(2 ** 32);
    const header: SessionTransferHeader = {
      sessionId: "huge",
      geometry: G,
      retrieval,
      layout: toSegmentLayout(L, 32, cap),
      maxContextTokens: maxCtx,
      metadata: Buffer.from(`m-${seed}`),
      committedPages: [pages],
      exportedPages: [pages],
      contextTokens: pages * 32,
      tailBytes: L.tailBytes,
      manifestBytes: L.manifestBytes,
    };
    // Each 4 MiB chunk: one random block with the chunk's index written at a random place in it.
    const block = Buffer.from(Uint8Array.from({ length: MAX_CHUNK_BYTES }, () => Math.floor(rand() * 256)));
    const mark = Math.floor(rand() * (MAX_CHUNK_BYTES - 4));
    const chunkData = (i: number, n: number) => {
      block.writeUInt32LE(i, mark);
      return block.subarray(0, n);
    };
    const tail = Buffer.from(Uint8Array.from({ length: L.tailBytes }, () => Math.floor(rand() * 256)));
    const manifest = new ArrayBuffer(L.manifestBytes);
    loadShm().initManifest(manifest, 1);
    /** Streams the session into `imp`; `beforeDigest` runs after the last chunk. Returns the digest's outcome. */
    const run = async (imp: SessionImport, beforeDigest: () => void) => {
      await imp.take({ item: { $case: "header", value: header } });
      let digest = crc32c(SessionTransferHeader.encode(header).finish());
      let chunks = 0;
      const send = async (part: SessionPart, offset: number, data: Buffer) => {
        digest = crc32c(data, digest);
        chunks++;
        await imp.take({ item: { $case: "chunk", value: { part, layer: 0, offset, data, crc32c: crc32c(data) } } } as ImportSessionRequest);
      };
      for (let off = 0, i = 0; off < layerBytes; off += MAX_CHUNK_BYTES, i++) await send(SessionPart.SESSION_PART_STORE, off, chunkData(i, Math.min(MAX_CHUNK_BYTES, layerBytes - off)));
      await send(SessionPart.SESSION_PART_TAIL, 0, tail);
      await send(SessionPart.SESSION_PART_MANIFEST, 0, Buffer.from(manifest));
      beforeDigest();
      await imp.take({ item: { $case: "digest", value: { crc32c: digest, dataBytes: layerBytes + L.tailBytes + L.manifestBytes, chunks } } });
    };
    const dst = new KvStore(new MemoryDirectory(), 2 ** 34, log);
    stores.push(dst);

    // A byte past 4 GiB changed in the kvstore's segment after it arrived: DATA_LOSS, nothing kept.
    const changed = new SessionImport(dst);
    const at = 2 ** 32 + Math.floor(rand() * (layerBytes - 2 ** 32));
    await expect(
      run(changed, () => {
        // The import's store: the one segment of this process's kvstore of the store's size.
        const names = readdirSync("/dev/shm").filter((n) => n.startsWith(`freekv-kv-${process.pid}-`) && statSync(`/dev/shm/${n}`).size === L.storeBytes);
        expect(names).toHaveLength(1);
        const fd = openSync(`/dev/shm/${names[0]}`, "r+");
        const b = Buffer.alloc(1);
        readSync(fd, b, 0, 1, at);
        b[0] ^= 1 + Math.floor(rand() * 255);
        writeSync(fd, b, 0, 1, at);
        closeSync(fd);
      }),
    ).rejects.toMatchObject({ code: status.DATA_LOSS });
    changed.abort();
    expect(dst.stats().reservedBytes).toBe(0);

    // As sent: verified and published; the chunks past 4 GiB are where they belong.
    const imp = new SessionImport(dst);
    await run(imp, () => undefined);
    await imp.finish();
    const b = await dst.attach({ sessionId: "huge" } as never);
    expect(b.committedPages).toEqual([pages]);
    const fd = openSync(`/dev/shm${b.store!.name}`, "r");
    const last = Math.ceil(layerBytes / MAX_CHUNK_BYTES) - 1;
    for (const i of [2 ** 10 - 1, 2 ** 10, last, 2 ** 10 + Math.floor(rand() * (last - 2 ** 10))]) {
      const n = Math.min(MAX_CHUNK_BYTES, layerBytes - i * MAX_CHUNK_BYTES);
      const got = Buffer.alloc(n);
      readSync(fd, got, 0, n, i * MAX_CHUNK_BYTES);
      expect(Buffer.compare(got, chunkData(i, n)), `chunk ${i}`).toBe(0);
    }
    closeSync(fd);
  }, 300_000);
});
