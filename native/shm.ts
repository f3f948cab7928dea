/**
 * The `freekv_shm` addon: POSIX shared-memory segments and the contract the tiers share (segment
 * layout, manifest, retrieval defaults and validator, enum names), without the engine, the model
 * runner or CUDA. The kvstore loads only this. The full addon (native/binding.ts) exports the same
 * contract functions, built from the same sources (native/src/engine/{Layout,Manifest,Validate,
 * AddonContract}.cpp).
 *
 * Numeric enums are the proto's (freekv.v1); native/src/engine/Retrieval.h defines the same
 * numbers and names, and `enums()` reports them so a test can compare.
 *
 * Loaded from `native/build/Release/freekv_shm.node` (or FREEKV_SHM_ADDON).
 */
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { DType, GroupCombine, RecallMode, RetrievalMode, SummaryKind } from "../proto/gen/freekv/v1/common.js";

/** A POSIX shared-memory segment mapped into this process. */
export interface ShmSegment {
  readonly name: string;
  readonly size: number;
  /**
   * The whole mapping as an ArrayBuffer (no copy), or bytes [offset, offset + length) of it (how a
   * segment over 4 GiB, more than one ArrayBuffer covers, is read). Detached by close(). A buffer
   * holds its segment object: a segment that was never closed is unmapped only once it and every
   * buffer it handed out are collected.
   */
  buffer(offset?: number, length?: number): ArrayBuffer;
  /** Unmaps; buffers handed out are detached. The name stays until unlink(). */
  close(): void;
  /**
   * close(), with the unmap on a worker thread (tearing down a touched mapping of gigabytes, and
   * freeing its pages once the name is gone, takes ~0.1 s per GB); resolves once it is unmapped.
   * The checks and the detaching of buffers happen at the call, as close() does them.
   */
  closeAsync(): Promise<void>;
  /**
   * Allocates memory for bytes [offset, offset + length) now (fallocate; the size is kept). A full
   * /dev/shm throws an Error with code "ENOSPC". Allocated pages are kept as they are.
   */
  allocate(offset: number, length: number): void;
  /**
   * allocate() of each [offset, length] range, off the main thread, all or none: a failure gives
   * back the ranges done (unless `rollback` is false: memory that may hold pages written through
   * another mapping meanwhile is never given back) and rejects with the same `code` as
   * allocate(). With `populateThreads` > 0
   * the memory is committed by write faults through this mapping from that many threads instead
   * (allocated and zeroed in parallel; offsets multiples of 4096; fallocate on kernels before
   * 5.14). The arguments are checked at the call (TypeError / RangeError); a close() meanwhile
   * rejects.
   */
  allocateAsync(ranges: readonly (readonly [offset: number, length: number])[], populateThreads?: number, rollback?: boolean): Promise<void>;
  /** Frees the memory of bytes [offset, offset + length) (they read as zeros after). */
  punch(offset: number, length: number): void;
  /** Memory the segment really holds (st_blocks * 512). */
  allocatedBytes(): number;
  /**
   * CRC32C of each of `count` pages of `pageBytes` from `offset`, read through the mapping (works
   * for segments over 4 GiB, which buffer() cannot cover); RangeError past the end. Many pages are
   * split over several threads (up to 8); the calling thread waits for them.
   */
  crc32cPages(offset: number, pageBytes: number, count: number): Uint32Array;
  /**
   * The same checksums as crc32cPages, computed off the main thread (split over several threads
   * when the pages are many): the event loop keeps running meanwhile. The arguments are checked
   * at the call, which throws the same TypeError / RangeError as crc32cPages (and "segment is
   * closed" after close()). A close() while the checksums run rejects the promise; the mapping
   * stays until they stopped, so no unmapped page is read.
   */
  crc32cPagesAsync(offset: number, pageBytes: number, count: number): Promise<Uint32Array>;
}

export interface ShmSegmentStatic {
  /** Creates a new segment (exclusive, mode 0600). Name: "/something". */
  create(name: string, size: number): ShmSegment;
  /** Maps an existing segment. */
  open(name: string): ShmSegment;
  /** Removes the name; returns false when it did not exist. */
  unlink(name: string): boolean;
}

export interface Geometry {
  layers: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
  kvDtype: DType;
}

export interface Retrieval {
  pageSize: number;
  sinkTokens: number;
  windowTokens: number;
  selectTokens: number;
  tau: number;
  summary: SummaryKind;
  combine: GroupCombine;
  mode: RetrievalMode;
  recall: RecallMode;
  denseLayers: number[];
}

/** Byte layout of a session's four segments (native/src/engine/Layout.h, the one definition). */
export interface NativeLayout {
  headPageBytes: number;
  pageBytes: number;
  layerStride: number;
  storeBytes: number;
  stagingBufferBytes: number;
  tailLayerBytes: number;
  tailBytes: number;
  manifestBytes: number;
  /** Offset of the per-layer query records in the manifest (two per layer, engine/Manifest.h). */
  manifestQueryOffset: number;
  /** Bytes of one query record (header + q[qHeads * headDim] float32). */
  manifestQueryRecordBytes: number;
}

