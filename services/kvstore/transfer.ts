/**
 * Session transfer between kvstores (freekv.v1.KvStoreTransferService): what moves a session from
 * one pod to another for drains and rebalancing.
 *
 * ExportSession streams, under the session's lock, a header (geometry, retrieval, layout, max
 * context, metadata, the pages the kvstore acknowledged, the pages that follow, context tokens,
 * and the mover's id of the transfer when it gave one),
 * then the bytes in chunks of at most 4 MiB, each with its CRC32C: per layer the store pages
 * [0, exported_pages) (the pages the engine wrote per the session's manifest, which includes dense
 * layers the compute tier does not commit; never the rest of the segment), then the whole tail,
 * then the whole manifest; and last a digest, the CRC32C of the header's protobuf encoding followed
 * by every chunk's data in order (so the page counts and context the receiver publishes are covered
 * too). Before the digest, the committed pages just sent are checksummed again and compared with
 * the checksums taken at their commits (Scrubber.verify): a page changed since its commit is
 * DATA_LOSS, never a copy that the receiver would take as good.
 *
 * ImportSession checks the header before any memory is touched (the id, the geometry and
 * retrieval, the layout it computes itself from them, every page count against the capacity, the
 * byte counts against the layout, then the free capacity), makes and counts the segments, writes
 * each chunk where the stream order says it goes (a chunk out of order, out of bounds or of the
 * wrong size is INVALID_ARGUMENT; a chunk whose CRC32C differs is DATA_LOSS), and at the digest
 * recomputes it from the bytes now in its own segments, read in pieces of DIGEST_PIECE_BYTES (a
 * layer can be more than one ArrayBuffer holds; DATA_LOSS when it differs), checks the
 * manifest against the pages sent, and checksums the committed pages it now holds for its own
 * scrubber, which compares them from its first pass. The session becomes visible (directory, ListSessions,
 * AttachSession) only when the stream ends after a verified digest; an error, a cancelled stream,
 * a deadline, a stream that ends early or sends anything after the digest removes the segments.
 */
import { status, type sendUnaryData, type ServerReadableStream, type ServerWritableStream } from "@grpc/grpc-js";
import { Counter, type Registry } from "prom-client";
import type {
  ExportSessionRequest,
  ExportSessionResponse,
  ImportSessionRequest,
  ImportSessionResponse,
  SessionTransferHeader,
  KvStoreTransferServiceServer,
} from "../../proto/gen/freekv/v1/kvstore.js";
import { SessionPart, SessionTransferHeader as HeaderCodec } from "../../proto/gen/freekv/v1/kvstore.js";
import { loadShm, type ShmSegment } from "../../native/shm.js";
import { callScope } from "../common/cancellation.js";
import { consume, send } from "../common/streams.js";
import { crc32c } from "../common/crc32c.js";
import { ServiceError, invalidArgument, toStatus } from "../common/errors.js";
import { resolveGeometry } from "../common/geometry.js";
import type { Logger } from "../common/log.js";
import { assertDecoded } from "../common/malformed.js";
import { resolveRetrieval } from "../common/retrieval.js";
import { computeLayout, requestLayout, toSegmentLayout } from "./layout.js";
import type { SessionSegments } from "./segments.js";
import { MAX_METADATA_BYTES, type ImportReservation, type KvStore } from "./store.js";
import { checkSessionId } from "../common/session-id.js";

/** Largest data chunk (bytes); receivers take messages up to 64 MiB, so a chunk and its framing always fit. */
export const MAX_CHUNK_BYTES = 4 << 20;
export const DEFAULT_CHUNK_BYTES = 1 << 20;
export const MIN_CHUNK_BYTES = 4096;

export interface TransferMetrics {
  /** Transfers by direction (export, import) and result (ok or the status name). */
  transfers: Counter<"op" | "result">;
  /** Session bytes sent or received. */
  bytes: Counter<"op">;
}

