/** The compute tier's page commits: the pages the engine reports filled, every layer of a step in
 *  one CommitPages call; with checksums, computed off the main thread over the store's pages, and
 *  commit points arriving meanwhile left to the next commit. */
import { afterEach, describe, expect, it } from "vitest";
import { loadShm, type ShmSegment } from "../../native/shm.js";
import { crc32cJs } from "../../services/common/crc32c.js";
import { createLogger } from "../../services/common/log.js";
import { prng } from "../helpers/prng.js";
import { resolveRetrieval } from "../../services/common/retrieval.js";
import { SessionManager } from "../../services/compute/sessions/manager.js";
import { ComputeSession } from "../../services/compute/sessions/session.js";
import type { AttachSessionResponse, CommitPagesRequest, CommitPagesResponse } from "../../proto/gen/freekv/v1/kvstore.js";
import type { KvStoreClient } from "../../services/compute/kvstore-client.js";
import type { Engine } from "../../native/binding.js";

const log = createLogger("test", "silent");
const LAYERS = 5;
const P = 16;

const seed = Number(process.env.FREEKV_TEST_SEED ?? Date.now() % 1e9);
const rand = prng(seed);
const why = `seed ${seed} (FREEKV_TEST_SEED)`;
const segments: { seg: ShmSegment; name: string }[] = [];
afterEach(() => {
  for (const { seg, name } of segments.splice(0)) {
    try {
      seg.close();
    } catch {
      // closed by the test
    }
    loadShm().ShmSegment.unlink(name);
  }
});

function segment(bytes: number): ShmSegment {
  const name = `/fkv-commit-test-${process.pid}-${Math.floor(rand() * 1e9).toString(36)}`;
  const seg = loadShm().ShmSegment.create(name, bytes);
  segments.push({ seg, name });
  return seg;
}

/** A store segment of random bytes for `LAYERS` layers of `capacity` pages of `pageBytes`, and a manifest. */
function storeOf(pageBytes: number, capacity: number) {
  const seg = segment(LAYERS * capacity * pageBytes);
  const manifest = segment(1 << 16);
  loadShm().initManifest(manifest.buffer(), LAYERS);
  const bytes = new Uint8Array(seg.buffer());
  const words = new Uint32Array(seg.buffer(), 0, bytes.length >> 2);
  for (let i = 0; i < words.length; i++) words[i] = Math.floor(rand() * 2 ** 32);
  for (let i = words.length * 4; i < bytes.length; i++) bytes[i] = Math.floor(rand() * 256);
  const layout = { pageBytes, layerStrideBytes: capacity * pageBytes };
  /** The CRC32C of `count` pages of `layer` from `first`, by the JavaScript definition. */
  const sums = (layer: number, first: number, count: number) =>
    Array.from({ length: count }, (_, k) => crc32cJs(bytes.subarray(layer * layout.layerStrideBytes + (first + k) * pageBytes, layer * layout.layerStrideBytes + (first + k + 1) * pageBytes)));
  return { seg, manifest, layout, sums };
}

function setup(checksums?: { store: ShmSegment; manifest: ShmSegment; layout: { pageBytes: number; layerStrideBytes: number } }) {
  const calls: CommitPagesRequest[] = [];
  const kvstore = {
    async commit(req: CommitPagesRequest): Promise<CommitPagesResponse> {
      calls.push(structuredClone(req));
      const each = req.layers.map((e) => e.firstPage + e.count);
      return req.layers.length ? { committedPages: Math.min(...each), layerCommittedPages: each } : { committedPages: req.firstPage + req.count, layerCommittedPages: [] };
    },
  } as unknown as KvStoreClient;
  // The engine's answer per layer (full pages offloaded), set by each test.
  const filled = new Array<number>(LAYERS).fill(0);
  const engine = { filledPages: (_s: number, layer: number) => filled[layer] } as unknown as Engine;
  const mgr = new SessionManager({ log, kvstore, engine, defaultMaxContextTokens: 1024, maxContextLimit: 4096, commitChecksums: !!checksums, backend: "cpu", defaultKvDtype: 1 as never });
  const retrieval = resolveRetrieval({ pageSize: P, sinkTokens: P, windowTokens: P, selectTokens: 2 * P, denseLayers: [1] } as never, LAYERS);
  const attach = { committedPages: [], layout: checksums?.layout } as unknown as AttachSessionResponse;
  const host = checksums ? ({ store: checksums.store, manifest: checksums.manifest } as never) : undefined;
  const s = new ComputeSession("s1", 2 as never, { layers: LAYERS, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 } as never, retrieval, 1024, attach, host, 7, { kind: "attention" });
  /** `tokens` appended to every layer; the engine has offloaded their full pages. */
  const append = (tokens: number) => {
    s.layerTokens.fill(tokens);
    filled.fill(Math.floor(tokens / P));
  };
  return { calls, mgr, s, filled, append };
}