/** What a manifest says (engine/Manifest.h). */
export interface ManifestState {
  /** The magic is there and the header's layer count is the one asked for. */
  valid: boolean;
  /** The kvstore marked the session corrupt (a committed page changed after its commit). */
  corrupt: boolean;
  layers: number;
  /** Tokens every layer holds. */
  contextTokens: number;
  /** Per layer: full pages written to the store. */
  committedPages: number[];
  /** Per layer: tokens of the partial page in the tail segment. */
  tailTokens: number[];
}

/** The first invalid field of a retrieval config, named as in `Retrieval` ("denseLayers[1]"). */
export interface RetrievalError {
  field: string;
  message: string;
}

/** Enum names (the proto's value names without their prefix, lower case) to numbers. */
export interface EnumNames {
  kvDtype: Record<string, number>;
  summary: Record<string, number>;
  combine: Record<string, number>;
  mode: Record<string, number>;
  recall: Record<string, number>;
}

/** The contract functions; both addons have them. */
export interface Contract {
  /** Byte layout of a session's segments; throws naming the invalid geometry or retrieval field. */
  layout(geometry: Geometry, retrieval: Partial<Retrieval>, capacityPages: number): NativeLayout;
  /** Writes a fresh manifest into a segment's buffer: zeroes it, then the header for `layers`. */
  initManifest(buffer: ArrayBuffer, layers: number): void;
  readManifest(buffer: ArrayBuffer, layers: number): ManifestState;
  /** Writes the corrupt marker over the manifest's magic (engine/Manifest.h kManifestCorruptMagic). */
  markManifestCorrupt(buffer: ArrayBuffer): void;
  /** Whether the manifest carries the corrupt marker. */
  manifestCorrupt(buffer: ArrayBuffer): boolean;
  /** The defaults of every retrieval field (DESIGN.md section 2). */
  retrievalDefaults(): Retrieval;
  /** null when valid; fields left out take the defaults. */
  validateRetrieval(retrieval: Partial<Retrieval>, layers: number): RetrievalError | null;
  enums(): EnumNames;
  /**
   * Upper edges of the adjacent-query cosine histogram's buckets but the last (float32 values;
   * native/src/engine/RetrievalStats.h): bucket i holds [edges[i-1], edges[i]).
   */
  cosineBucketEdges(): number[];
}

export interface ShmAddon extends Contract {
  ShmSegment: ShmSegmentStatic;
  /** CRC32C of the bytes (native/src/shm/Crc32c.h), continuing from `seed` (0: a fresh checksum). */
  crc32c(bytes: ArrayBuffer | ArrayBufferView, seed?: number): number;
  /** CRC32C of each of `count` consecutive pages of `pageBytes` from `byteOffset`; RangeError past the end. */
  crc32cPages(bytes: ArrayBuffer | ArrayBufferView, byteOffset: number, pageBytes: number, count: number): Uint32Array;
  /** Whether the checksums run on the CPU's crc32 instruction. */
  readonly crc32cHardware: boolean;
  /**
   * Since the process started: how long closed sessions' unmaps and store unregistrations waited
   * for this process's session openings and store registrations (FREEKV_TEARDOWN_YIELD_MS), the
   * pieces that waited, and the foreground work in progress now.
   */
  teardownStats(): TeardownStats;
}

/** What closed sessions' teardowns waited for this process's foreground work (native/src/shm/TeardownGate.h). */
export interface TeardownStats {
  waitedMs: number;
  piecesWaited: number;
  foreground: number;
}

let cached: ShmAddon | undefined;

/** Loads an addon file of native/build/Release by name (`env` overrides the path). */
export function loadNative<T>(file: string, env: string | undefined): T {
  const require = createRequire(import.meta.url);
  const here = dirname(fileURLToPath(import.meta.url));
  const candidates = [
    env,
    // beside a relocated full addon (FREEKV_ADDON): the two are built and shipped together
    process.env.FREEKV_ADDON ? join(dirname(process.env.FREEKV_ADDON), file) : undefined,
    // from native/ (tsx, vitest) and from dist/native/ (compiled)
    join(here, "build", "Release", file),
    join(here, "..", "..", "native", "build", "Release", file),
  ].filter((p): p is string => !!p);
  for (const p of candidates) if (existsSync(p)) return require(p) as T;
  throw new Error(`native addon ${file} not found (tried ${candidates.join(", ")}); run \`npm run build:native\``);
}

/** Loads freekv_shm.node once. */
export function loadShm(): ShmAddon {
  cached ??= loadNative<ShmAddon>("freekv_shm.node", process.env.FREEKV_SHM_ADDON);
  return cached;
}