export function createTransferMetrics(registry: Registry): TransferMetrics {
  return {
    transfers: new Counter({ name: "freekv_kvstore_transfers_total", help: "Session exports and imports (op) by result (ok or the gRPC status)", labelNames: ["op", "result"], registers: [registry] }),
    bytes: new Counter({ name: "freekv_kvstore_transfer_bytes_total", help: "Session bytes exported or imported (op)", labelNames: ["op"], registers: [registry] }),
  };
}

const dataLoss = (message: string) => new ServiceError(status.DATA_LOSS, message);

/** One contiguous range of a session that travels: a layer's exported store pages, the tail, the manifest. */
interface Region {
  part: SessionPart;
  layer: number;
  /** The segment's mapping, or the store segment until a range of it is mapped (see view). */
  buffer: ArrayBuffer | ShmSegment;
  base: number;
  bytes: number;
}

/**
 * The ranges in stream order (empty layers left out). Each segment's mapping is taken once per
 * transfer: every ShmSegment.buffer() call makes a new external ArrayBuffer of the whole segment
 * (kept until the segment is closed, and counted by V8 as external memory, which triggers
 * collections), so taking one per chunk made a 4 KiB-chunk transfer ~100x slower.
 */
function regions(maps: Mappings, layerStride: number, pageBytes: number, pages: number[], tailBytes: number, manifestBytes: number): Region[] {
  const out: Region[] = [];
  pages.forEach((p, layer) => {
    if (p > 0) out.push({ part: SessionPart.SESSION_PART_STORE, layer, buffer: maps.store, base: layer * layerStride, bytes: p * pageBytes });
  });
  out.push({ part: SessionPart.SESSION_PART_TAIL, layer: 0, buffer: maps.tail, base: 0, bytes: tailBytes });
  out.push({ part: SessionPart.SESSION_PART_MANIFEST, layer: 0, buffer: maps.manifest, base: 0, bytes: manifestBytes });
  return out;
}

/**
 * The manifest is mapped whole once (the native readManifest takes one ArrayBuffer; createSegments
 * maps it whole too). The store, which can be larger than the 4 GiB one ArrayBuffer covers (an 8B
 * model's 32K session), and the tail (layers x one page: large only for large pages and heads) are
 * reached a range at a time: one ArrayBuffer per region when the region fits in MAX_RANGE, else
 * one per chunk (and one per digest piece).
 */
interface Mappings {
  store: ShmSegment;
  tail: ShmSegment;
  manifest: ArrayBuffer;
}

const mappings = (s: SessionSegments): Mappings => ({ store: s.store, tail: s.tail, manifest: s.manifest.buffer() });

const isSegment = (b: ArrayBuffer | ShmSegment): b is ShmSegment => typeof (b as ShmSegment).crc32cPages === "function";

/**
 * Largest range taken as one ArrayBuffer. The hard limit is Node's: an ArrayBuffer (and so
 * ShmSegment.buffer(), an external ArrayBuffer made through N-API) holds at most
 * buffer.constants.MAX_LENGTH bytes: 2^32 on Node 20 (V8 11.3), where ShmSegment.buffer() of more
 * throws ERR_BUFFER_TOO_LARGE ("Cannot create a Buffer larger than 0x100000000 bytes"), which a
 * call answers as INTERNAL. A typed array over it has the same bound; the native crc32c itself
 * takes any size.
 */
const MAX_RANGE = 2 ** 31;

/**
 * Bytes the import's digest checksums per call: it reads a region (a layer's pages can be many
 * GiB) in pieces of this size, never as one buffer past MAX_RANGE.
 */
export const DIGEST_PIECE_BYTES = 64 << 20;

/**
 * CRC32C of bytes [base, base + bytes) of `source` (a mapped ArrayBuffer or a segment), continuing
 * from `seed`, read `pieceBytes` at a time: the same value as one pass over the whole range
 * (CRC32C chains: crc32c(b, crc32c(a)) === crc32c(a ++ b)), but no buffer covers more than
 * `pieceBytes`, so a range past the ArrayBuffer limit (MAX_RANGE) is checksummed too. A segment's
 * piece is mapped on its own (ShmSegment.buffer(offset, length)); an ArrayBuffer's is a view.
 */
