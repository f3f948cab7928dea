/**
 * Export and import of a session whose store segment is larger than the 4 GiB one ArrayBuffer can
 * cover (its apparent size; only its reserved pages are memory): pages written past 4 GiB travel
 * byte for byte into a second kvstore, in process.
 */
import { closeSync, openSync, readSync, writeSync } from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { createLogger } from "../../services/common/log.js";
import { MemoryDirectory } from "../../services/kvstore/directory.js";
import { KvStore } from "../../services/kvstore/store.js";
import { SessionImport, exportSession } from "../../services/kvstore/transfer.js";
import type { ExportSessionResponse } from "../../proto/gen/freekv/v1/kvstore.js";
import { prng } from "../helpers/prng.js";

const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
const rand = prng(seed);
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
});
