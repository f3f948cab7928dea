/**
 * Session transfer between two kvstore processes (KvStoreTransferService), checked against what
 * the test itself wrote into the source's shared memory: random committed pages (and random bytes
 * past them that must not travel), a random tail and a manifest naming the pages. The export's
 * chunks and digest are checked with a bitwise CRC32C written here (not the service's table one);
 * the import must reproduce exactly those bytes, and nothing past them. Then the failures: a
 * corrupted chunk or digest is DATA_LOSS with nothing imported and the source intact; a cancelled
 * import, one that ends early, and every malformed or out-of-bounds message (a seeded fuzz over
 * the header's fields and the chunk sequence) leave nothing behind (no session, no segment, the
 * capacity given back); an existing id is ALREADY_EXISTS; a session too big for the capacity is
 * RESOURCE_EXHAUSTED.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Metadata, status, type ClientWritableStream, type ServiceError } from "@grpc/grpc-js";
import { credentials } from "@grpc/grpc-js";
import {
  KvStoreTransferServiceClient,
  SessionPart,
  type AttachSessionResponse,
  type ExportSessionResponse,
  type GetStatsResponse,
  type ImportSessionRequest,
  type ImportSessionResponse,
  SessionTransferHeader,
} from "../../proto/gen/freekv/v1/kvstore.js";
import { loadShm } from "../../native/shm.js";
import { computeLayout, capacityPages } from "../../services/kvstore/layout.js";
import { prng, randomBytes } from "../helpers/prng.js";
import { QUIET, kvstoreClient, shmSegments, startService, unary, type ServiceProcess } from "../helpers/services.js";

/** Bitwise CRC32C (Castagnoli, reflected 0x82F63B78): the reference the service's checksums are compared with. */
function crcRef(chunks: Uint8Array[]): number {
  let c = 0xffffffff;
  for (const b of chunks) for (let i = 0; i < b.length; i++) {
    c ^= b[i];
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}

const G = { layers: 3, queryHeads: 4, kvHeads: 2, headDim: 16, kvDtype: 1 };
const R = { pageSize: 16, sinkTokens: 16, windowTokens: 32, selectTokens: 32, tau: 0.9, tauSet: true };
const MAX = 512;
/** The importing kvstore's FREEKV_WRITE_STALL_MS. */
const STALL_MS = 1500;
const env = (extra: Record<string, string> = {}) => ({ env: { ...QUIET, FREEKV_KVSTORE_PORT: "0", FREEKV_KVSTORE_METRICS_PORT: "0", ...extra } });

let a: ServiceProcess | undefined;
let b: ServiceProcess | undefined;
afterAll(async () => {
  await a?.stop();
  await b?.stop();
});

function transfer(address: string) {
  return new KvStoreTransferServiceClient(address, credentials.createInsecure(), { "grpc.max_receive_message_length": 64 << 20, "grpc.max_send_message_length": 64 << 20 });
}

function exportAll(address: string, sessionId: string, chunkBytes = 0): Promise<ExportSessionResponse[]> {
  const c = transfer(address);
  return new Promise((resolve, reject) => {
    const out: ExportSessionResponse[] = [];
    const call = c.exportSession({ sessionId, chunkBytes }, new Metadata(), { deadline: Date.now() + 20_000 });
    call.on("data", (m: ExportSessionResponse) => out.push(m));
    call.on("error", (e) => (c.close(), reject(e)));
    call.on("end", () => (c.close(), resolve(out)));
  });
}

/** Sends `msgs` as one ImportSession stream (then ends it, unless `end` is false); resolves with the answer or the error. */
function importAll(address: string, msgs: ImportSessionRequest[], opts: { end?: boolean; cancelAfterMs?: number } = {}): Promise<ImportSessionResponse | ServiceError> {
  const c = transfer(address);
  return new Promise((resolve) => {
    let call!: ClientWritableStream<ImportSessionRequest>;
    call = c.importSession(new Metadata(), { deadline: Date.now() + 20_000 }, (err, res) => (c.close(), resolve(err ?? res!)));
    for (const m of msgs) call.write(m);
    if (opts.cancelAfterMs !== undefined) setTimeout(() => call.cancel(), opts.cancelAfterMs);
    else if (opts.end !== false) call.end();
  });
}

const isErr = (r: unknown): r is ServiceError => r instanceof Error;

async function stats(address: string): Promise<GetStatsResponse> {
  const c = kvstoreClient(address);
  try {
    return await unary<GetStatsResponse>(c, "getStats", {});
  } finally {
    c.close();
  }
}

async function list(address: string): Promise<string[]> {
  const c = kvstoreClient(address);
  try {
    return (await unary<{ sessionIds: string[] }>(c, "listSessions", {})).sessionIds;
  } finally {
    c.close();
  }
}

/** Nothing of a failed import is left at B: no session, the capacity back at the baseline, no new segment. */
async function nothingLeft(baseline: GetStatsResponse, segments: Set<string>, id: string): Promise<void> {
  const t0 = Date.now();
  for (;;) {
    const s = await stats(b!.address);
    const now = shmSegments();
    const extra = [...now].filter((n) => !segments.has(n) && n.includes(`-kv-${b!.pid}-`));
    if (s.segmentBytes === baseline.segmentBytes && s.sessions === baseline.sessions && extra.length === 0) break;
    if (Date.now() - t0 > 5000) throw new Error(`the failed import left state behind: ${JSON.stringify(s)} vs ${JSON.stringify(baseline)}, segments ${extra.join(",")}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  expect(await list(b!.address)).not.toContain(id);
}

interface Source {
  id: string;
  attach: AttachSessionResponse;
  pages: number[];
  /** What the test wrote: each layer's committed pages, the tail, the manifest (after the test set its words). */
  store: Uint8Array[];
  tail: Uint8Array;
  manifest: Uint8Array;
}

/** A session at A with random committed pages, tail and manifest words, and random bytes past the pages (which must not travel). */
async function makeSource(id: string, rand: () => number): Promise<Source> {
  const c = kvstoreClient(a!.address);
  const attach = await unary<AttachSessionResponse>(c, "attachSession", { sessionId: id, geometry: G, retrieval: R, maxContextTokens: MAX });
  const { ShmSegment } = loadShm();
  const L = attach.layout!;
  const pages = Array.from({ length: G.layers }, () => 1 + Math.floor(rand() * 5));
  const tailTokens = 1 + Math.floor(rand() * (R.pageSize - 1));
  const store = ShmSegment.open(attach.store!.name);
  const tailSeg = ShmSegment.open(attach.tail!.name);
  const man = ShmSegment.open(attach.manifest!.name);
  try {
    const sb = new Uint8Array(store.buffer());
    const written: Uint8Array[] = [];
    for (let l = 0; l < G.layers; l++) {
      const bytes = randomBytes(pages[l] * L.pageBytes, rand);
      sb.set(bytes, l * L.layerStrideBytes);
      written.push(bytes);
      // Past the committed pages: must stay behind.
      sb.set(randomBytes(L.pageBytes, rand), l * L.layerStrideBytes + pages[l] * L.pageBytes);
    }
    const tail = randomBytes(tailSeg.size, rand);
    new Uint8Array(tailSeg.buffer()).set(tail);
    const mv = new DataView(man.buffer());
    const ctx = Math.min(...pages) * R.pageSize + tailTokens;
    mv.setBigUint64(8, BigInt(ctx), true);
    for (let l = 0; l < G.layers; l++) {
      mv.setUint32(16 + 8 * l, pages[l], true);
      mv.setUint32(20 + 8 * l, tailTokens, true);
    }
    // The kvstore acknowledges all but the last page of layer 0 (the manifest says more: it travels too).
    const checksumsOf = (l: number, n: number) => Array.from({ length: n }, (_, p) => crcRef([written[l].subarray(p * L.pageBytes, (p + 1) * L.pageBytes)]));
    const committed = pages.map((p, l) => (l === 0 ? p - 1 : p));
    await unary(c, "commitPages", {
      sessionId: id,
      contextTokens: Math.max(...pages) * R.pageSize + tailTokens,
      metadata: Buffer.from(JSON.stringify({ kind: "attention", note: randomBytes(8, rand).join(",") })),
      layers: committed.map((n, l) => ({ layer: l, firstPage: 0, count: n, checksums: checksumsOf(l, n) })).filter((e) => e.count > 0),
    });
    const attached = await unary<AttachSessionResponse>(c, "attachSession", { sessionId: id });
    return { id, attach: attached, pages, store: written, tail, manifest: new Uint8Array(man.buffer()).slice() };
  } finally {
    store.close();
    tailSeg.close();
    man.close();
    c.close();
  }
}

describe("session transfer between kvstores", () => {
  const rand = prng(Number(process.env.FREEKV_TEST_SEED ?? 4242));
  let src: Source;
  let exported: ExportSessionResponse[];
  beforeAll(async () => {
    a = await startService("kvstore", env());
    b = await startService("kvstore", env({ FREEKV_KVSTORE_CAPACITY_BYTES: String(8 << 20), FREEKV_WRITE_STALL_MS: String(STALL_MS) }));
    src = await makeSource(`moved-${Math.floor(rand() * 1e9)}`, rand);
    exported = await exportAll(a.address, src.id, 4096);
  }, 60_000);

  it("exports the header, exactly the committed pages, the tail and the manifest, each chunk and the whole checksummed", () => {
    const h = exported[0].item?.$case === "header" ? exported[0].item.value : undefined;
    expect(h).toBeDefined();
    expect(h!.sessionId).toBe(src.id);
    expect(h!.geometry).toEqual(G);
    expect(h!.maxContextTokens).toBe(MAX);
    expect(h!.exportedPages).toEqual(src.pages);
    expect(h!.committedPages).toEqual(src.pages.map((p, l) => (l === 0 ? p - 1 : p)));
    expect(h!.layout).toEqual(src.attach.layout);
    const chunks = exported.slice(1, -1).map((m) => (m.item?.$case === "chunk" ? m.item.value : undefined));
    expect(chunks.every((c) => c !== undefined && c.data.length <= 4096 && c.data.length > 0)).toBe(true);
    for (const c of chunks) expect(c!.crc32c).toBe(crcRef([c!.data]));
    const join = (part: SessionPart, layer = 0) => Buffer.concat(chunks.filter((c) => c!.part === part && (part !== SessionPart.SESSION_PART_STORE || c!.layer === layer)).map((c) => c!.data));
    for (let l = 0; l < G.layers; l++) expect(Buffer.compare(join(SessionPart.SESSION_PART_STORE, l), Buffer.from(src.store[l]))).toBe(0);
    expect(Buffer.compare(join(SessionPart.SESSION_PART_TAIL), Buffer.from(src.tail.subarray(0, Number(h!.tailBytes))))).toBe(0);
    expect(Buffer.compare(join(SessionPart.SESSION_PART_MANIFEST), Buffer.from(src.manifest.subarray(0, Number(h!.manifestBytes))))).toBe(0);
    const last = exported.at(-1)!.item;
    expect(last?.$case).toBe("digest");
    const d = last!.$case === "digest" ? last!.value : undefined;
    expect(d!.crc32c).toBe(crcRef([SessionTransferHeader.encode(h!).finish(), ...chunks.map((c) => c!.data)]));
    expect(d!.chunks).toBe(chunks.length);
    expect(d!.dataBytes).toBe(chunks.reduce((s, c) => s + c!.data.length, 0));
  });

  it("refuses a corrupted chunk, digest or header with DATA_LOSS and imports nothing; the source stays intact", async () => {
    const baseline = await stats(b!.address);
    const segments = shmSegments();
    for (let trial = 0; trial < 6; trial++) {
      const msgs = structuredClone(exported) as ImportSessionRequest[];
      const h = msgs[0].item?.$case === "header" ? msgs[0].item.value : undefined;
      if (trial === 4) {
        // A header changed on the way, still inside every bound: fewer committed pages in a layer.
        const layers = h!.committedPages.flatMap((c, l) => (c > 0 ? [l] : []));
        const l = layers[Math.floor(rand() * layers.length)];
        h!.committedPages[l] = Math.floor(rand() * h!.committedPages[l]);
      } else if (trial === 5) {
        // ... or another context length.
        h!.contextTokens = Math.floor(rand() * Number(h!.contextTokens));
      } else if (trial < 3) {
        // A flipped bit in a random chunk's data, its checksum left as sent.
        const k = 1 + Math.floor(rand() * (msgs.length - 2));
        const c = msgs[k].item!.$case === "chunk" ? msgs[k].item!.value : undefined;
        const data = Buffer.from(c!.data);
        data[Math.floor(rand() * data.length)] ^= 1 << Math.floor(rand() * 8);
        c!.data = data;
      } else {
        const last = msgs.at(-1)!.item;
        if (last?.$case !== "digest") throw new Error("the export did not end with its digest");
        last.value.crc32c = (last.value.crc32c ^ 0x10) >>> 0;
      }
      const r = await importAll(b!.address, msgs);
      expect(isErr(r) && r.code, isErr(r) ? r.details : "imported").toBe(status.DATA_LOSS);
      await nothingLeft(baseline, segments, src.id);
    }
    // The source: still listed, and its export unchanged.
    expect(await list(a!.address)).toContain(src.id);
    const again = await exportAll(a!.address, src.id, 4096);
    expect(again).toEqual(exported);
  });

  it("leaves nothing behind when the import is cancelled or ends before the digest", async () => {
    const baseline = await stats(b!.address);
    const segments = shmSegments();
    const half = exported.slice(0, Math.max(2, Math.floor(exported.length / 2))) as ImportSessionRequest[];
    const cancelled = await importAll(b!.address, half, { cancelAfterMs: 200 });
    expect(isErr(cancelled) && cancelled.code).toBe(status.CANCELLED);
    await nothingLeft(baseline, segments, src.id);
    const early = await importAll(b!.address, exported.slice(0, -1) as ImportSessionRequest[]);
    expect(isErr(early) && early.code).toBe(status.INVALID_ARGUMENT);
    await nothingLeft(baseline, segments, src.id);
  });

  it("ends an import whose sender stops sending in the middle (no deadline of its own) after FREEKV_WRITE_STALL_MS, leaving nothing", async () => {
    const baseline = await stats(b!.address);
    const segments = shmSegments();
    const part = exported.slice(0, 1 + Math.floor(rand() * (exported.length - 2))) as ImportSessionRequest[];
    const t0 = Date.now();
    const stalled = await importAll(b!.address, part, { end: false });
    const ms = Date.now() - t0;
    expect(isErr(stalled) && stalled.code, isErr(stalled) ? stalled.details : "answered").toBe(status.DEADLINE_EXCEEDED);
    expect(isErr(stalled) && stalled.details).toMatch(new RegExp(`sent nothing for ${STALL_MS} ms`));
    expect(ms).toBeGreaterThanOrEqual(STALL_MS - 50);
    expect(ms).toBeLessThan(15_000); // the call's own deadline is 20 s
    await nothingLeft(baseline, segments, src.id);
  });

  it("imports the session byte for byte, publishes it only then, and refuses the id a second time", async () => {
    const r = await importAll(b!.address, exported as ImportSessionRequest[]);
    expect(isErr(r) ? r.details : r.sessionId).toBe(src.id);
    const c = kvstoreClient(b!.address);
    const got = await unary<AttachSessionResponse>(c, "attachSession", { sessionId: src.id });
    c.close();
    expect(got.created).toBe(false);
    expect(got.committedPages).toEqual(src.attach.committedPages);
    expect(got.metadata).toEqual(src.attach.metadata);
    const { ShmSegment } = loadShm();
    const L = got.layout!;
    const store = ShmSegment.open(got.store!.name);
    const tail = ShmSegment.open(got.tail!.name);
    const man = ShmSegment.open(got.manifest!.name);
    try {
      const sb = new Uint8Array(store.buffer());
      for (let l = 0; l < G.layers; l++) {
        const at = l * L.layerStrideBytes;
        expect(Buffer.compare(Buffer.from(sb.subarray(at, at + src.pages[l] * L.pageBytes)), Buffer.from(src.store[l]))).toBe(0);
        // The page past the exported ones was random at the source: here it was never written.
        const past = sb.subarray(at + src.pages[l] * L.pageBytes, at + (src.pages[l] + 1) * L.pageBytes);
        expect(past.every((x) => x === 0)).toBe(true);
      }
      expect(Buffer.compare(Buffer.from(new Uint8Array(tail.buffer()).subarray(0, src.tail.length)), Buffer.from(src.tail))).toBe(0);
      expect(Buffer.compare(Buffer.from(new Uint8Array(man.buffer()).subarray(0, src.manifest.length)), Buffer.from(src.manifest))).toBe(0);
    } finally {
      store.close();
      tail.close();
      man.close();
    }
    const twice = await importAll(b!.address, exported as ImportSessionRequest[]);
    expect(isErr(twice) && twice.code).toBe(status.ALREADY_EXISTS);
    const kc = kvstoreClient(b!.address);
    await unary(kc, "releaseSession", { sessionId: src.id });
    kc.close();
  });

  it("answers malformed, out-of-order and out-of-bounds messages with INVALID_ARGUMENT and keeps nothing (seeded fuzz)", async () => {
    const baseline = await stats(b!.address);
    const segments = shmSegments();
    const header = () => structuredClone((exported[0].item as { value: SessionTransferHeader }).value);
    const withHeader = (h: SessionTransferHeader): ImportSessionRequest[] => [{ item: { $case: "header", value: h } }, ...(structuredClone(exported.slice(1)) as ImportSessionRequest[])];
    const big = () => 1 + Math.floor(rand() * 2 ** 31);
    const cases: Array<[string, () => ImportSessionRequest[]]> = [
      ["no header", () => exported.slice(1) as ImportSessionRequest[]],
      ["empty message", () => [{ item: undefined }]],
      ["two headers", () => [exported[0] as ImportSessionRequest, ...(exported as ImportSessionRequest[])]],
      ["bad id", () => withHeader({ ...header(), sessionId: "a/b" })],
      ["layout page_bytes", () => withHeader({ ...header(), layout: { ...header().layout!, pageBytes: header().layout!.pageBytes + 1 + Math.floor(rand() * 100) } })],
      ["layout capacity", () => withHeader({ ...header(), layout: { ...header().layout!, capacityPages: big() } })],
      ["exported past capacity", () => withHeader({ ...header(), exportedPages: header().exportedPages.map((p, l) => (l === 1 ? MAX / R.pageSize + 1 + Math.floor(rand() * 1000) : p)) })],
      ["committed past exported", () => withHeader({ ...header(), committedPages: header().exportedPages.map((p) => p + 1) })],
      ["pages per layer", () => withHeader({ ...header(), exportedPages: header().exportedPages.slice(1) })],
      ["tail bytes", () => withHeader({ ...header(), tailBytes: Number(header().tailBytes) + 1 + Math.floor(rand() * 1000) })],
      ["manifest bytes", () => withHeader({ ...header(), manifestBytes: big() })],
      ["context past max", () => withHeader({ ...header(), contextTokens: MAX + 1 + Math.floor(rand() * 1000) })],
      ["geometry", () => withHeader({ ...header(), geometry: { ...G, kvHeads: 3 } })],
      ["max context 0", () => withHeader({ ...header(), maxContextTokens: 0 })],
      [
        "chunk skipped",
        () => {
          const m = structuredClone(exported) as ImportSessionRequest[];
          m.splice(1 + Math.floor(rand() * (m.length - 3)), 1);
          return m;
        },
      ],
      [
        "chunks swapped",
        () => {
          const m = structuredClone(exported) as ImportSessionRequest[];
          const k = 1 + Math.floor(rand() * (m.length - 3));
          [m[k], m[k + 1]] = [m[k + 1], m[k]];
          return m;
        },
      ],
      [
        "chunk past its part",
        () => {
          const m = structuredClone(exported) as ImportSessionRequest[];
          const c = (m[1].item as { value: { data: Uint8Array; crc32c: number } }).value;
          c.data = Buffer.concat([Buffer.from(c.data), Buffer.from(randomBytes(Number(header().layout!.layerStrideBytes), rand))]);
          c.crc32c = crcRef([c.data]);
          return m;
        },
      ],
      [
        "chunk of the wrong layer",
        () => {
          const m = structuredClone(exported) as ImportSessionRequest[];
          (m[1].item as { value: { layer: number } }).value.layer = 1 + Math.floor(rand() * 5);
          return m;
        },
      ],
      ["after the digest", () => [...(structuredClone(exported) as ImportSessionRequest[]), exported[1] as ImportSessionRequest]],
    ];
    for (const [name, make] of cases) {
      const r = await importAll(b!.address, make());
      expect(isErr(r) ? `${name}: ${status[r.code]}` : `${name}: imported`, isErr(r) ? r.details : "").toBe(`${name}: INVALID_ARGUMENT`);
      await nothingLeft(baseline, segments, src.id);
    }
    // Bytes that do not decode as the message.
    const c = transfer(b!.address);
    const raw = await new Promise<ServiceError>((resolve) => {
      const call = c.makeClientStreamRequest("/freekv.v1.KvStoreTransferService/ImportSession", (x: Buffer) => x, (x: Buffer) => x, new Metadata(), { deadline: Date.now() + 10_000 }, (e) => resolve(e!));
      call.write(Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, ...randomBytes(16, rand)]));
      call.end();
    });
    c.close();
    expect(raw.code).toBe(status.INVALID_ARGUMENT);
    await nothingLeft(baseline, segments, src.id);
  });

  it("refuses a session bigger than the free capacity (RESOURCE_EXHAUSTED) before touching memory", async () => {
    const baseline = await stats(b!.address);
    const segments = shmSegments();
    // A consistent header of a session whose context needs more than B's 8 MiB (an import
    // reserves the context it brings).
    const maxCtx = 1 << 16;
    const retrieval = (exported[0].item as { value: SessionTransferHeader }).value.retrieval!;
    const cap = capacityPages(maxCtx, retrieval.pageSize);
    const L = computeLayout(G, retrieval, cap);
    const h: SessionTransferHeader = {
      ...structuredClone((exported[0].item as { value: SessionTransferHeader }).value),
      maxContextTokens: maxCtx,
      contextTokens: maxCtx,
      layout: { pageSize: retrieval.pageSize, capacityPages: cap, pageBytes: L.pageBytes, headPageBytes: L.headPageBytes, layerStrideBytes: L.layerStride, stagingBufferBytes: L.stagingBufferBytes, tailLayerBytes: L.tailLayerBytes },
      tailBytes: L.tailBytes,
      manifestBytes: L.manifestBytes,
    };
    const r = await importAll(b!.address, [{ item: { $case: "header", value: h } }]);
    expect(isErr(r) && r.code, isErr(r) ? r.details : "").toBe(status.RESOURCE_EXHAUSTED);
    await nothingLeft(baseline, segments, src.id);
  });

  it("removes the segments of an import still under way when the kvstore drains", async () => {
    const c = await startService("kvstore", env({ FREEKV_SHUTDOWN_GRACE_MS: "500" }));
    const mine = () => [...shmSegments()].filter((n) => n.includes(`-kv-${c.pid}-`));
    const pending = importAll(c.address, exported.slice(0, 3) as ImportSessionRequest[], { end: false });
    const t0 = Date.now();
    while (mine().length === 0 && Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 20));
    expect(mine().length).toBeGreaterThan(0);
    expect((await c.stop("SIGTERM")).code).toBe(0);
    expect(mine()).toEqual([]);
    const r = await pending;
    expect(isErr(r)).toBe(true);
  });

  it("bounds ExportSession's request", async () => {
    const cases: Array<[unknown, number]> = [
      [{ sessionId: "no-such-session" }, status.NOT_FOUND],
      [{ sessionId: "a b" }, status.INVALID_ARGUMENT],
      [{ sessionId: src.id, chunkBytes: 100 }, status.INVALID_ARGUMENT],
      [{ sessionId: src.id, chunkBytes: (4 << 20) + 1 }, status.INVALID_ARGUMENT],
    ];
    for (const [req, code] of cases) {
      const e = await exportAll(a!.address, (req as { sessionId: string }).sessionId, (req as { chunkBytes?: number }).chunkBytes ?? 0).then(
        () => undefined,
        (x: ServiceError) => x,
      );
      expect(e?.code, JSON.stringify(req)).toBe(code);
    }
  });
});