export function crc32cPiecewise(source: ArrayBuffer | ShmSegment, base: number, bytes: number, seed = 0, pieceBytes = DIGEST_PIECE_BYTES): number {
  let crc = seed >>> 0;
  for (const piece of pieces(source, base, bytes, pieceBytes)) crc = crc32c(piece, crc);
  return crc;
}

/**
 * crc32cPiecewise, letting the event loop run between two pieces: the import's digest reads the
 * whole session (17 GB at 128K tokens of an 8B model, seconds), during which the kvstore answers
 * its other calls (commits, health) instead of holding them.
 */
export async function crc32cPiecewiseAsync(source: ArrayBuffer | ShmSegment, base: number, bytes: number, seed = 0, pieceBytes = DIGEST_PIECE_BYTES): Promise<number> {
  let crc = seed >>> 0;
  for (const piece of pieces(source, base, bytes, pieceBytes)) {
    crc = crc32c(piece, crc);
    await new Promise((r) => setImmediate(r));
  }
  return crc;
}

function* pieces(source: ArrayBuffer | ShmSegment, base: number, bytes: number, pieceBytes: number): Generator<Uint8Array> {
  if (!Number.isSafeInteger(pieceBytes) || pieceBytes < 1 || pieceBytes > MAX_RANGE) throw new RangeError(`pieceBytes must be an integer in [1, ${MAX_RANGE}], got ${pieceBytes}`);
  if (!Number.isSafeInteger(base) || base < 0 || !Number.isSafeInteger(bytes) || bytes < 0) throw new RangeError(`base and bytes must be integers >= 0, got ${base} and ${bytes}`);
  for (let off = 0; off < bytes; off += pieceBytes) {
    const n = Math.min(pieceBytes, bytes - off);
    yield isSegment(source) ? new Uint8Array(source.buffer(base + off, n)) : new Uint8Array(source, base + off, n);
  }
}

const view = (r: Region, offset: number, n: number): Uint8Array => {
  if (!isSegment(r.buffer)) return new Uint8Array(r.buffer, r.base + offset, n);
  if (r.bytes <= MAX_RANGE) {
    r.buffer = r.buffer.buffer(r.base, r.bytes);
    r.base = 0;
    return new Uint8Array(r.buffer, offset, n);
  }
  return new Uint8Array(r.buffer.buffer(r.base + offset, n));
};

const partName = (p: SessionPart) => SessionPart[p] ?? String(p);

/** Longest ExportSessionRequest.move_id (copied into the header), in UTF-8 bytes. */
export const MAX_MOVE_ID_BYTES = 128;

/** Where a transfer's digest starts: the CRC32C of the header's protobuf encoding (both sides encode the same fields). */
const headerSeed = (h: SessionTransferHeader): number => crc32c(HeaderCodec.encode(h).finish());