describe("page commits from the compute tier", () => {
  it("commit every offloading layer that filled pages in one call, and nothing when none filled", async () => {
    const { calls, mgr, s, append } = setup();
    append(2 * P + 7);
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ sessionId: "s1", layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: 2 * P + 7 });
    // Layer 1 is dense (no pages offloaded); the others committed pages [0, 2).
    expect(calls[0].layers).toEqual([0, 2, 3, 4].map((layer) => ({ layer, firstPage: 0, count: 2, checksums: [] })));
    append(3 * P - 1);
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(1);
    append(3 * P);
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(2);
    expect(calls[1].layers.map((e) => [e.layer, e.firstPage, e.count])).toEqual([[0, 2, 1], [2, 2, 1], [3, 2, 1], [4, 2, 1]]);
    expect(s.commitError).toBeUndefined();
  });

  it("a single layer goes as a plain single-layer request", async () => {
    const { calls, mgr, s, filled } = setup();
    s.layerTokens.fill(P + 1);
    filled[3] = 1;
    mgr.commitProgress(s, 3);
    await s.commitChain;
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({ sessionId: "s1", layer: 3, firstPage: 0, count: 1, checksums: [], contextTokens: P + 1, layers: [] });
    expect(calls[0].metadata.length).toBe(0);
  });

  it("a layer ahead of the others waits for them: pages are committed only where every layer holds them", async () => {
    const { calls, mgr, s, filled } = setup();
    // Layer 0 holds three pages, the others one and a half: only page 0 may go.
    s.layerTokens.fill(P + P / 2);
    s.layerTokens[0] = 3 * P;
    filled.fill(1);
    filled[0] = 3;
    mgr.commitProgress(s, 0);
    await s.commitChain;
    expect(calls.flatMap((c) => (c.layers.length ? c.layers : [c])).map((e) => [e.layer, e.firstPage, e.count])).toEqual([0, 2, 3, 4].map((l) => [l, 0, 1]));
    // The last layer to catch up lets the waiting pages of every layer go.
    s.layerTokens.fill(3 * P);
    filled.fill(3);
    mgr.commitProgress(s, 4);
    await s.commitChain;
    expect(calls).toHaveLength(2);
    expect(calls[1].layers.map((e) => [e.layer, e.firstPage, e.count])).toEqual([0, 2, 3, 4].map((l) => [l, 1, 2]));
  });

  it("commits only what the engine reports offloaded, not what the token count implies", async () => {
    const { calls, mgr, s, filled } = setup();
    // Every layer holds two full pages of tokens, but layer 0's second offload is not complete.
    s.layerTokens.fill(2 * P);
    filled.fill(2);
    filled[0] = 1;
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls[0].layers.map((e) => [e.layer, e.firstPage, e.count])).toEqual([[0, 0, 1], [2, 0, 2], [3, 0, 2], [4, 0, 2]]);
    filled[0] = 2;
    mgr.commitProgressAll(s);
    await s.commitChain;
    expect(calls).toHaveLength(2);
    expect(calls[1]).toMatchObject({ layer: 0, firstPage: 1, count: 1, layers: [] });
  });

  it("with checksums: each page's CRC32C, computed off the main thread; commit points during the checksums go with the next commit", async () => {
    const pageBytes = 4099;
    const { seg, manifest, layout, sums } = storeOf(pageBytes, 200);
    // The store as the manager sees it; the first checksum call brings a commit point (more pages
    // filled in every layer) while the checksums are computed.
    let asyncCalls = 0;
    let during: (() => void) | undefined;
    const store = {
      crc32cPages: () => {
        throw new Error("the commit path computes its checksums off the main thread");
      },
      crc32cPagesAsync: (offset: number, page: number, count: number) => {
        asyncCalls++;
        const p = seg.crc32cPagesAsync(offset, page, count);
        const f = during;
        during = undefined;
        f?.();
        return p;
      },
    } as unknown as ShmSegment;
    const { calls, mgr, s, append } = setup({ store, manifest, layout });
    append(100 * P + 3);
    during = () => {
      append(150 * P);
      mgr.commitProgressAll(s);
    };
    mgr.commitProgressAll(s);
    // The commit point from inside the first commit queued a second one on the chain.
    let chain: Promise<void> | undefined;
    while (chain !== s.commitChain) await (chain = s.commitChain);
    expect(asyncCalls).toBe(8);
    expect(calls).toHaveLength(2);
    // The first commit carries what was filled when it started (pages and context), nothing more.
    expect(calls[0]).toMatchObject({ layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: 100 * P + 3 });
    expect(calls[0].layers, why).toEqual([0, 2, 3, 4].map((layer) => ({ layer, firstPage: 0, count: 100, checksums: sums(layer, 0, 100) })));
    // The second one the rest: committedPages advanced to the first one's target only.
    expect(calls[1]).toMatchObject({ layer: 0, firstPage: 0, count: 0, checksums: [], contextTokens: 150 * P });
    expect(calls[1].layers, why).toEqual([0, 2, 3, 4].map((layer) => ({ layer, firstPage: 100, count: 50, checksums: sums(layer, 100, 50) })));
    expect(s.committedPages).toEqual([150, 0, 150, 150, 150]);
    expect(s.commitError).toBeUndefined();
  });

  it("with checksums: a store that cannot be read degrades the session (nothing is sent), and a later commit recovers", async () => {
    const { seg, manifest, layout, sums } = storeOf(1024, 100);
    let fail = true;
    const store = {
      crc32cPagesAsync: (offset: number, page: number, count: number) =>
        fail ? Promise.reject(new Error("segment '/x' was closed while its page checksums were computed")) : seg.crc32cPagesAsync(offset, page, count),
    } as unknown as ShmSegment;
    const { calls, mgr, s, filled } = setup({ store, manifest, layout });
    s.layerTokens.fill(3 * P);
    filled[2] = 3;
    mgr.commitProgress(s, 2);
    await s.commitChain;
    expect(calls).toHaveLength(0);
    expect(s.commitError?.message).toMatch(/its pages could not be prepared for commit \(segment '\/x' was closed/);
    expect(s.committedPages[2]).toBe(0);
    // The next commit point sends the whole range again.
    fail = false;
    s.layerTokens.fill(4 * P);
    filled[2] = 4;
    mgr.commitProgress(s, 2);
    await s.commitChain;
    expect(calls).toHaveLength(1);
    expect(calls[0], why).toMatchObject({ layer: 2, firstPage: 0, count: 4, checksums: sums(2, 0, 4), layers: [] });
    expect(s.commitError).toBeUndefined();
    expect(s.committedPages[2]).toBe(4);
  });
});
