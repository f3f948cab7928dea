/** The kvstore's state machine in process: attach / re-attach, capacity, commit rules, release. */
import { afterEach, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { createLogger } from "../../services/common/log.js";
import { MemoryDirectory } from "../../services/kvstore/directory.js";
import { KvStore } from "../../services/kvstore/store.js";
import { computeLayout, totalBytes, capacityPages } from "../../services/kvstore/layout.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
import { shmSegments } from "../helpers/services.js";

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

  it("commits in order per layer and keeps the largest context", async () => {
    const s = new KvStore(new MemoryDirectory(), 1 << 30, log);
    stores.push(s);
    await s.attach(req("c", 100));
    expect(await s.commit({ sessionId: "c", layer: 1, firstPage: 0, count: 2, contextTokens: 40, checksums: [], metadata: Buffer.alloc(0) })).toBe(2);
    // Re-committing a prefix is idempotent; a gap is not allowed.
    expect(await s.commit({ sessionId: "c", layer: 1, firstPage: 1, count: 1, contextTokens: 40, checksums: [], metadata: Buffer.alloc(0) })).toBe(2);
    await expect(s.commit({ sessionId: "c", layer: 0, firstPage: 1, count: 1, contextTokens: 40, checksums: [], metadata: Buffer.alloc(0) })).rejects.toMatchObject({ code: status.FAILED_PRECONDITION });
    await expect(s.commit({ sessionId: "c", layer: 0, firstPage: 0, count: 3, contextTokens: 40, checksums: [], metadata: Buffer.alloc(0) })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    await expect(s.commit({ sessionId: "c", layer: 0, firstPage: 0, count: 1, contextTokens: 101, checksums: [], metadata: Buffer.alloc(0) })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    await expect(s.commit({ sessionId: "c", layer: 0, firstPage: 0, count: 1, contextTokens: 16, checksums: [1, 2], metadata: Buffer.alloc(0) })).rejects.toMatchObject({ code: status.INVALID_ARGUMENT });
    expect(s.record("c")!.committedPages).toEqual([0, 2]);
    expect(s.record("c")!.contextTokens).toBe(40);
  });
});