/** The export of one session, sent through `emit` (header, chunks, digest). Returns bytes and chunks sent. */
export async function exportSession(
  store: KvStore,
  req: ExportSessionRequest,
  emit: (m: ExportSessionResponse) => Promise<void>,
): Promise<{ dataBytes: number; chunks: number }> {
  checkSessionId(req.sessionId);
  const chunkBytes = req.chunkBytes || DEFAULT_CHUNK_BYTES;
  if (!Number.isInteger(chunkBytes) || chunkBytes < MIN_CHUNK_BYTES || chunkBytes > MAX_CHUNK_BYTES) {
    throw invalidArgument("chunk_bytes", `must be 0 (1 MiB) or in [${MIN_CHUNK_BYTES}, ${MAX_CHUNK_BYTES}], got ${req.chunkBytes}`);
  }
  if (req.moveId !== undefined && Buffer.byteLength(req.moveId) > MAX_MOVE_ID_BYTES) throw invalidArgument("move_id", `must be at most ${MAX_MOVE_ID_BYTES} bytes, got ${Buffer.byteLength(req.moveId)}`);
  return store.exclusive(req.sessionId, async (rec, segments, reservedPages) => {
    const layout = computeLayout(rec.geometry, rec.retrieval, rec.capacityPages);
    const maps = mappings(segments);
    const manifest = loadShm().readManifest(maps.manifest, rec.geometry.layers);
    // The pages the engine wrote (its manifest), at least those the kvstore acknowledged, never past
    // the reservation (the manifest is written by compute: a count past what has memory would read,
    // and on tmpfs allocate, pages nobody reserved).
    const exported = rec.committedPages.map((c, l) => Math.min(reservedPages, rec.capacityPages, Math.max(c, manifest.valid ? (manifest.committedPages[l] ?? 0) : 0)));
    const header: SessionTransferHeader = {
      sessionId: rec.sessionId,
      geometry: rec.geometry,
      retrieval: rec.retrieval,
      layout: toSegmentLayout(layout, rec.retrieval.pageSize, rec.capacityPages),
      maxContextTokens: rec.maxContextTokens,
      metadata: rec.metadata,
      committedPages: [...rec.committedPages],
      exportedPages: exported,
      contextTokens: Math.max(rec.contextTokens, manifest.valid ? manifest.contextTokens : 0),
      tailBytes: layout.tailBytes,
      manifestBytes: layout.manifestBytes,
      // The mover's id of this transfer, covered by the digest (headerSeed); absent when none was asked.
      ...(req.moveId !== undefined ? { moveId: req.moveId } : {}),
    };
    await emit({ item: { $case: "header", value: header } });
    // Chained chunk by chunk: no read here covers more than a chunk (a region past MAX_RANGE is
    // mapped a chunk at a time by view), whatever the size of a layer.
    let digest = headerSeed(header);
    let dataBytes = 0;
    let chunks = 0;
    for (const r of regions(maps, layout.layerStride, layout.pageBytes, exported, layout.tailBytes, layout.manifestBytes)) {
      for (let off = 0; off < r.bytes; off += chunkBytes) {
        const n = Math.min(chunkBytes, r.bytes - off);
        // A copy: the message is serialised later, and the mapping is not ours past this lock.
        const data = Buffer.from(view(r, off, n));
        const crc = crc32c(data);
        digest = crc32c(data, digest);
        dataBytes += n;
        chunks++;
        await emit({ item: { $case: "chunk", value: { part: r.part, layer: r.layer, offset: off, data, crc32c: crc } } });
      }
    }
    // The committed pages, checksummed after they were copied out, against their commits'
    // checksums: a page changed since its commit and before the scrubber's next pass over it went
    // out as it is now, so it is reported here (logged, counted, the session marked corrupt).
    for (const [layer, committed] of rec.committedPages.entries()) {
      if (committed === 0 || !store.scrubber) continue;
      const got = await segments.store.crc32cPagesAsync(layer * layout.layerStride, layout.pageBytes, committed);
      if (store.scrubber.verify(rec.sessionId, layer, 0, got)) break;
    }
    // The scrubber may also have found a page changed while the chunks went out (it does not take
    // the session's lock): no digest then, so the copy is never published.
    const corrupt = store.corruption(rec.sessionId);
    if (corrupt) throw corrupt;
    await emit({ item: { $case: "digest", value: { crc32c: digest, dataBytes, chunks } } });
    return { dataBytes, chunks };
  });
}

export interface SessionImportOptions {
  /** Bytes the digest checksums per call (crc32cPiecewise); DIGEST_PIECE_BYTES when left out. */
  digestPieceBytes?: number;
  /** How long an export waits for a peer that stopped reading, and an import for one that stopped sending (FREEKV_WRITE_STALL_MS; 0 or left out: no limit). */
  writeStallMs?: number;
}

/**
 * The receiving side of one import: takes the stream's messages one by one (`take`), then
 * `finish` once the stream ended; `abort` on any failure. Every size is checked before memory is
 * touched.
 */
export class SessionImport {
  private reservation: ImportReservation | undefined;
  private header: SessionTransferHeader | undefined;
  private plan: Region[] = [];
  private at = 0;
  private offset = 0;
  private dataBytes = 0;
  private chunks = 0;
  private digested = false;
  private pageBytes = 0;
  private layerStride = 0;
  /** Per layer, the CRC32C of each committed page as written here (taken after the digest). */
  private sums: Uint32Array[] = [];

  constructor(
    private readonly store: KvStore,
    private readonly options: SessionImportOptions = {},
  ) {}

  get sessionId(): string | undefined {
    return this.header?.sessionId;
  }

  async take(m: ImportSessionRequest): Promise<void> {
    assertDecoded(m);
    const item = m.item;
    if (!item) throw invalidArgument("item", "is required (header, chunk or digest)");
    if (this.digested) throw invalidArgument(item.$case, "comes after the digest, which ends the stream");
    if (item.$case === "header") return this.begin(item.value);
    if (!this.header) throw invalidArgument(item.$case, "before the header: the header comes first");
    if (item.$case === "chunk") return this.chunk(item.value);
    return this.digest(item.value);
  }

  private async begin(h: SessionTransferHeader): Promise<void> {
    if (this.header) throw invalidArgument("header", "a second header: a stream carries one session");
    checkSessionId(h.sessionId, "header.session_id");
    const geometry = resolveGeometry(h.geometry, "header.geometry");
    if (!h.retrieval) throw invalidArgument("header.retrieval", "is required");
    if (!Number.isInteger(h.maxContextTokens) || h.maxContextTokens < 1) throw invalidArgument("header.max_context_tokens", `must be >= 1, got ${h.maxContextTokens}`);
    const retrieval = resolveRetrieval(h.retrieval, geometry.layers, "header.retrieval", h.maxContextTokens);
    const { capacity, layout } = requestLayout(geometry, retrieval, h.maxContextTokens, "header.max_context_tokens");
    const want = toSegmentLayout(layout, retrieval.pageSize, capacity);
    const got = h.layout;
    if (!got) throw invalidArgument("header.layout", "is required");
    for (const k of Object.keys(want) as (keyof typeof want)[]) {
      if (got[k] !== want[k]) throw invalidArgument(`header.layout.${k}`, `is ${got[k]}, this kvstore lays the session out with ${want[k]} (a different build or configuration)`);
    }
    const pages = (field: string, v: number[]) => {
      if (v.length !== geometry.layers) throw invalidArgument(`header.${field}`, `must have one entry per layer (${geometry.layers}), got ${v.length}`);
      v.forEach((p, l) => {
        if (!Number.isInteger(p) || p < 0 || p > capacity) throw invalidArgument(`header.${field}[${l}]`, `must be in [0, ${capacity}] (capacity_pages), got ${p}`);
      });
    };
    pages("committed_pages", h.committedPages);
    pages("exported_pages", h.exportedPages);
    h.committedPages.forEach((c, l) => {
      if (c > h.exportedPages[l]) throw invalidArgument(`header.committed_pages[${l}]`, `${c} committed pages, but only ${h.exportedPages[l]} are sent`);
    });
    if (h.tailBytes !== layout.tailBytes) throw invalidArgument("header.tail_bytes", `must be the layout's ${layout.tailBytes}, got ${h.tailBytes}`);
    if (h.manifestBytes !== layout.manifestBytes) throw invalidArgument("header.manifest_bytes", `must be the layout's ${layout.manifestBytes}, got ${h.manifestBytes}`);
    if (!Number.isInteger(h.contextTokens) || h.contextTokens > h.maxContextTokens) throw invalidArgument("header.context_tokens", `must be <= max_context_tokens ${h.maxContextTokens}, got ${h.contextTokens}`);
    if (h.metadata.length > MAX_METADATA_BYTES) throw invalidArgument("header.metadata", `must be at most ${MAX_METADATA_BYTES} bytes, got ${h.metadata.length}`);
    // Checked first, memory after: the segments are made and counted now (RESOURCE_EXHAUSTED, ALREADY_EXISTS).
    // Memory for the context it brings (and every page sent), as the source's reservation grew to it.
    const reach = Math.max(Number(h.contextTokens), Math.max(0, ...h.exportedPages) * retrieval.pageSize);
    this.reservation = await this.store.reserveImport(h.sessionId, geometry, retrieval, h.maxContextTokens, h.metadata, Math.min(reach, h.maxContextTokens));
    this.header = h;
    this.pageBytes = layout.pageBytes;
    this.layerStride = layout.layerStride;
    this.plan = regions(mappings(this.reservation.segments), layout.layerStride, layout.pageBytes, h.exportedPages, layout.tailBytes, layout.manifestBytes);
  }

  private chunk(c: { part: SessionPart; layer: number; offset: number; data: Buffer | Uint8Array; crc32c: number }): void {
    const r = this.plan[this.at];
    const where = `chunk ${this.chunks}`;
    if (!r) throw invalidArgument(where, "more data than the header announced");
    if (c.part !== r.part || (r.part === SessionPart.SESSION_PART_STORE && c.layer !== r.layer)) {
      throw invalidArgument(`${where}.part`, `expected ${partName(r.part)}${r.part === SessionPart.SESSION_PART_STORE ? ` layer ${r.layer}` : ""}, got ${partName(c.part)} layer ${c.layer}`);
    }
    if (c.offset !== this.offset) throw invalidArgument(`${where}.offset`, `expected ${this.offset} (chunks come in order, without gaps or overlaps), got ${c.offset}`);
    const n = c.data.length;
    if (n < 1 || n > MAX_CHUNK_BYTES) throw invalidArgument(`${where}.data`, `must be 1 to ${MAX_CHUNK_BYTES} bytes, got ${n}`);
    if (n > r.bytes - this.offset) throw invalidArgument(`${where}.data`, `${n} bytes at offset ${this.offset} run past the ${r.bytes} bytes of ${partName(r.part)}`);
    const got = crc32c(c.data);
    if (got !== c.crc32c >>> 0) throw dataLoss(`${where} (${partName(r.part)} offset ${c.offset}): CRC32C ${got.toString(16)}, expected ${(c.crc32c >>> 0).toString(16)}; nothing was imported`);
    view(r, this.offset, n).set(c.data);
    this.offset += n;
    this.dataBytes += n;
    this.chunks++;
    if (this.offset === r.bytes) {
      this.at++;
      this.offset = 0;
    }
  }

  private async digest(d: { crc32c: number; dataBytes: number; chunks: number }): Promise<void> {
    if (this.at < this.plan.length) {
      const r = this.plan[this.at];
      throw invalidArgument("digest", `before all data: ${partName(r.part)}${r.part === SessionPart.SESSION_PART_STORE ? ` layer ${r.layer}` : ""} has ${this.offset} of ${r.bytes} bytes`);
    }
    if (d.dataBytes !== this.dataBytes || d.chunks !== this.chunks) throw dataLoss(`digest: the sender sent ${d.dataBytes} bytes in ${d.chunks} chunks, ${this.dataBytes} bytes in ${this.chunks} chunks arrived`);
    // Recomputed from the segments: what this kvstore holds now, not what it was sent; a region at a
    // time and each in pieces (a layer's pages can be more than one ArrayBuffer holds).
    let crc = headerSeed(this.header!);
    for (const r of this.plan) crc = await crc32cPiecewiseAsync(r.buffer, r.base, r.bytes, crc, this.options.digestPieceBytes);
    if (crc !== d.crc32c >>> 0) throw dataLoss(`digest: the session's CRC32C is ${crc.toString(16)} here, ${(d.crc32c >>> 0).toString(16)} at the sender; nothing was imported`);
    const h = this.header!;
    const m = loadShm().readManifest(this.plan[this.plan.length - 1].buffer as ArrayBuffer, h.exportedPages.length);
    if (m.corrupt) throw dataLoss("manifest: the sender's kvstore marked the session corrupt (a committed page changed after its commit); nothing was imported");
    if (!m.valid) throw invalidArgument("manifest", "the session's manifest is not a FreeKV manifest for its layers");
    m.committedPages.forEach((p, l) => {
      if (p > h.exportedPages[l]) throw invalidArgument("manifest", `layer ${l} has ${p} pages in its manifest, only ${h.exportedPages[l]} were sent`);
    });
    // The committed pages' checksums for this kvstore's scrubber: what was verified just now.
    const store = this.reservation!.segments.store;
    this.sums = await Promise.all(h.committedPages.map((c, l) => (c > 0 ? store.crc32cPagesAsync(l * this.layerStride, this.pageBytes, c) : Promise.resolve(new Uint32Array(0)))));
    this.digested = true;
  }

  /** The stream ended: publishes the session when its digest was verified. */
  async finish(): Promise<ImportSessionResponse> {
    if (!this.header) throw invalidArgument("header", "the stream ended without one");
    if (!this.digested) throw invalidArgument("digest", "the stream ended before the digest; nothing was imported");
    await this.store.publishImport(this.reservation!, this.header.committedPages, this.header.contextTokens, this.sums);
    this.reservation = undefined;
    return { sessionId: this.header.sessionId, dataBytes: this.dataBytes, chunks: this.chunks };
  }

  /** Removes what was written (a failed, cancelled or unfinished import). */
  abort(): void {
    if (this.reservation) this.store.dropImport(this.reservation);
    this.reservation = undefined;
  }

  get progress(): { dataBytes: number; chunks: number } {
    return { dataBytes: this.dataBytes, chunks: this.chunks };
  }
}

const resultOf = (code: number) => (code === status.OK ? "ok" : (status[code] ?? String(code)).toLowerCase());

export function transferService(store: KvStore, log: Logger, metrics?: TransferMetrics, options: SessionImportOptions = {}): KvStoreTransferServiceServer {
  return {
    exportSession(call: ServerWritableStream<ExportSessionRequest, ExportSessionResponse>) {
      const scope = callScope(call);
      const t0 = performance.now();
      exportSession(store, call.request, (m) => send(call, m, scope.signal, options.writeStallMs))
        .then(
          ({ dataBytes, chunks }) => {
            metrics?.transfers.inc({ op: "export", result: "ok" });
            metrics?.bytes.inc({ op: "export" }, dataBytes);
            log.info({ session: call.request.sessionId, dataBytes, chunks, ms: Math.round(performance.now() - t0) }, "session exported");
            call.end();
          },
          (e: unknown) => {
            const st = toStatus(e, log, "ExportSession", scope.signal);
            metrics?.transfers.inc({ op: "export", result: resultOf(st.code) });
            log.warn({ session: call.request.sessionId, code: status[st.code], err: st.details }, "session export failed");
            call.emit("error", st);
          },
        )
        .finally(() => scope.done());
    },
    importSession(call: ServerReadableStream<ImportSessionRequest, ImportSessionResponse>, callback: sendUnaryData<ImportSessionResponse>) {
      const scope = callScope(call);
      const imp = new SessionImport(store, options);
      const t0 = performance.now();
      consume(call, scope.signal, (m) => imp.take(m), options.writeStallMs)
        .then(() => imp.finish())
        .then(async (res) => {
          // The caller gave up while the import was verified and published: it is told CANCELLED or
          // DEADLINE_EXCEEDED (and keeps its copy, or retries), so the published session goes too;
          // otherwise its retry would meet ALREADY_EXISTS and the memory stay counted here.
          if (!scope.signal.aborted) return res;
          await store.release(res.sessionId).catch((e: Error) => log.error({ session: res.sessionId, err: e.message }, "cannot release an import whose caller gave up"));
          throw scope.signal.reason;
        })
        .then(
          (res) => {
            metrics?.transfers.inc({ op: "import", result: "ok" });
            metrics?.bytes.inc({ op: "import" }, res.dataBytes);
            log.info({ session: res.sessionId, dataBytes: res.dataBytes, chunks: res.chunks, ms: Math.round(performance.now() - t0) }, "session import verified and published");
            callback(null, res);
          },
          (e: unknown) => {
            imp.abort();
            const st = toStatus(e, log, "ImportSession", scope.signal);
            metrics?.transfers.inc({ op: "import", result: resultOf(st.code) });
            log.warn({ session: imp.sessionId, code: status[st.code], err: st.details, ...imp.progress }, "session import failed; what was written is removed");
            callback(st);
          },
        )
        .finally(() => scope.done());
    },
  };
}
