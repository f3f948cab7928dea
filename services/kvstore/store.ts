/**
 * The kvstore's state: live sessions (their mapped segments and directory record), attach with
 * re-attach, two-phase page commit, release, capacity accounting, shutdown with or without
 * persistence. Transport-free; service.ts maps it to gRPC.
 *
 * Capacity counts committed memory, not apparent sizes: a session's store segment has its full
 * size (max_context_tokens) but memory only for its reservation (layout.ts: reserved pages per
 * layer, in extents), allocated with fallocate when the reservation is made (on a worker thread,
 * counted against the capacity before it starts, so other calls are answered meanwhile and
 * concurrent reservations never overcommit), so a full /dev/shm is
 * a RESOURCE_EXHAUSTED answer here and never a SIGBUS at a later write. The other three segments
 * are small and committed whole. Commits of pages past the reservation are refused.
 */
import { status } from "@grpc/grpc-js";
import type { ModelGeometry, RetrievalConfig } from "../../proto/gen/freekv/v1/common.js";
import type { AttachSessionRequest, AttachSessionResponse, CommitPagesRequest, GetStatsResponse } from "../../proto/gen/freekv/v1/kvstore.js";
import { resolveGeometry } from "../common/geometry.js";
import { resolveRetrieval, toNativeRetrieval, validateRetrieval } from "../common/retrieval.js";
import { ServiceError, alreadyExists, failedPrecondition, invalidArgument, notFound, quoteId, resourceExhausted } from "../common/errors.js";
import type { Logger } from "../common/log.js";
import { loadShm } from "../../native/shm.js";
import type { ScrubHost, ScrubSession, Scrubber } from "./scrubber.js";
import { UnreadableRecordError, type SessionDirectory, type SessionRecord } from "./directory.js";
import { computeLayout, requestLayout, extentTokens, offsetLengths, rangeBytes, rangesAdded, reservedBytes, reservedPagesOf, storeRanges, toSegmentLayout, totalBytes, type ByteRange, type Layout } from "./layout.js";
import type { KvStoreMetrics } from "./metrics.js";
import { SEGMENT_KINDS, closeSegments, closeSegmentsAsync, createSegments, openSegments, refsOf, unlinkNames, type SessionSegments } from "./segments.js";
import type { ShmSegment } from "../../native/shm.js";
import { checkSessionId } from "../common/session-id.js";

interface Live {
  record: SessionRecord;
  segments: SessionSegments;
  layout: Layout;
  /** Store pages per layer with memory (from record.reservedTokens). */
  reservedPages: number;
  /** Bytes counted against the capacity: the three small segments and the store's reserved ranges. */
  bytes: number;
  /** The store's memory still being committed in the background (caller_commits); settles, never rejects. */
  background?: Promise<void>;
  /** Set when a committed page changed after its commit: every call on the session gets it (DATA_LOSS). */
  corrupt?: ServiceError;
  /** AttachSessionRequest.creation_token of the call that created it (in memory only: none after a restart). */
  creationToken?: string;
  /** An AttachSession other than a create_only one was answered with it since its creation. */
  openedAgain?: boolean;
  /** Its segments were removed by a shutdown while it was being created or imported (see shutdown): never made live. */
  abandoned?: boolean;
}

/** Longest AttachSessionRequest / ReleaseSessionRequest creation_token, in UTF-8 bytes. */
export const MAX_CREATION_TOKEN_BYTES = 128;

/** A session being imported (transfer.ts): its segments, record and bytes. */
export type ImportReservation = Live;

/** The reservation a record holds; records written before reservations existed reserved everything. */
const recordReservedTokens = (r: SessionRecord) => r.reservedTokens ?? r.maxContextTokens;

/**
 * How long a shutdown waits for the sessions still being created or imported (their memory being
 * committed, their record being written) before it removes their segments, and then for the
 * directory's writes (a non-persistent shutdown's deletes, and its close): a directory that does
 * not answer must not keep the process from exiting.
 */
export const SHUTDOWN_WAIT_MS = 5_000;

/** Default extent of a reservation, in tokens (FREEKV_KVSTORE_EXTENT_TOKENS). */
export const DEFAULT_EXTENT_TOKENS = 2048;
/** Largest session metadata, at attach, commit and import (compute's generation state: the token history of a long session is a few MB of JSON). */
export const MAX_METADATA_BYTES = 32 << 20;
function checkCreationToken(token: string | undefined): void {
  if (token && Buffer.byteLength(token) > MAX_CREATION_TOKEN_BYTES)
    throw invalidArgument("creation_token", `must be at most ${MAX_CREATION_TOKEN_BYTES} bytes, got ${Buffer.byteLength(token)}`);
}

const checkMetadata = (m: Uint8Array | undefined, field: string) => {
  if (m && m.length > MAX_METADATA_BYTES) throw invalidArgument(field, `must be at most ${MAX_METADATA_BYTES} bytes, got ${m.length}`);
};
/** Address space the live sessions' segments may map together: 2^45 bytes (32 TiB of the 128 TiB a process has). */
export const MAX_MAPPED_BYTES = 2 ** 45;

function sameGeometry(a: ModelGeometry, b: ModelGeometry) {
  return a.layers === b.layers && a.queryHeads === b.queryHeads && a.kvHeads === b.kvHeads && a.headDim === b.headDim && a.kvDtype === b.kvDtype;
}

/** What GetStats says this kvstore honours (GetStatsResponse.features in kvstore.proto). */
export const KVSTORE_FEATURES = ["creation_token"] as const;

export class KvStore implements ScrubHost {
  private readonly live = new Map<string, Live>();
  /** Checks committed pages (scrubber.ts); attached by the process (kvstore/main.ts). */
  scrubber: Scrubber | undefined;
  private readonly locks = new Map<string, Promise<unknown>>();
  /** Sessions being imported (transfer.ts): their segments exist and count, but they are not visible yet. */
  private readonly importing = new Map<string, Live>();
  /** Imports whose memory is being committed (reserveImport), before they join `importing`: counted by the limits too. */
  private readonly committingImports = new Set<Live>();
  private usedBytes = 0;
  /** Sessions being created (counted, not live yet). */
  private readonly creatingLive = new Set<Live>();
  /** Set when shutdown starts: new sessions are refused (UNAVAILABLE), so none is made that it would not see. */
  private shuttingDown = false;

  /** UNAVAILABLE once the kvstore is shutting down (a create or import then would outlive the shutdown's cleanup). */
  private checkOpen(sessionId: string): void {
    if (this.shuttingDown) throw new ServiceError(status.UNAVAILABLE, `session ${quoteId(sessionId)}: the kvstore is shutting down`);
  }

  /** Bytes all sessions may hold (see capacityBytes). */
  private capacity: number;

  constructor(
    private readonly directory: SessionDirectory,
    capacityBytes: number,
    private readonly log: Logger,
    private readonly metrics?: KvStoreMetrics,
    /** Segment names carry the session id (an in-process store, whose ids are its own). */
    private readonly tagSegments = false,
    /** Reservations grow in steps of this many tokens (FREEKV_KVSTORE_EXTENT_TOKENS). */
    readonly extentTokens = DEFAULT_EXTENT_TOKENS,
    /** 0: memory committed with fallocate; N: by write faults from N threads (FREEKV_KVSTORE_COMMIT_THREADS). */
    readonly commitThreads = 0,
  ) {
    if (!Number.isInteger(extentTokens) || extentTokens < 1) throw new RangeError(`extentTokens must be an integer >= 1, got ${extentTokens}`);
    this.capacity = capacityBytes;
  }

  /** Bytes of shared memory all sessions may hold together; fixed once adopt() has run. */
  get capacityBytes(): number {
    return this.capacity;
  }

  /** Sessions held at most, live, being created or imported (FREEKV_KVSTORE_MAX_SESSIONS); adopted ones are never refused. */
  maxSessions = 4096;

  /** RESOURCE_EXHAUSTED naming the limit when one more session would pass maxSessions. */
  private checkSessionCount(sessionId: string): void {
    const held = this.live.size + this.creatingLive.size + this.importing.size + this.committingImports.size;
    if (held < this.maxSessions) return;
    this.metrics?.rejected.inc({ reason: "sessions" });
    throw resourceExhausted(`session ${quoteId(sessionId)}: this kvstore holds ${held} sessions, its limit (FREEKV_KVSTORE_MAX_SESSIONS=${this.maxSessions})`);
  }

  /** Called when a directory operation fails (the process reports NOT_SERVING until the directory answers again). */
  onDirectoryFailure: ((err: Error) => void) | undefined;

  /** A directory operation; its failure is counted, reported and becomes UNAVAILABLE. */
  private async dir<T>(op: string, session: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      const err = e as Error;
      this.metrics?.directoryFailures.inc({ op });
      this.log.error({ session, op, err: err.message }, "session directory operation failed");
      this.onDirectoryFailure?.(err);
      throw new ServiceError(status.UNAVAILABLE, `session directory: ${op} failed: ${err.message}`);
    }
  }

  /** Serialises the calls on one session id. */
  private withLock<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(id) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const tail = next.catch(() => undefined);
    this.locks.set(id, tail);
    void tail.then(() => {
      if (this.locks.get(id) === tail) this.locks.delete(id);
    });
    return next;
  }

  private updateGauges() {
    if (!this.metrics) return;
    this.metrics.sessions.set(this.live.size);
    this.metrics.segmentBytes.set(this.usedBytes);
    this.metrics.reservedBytes.set(this.usedBytes);
    this.metrics.pages.set({ tier: "host" }, this.committedPages());
  }

  private committedPages(): number {
    let n = 0;
    for (const l of this.live.values()) for (const c of l.record.committedPages) n += c;
    return n;
  }

  /**
   * Maps the segments of sessions a previous kvstore process kept (persistent directory only) and
   * counts their reservations as used. `capacityFor` (a capacity that follows the free space of
   * /dev/shm measured before this call: config.ts defaultCapacity) then sets the capacity from the
   * adopted bytes that free space already left out: per session the bytes counted for it, or the
   * bytes its segments held when opened if fewer (a background commit the previous process did not
   * finish; the rest is allocated here, out of the space measured free). So those bytes count once,
   * as used, and not a second time as missing from the free space.
   */
  async adopt(capacityFor?: (adoptedBytes: number) => number): Promise<number> {
    let adopted = 0;
    let adoptedBytes = 0;
    for (const id of await this.directory.list()) {
      let rec: SessionRecord | undefined;
      try {
        rec = await this.directory.get(id);
      } catch (e) {
        if (!(e instanceof UnreadableRecordError)) throw e;
        // One bad record must not keep the kvstore from starting with the others: it is set aside
        // (RedisDirectory.setAside: kept for inspection under a quarantine key, never listed
        // again), logged and counted; the sessions of the other records are adopted.
        this.metrics?.directoryFailures.inc({ op: "decode" });
        this.log.error({ session: id, err: e.message }, "a session directory record cannot be read: it is set aside and the session is not adopted");
        await this.directory.setAside(id).catch((err: Error) => this.log.error({ session: id, err: err.message }, "could not set an unreadable directory record aside; it is skipped again at the next start"));
        continue;
      }
      if (!rec) continue;
      let segments: SessionSegments | undefined;
      try {
        segments = openSegments(rec.segments);
        // The reservation's memory stayed allocated in the segments; it is counted again.
        const layout = computeLayout(rec.geometry, rec.retrieval, rec.capacityPages);
        const reservedPages = reservedPagesOf(recordReservedTokens(rec), rec.retrieval.pageSize, rec.capacityPages);
        const bytes = reservedBytes(layout, rec.geometry.layers, reservedPages);
        const l: Live = { record: rec, segments, layout, reservedPages, bytes };
        if (loadShm().manifestCorrupt(segments.manifest.buffer())) l.corrupt = this.corruptError(id, "marked corrupt by the kvstore before this one");
        // What the segments hold now, before the commit below allocates what is missing.
        const held = heldBytes(segments);
        this.live.set(id, l);
        this.usedBytes += bytes;
        adopted++;
        adoptedBytes += Math.min(bytes, held);
        // A background commit (caller_commits) the previous process did not finish: what it left
        // is committed now (pages already there are kept as they are).
        // Never rolled back: the ranges already there hold committed pages.
        await segments.store.allocateAsync(offsetLengths(storeRanges(layout, rec.geometry.layers, reservedPages)), this.commitThreads, false).catch((e: Error) => {
          this.metrics?.backgroundCommitFailures.inc();
          this.log.error({ session: id, err: e.message }, "committing an adopted session's reservation failed; its compute tier meets the shortage when it writes");
        });
      } catch (e) {
        // A session that cannot be adopted whole is dropped whole: the segments that survive are
        // unmapped and unlinked too (their names are not the cleanup sweep's), not left in /dev/shm.
        // A failure of this cleanup is logged and counted; it must not stop the start (the next
        // start's sweep and this loop meet what it left).
        try {
          if (segments && !this.live.has(id)) closeSegments(segments, false);
          if (!this.live.has(id)) unlinkNames(rec.segments);
        } catch (err) {
          this.log.error({ session: id, err: (err as Error).message }, "could not remove the segments of a session that is not adopted");
        }
        this.log.warn({ session: id, err: (e as Error).message }, "dropping a directory entry whose segments are gone or unreadable");
        await this.directory.delete(id).catch((err: Error) => {
          this.metrics?.directoryFailures.inc({ op: "delete" });
          this.log.error({ session: id, err: err.message }, "could not delete the directory entry of a session that is not adopted; it is met again at the next start");
        });
      }
    }
    if (capacityFor) {
      const c = capacityFor(adoptedBytes);
      if (!Number.isSafeInteger(c) || c < 0) throw new RangeError(`the capacity must be an integer >= 0, got ${c}`);
      this.capacity = c;
      this.log.info({ adopted, adoptedBytes, capacityBytes: c }, "capacity set from the free shared memory at start and the adopted sessions' bytes");
    }
    this.updateGauges();
    return adopted;
  }

  private response(l: Live, created: boolean): AttachSessionResponse {
    const r = l.record;
    const layout = computeLayout(r.geometry, r.retrieval, r.capacityPages);
    return {
      sessionId: r.sessionId,
      created,
      ...r.segments,
      layout: toSegmentLayout(layout, r.retrieval.pageSize, r.capacityPages),
      geometry: r.geometry,
      retrieval: r.retrieval,
      maxContextTokens: r.maxContextTokens,
      metadata: r.metadata,
      committedPages: [...r.committedPages],
      reservedTokens: recordReservedTokens(r),
    };
  }

  /**
   * AttachSession. With `signal`: a session this call created is released, under the same lock,
   * when the caller gave up (cancelled, or its deadline passed) before it was answered; a later
   * attach of the same id (a retry) then finds no session and makes its own, instead of being
   * answered with a session the first call's clean-up removes after it.
   */
  attach(
    req: Omit<AttachSessionRequest, "callerCommits" | "creationToken" | "createOnly"> & { callerCommits?: boolean; creationToken?: string; createOnly?: boolean },
    signal?: AbortSignal,
  ): Promise<AttachSessionResponse> {
    checkSessionId(req.sessionId);
    // A session's metadata must fit an import too (a session that attaches but can never move).
    checkMetadata(req.metadata, "metadata");
    checkCreationToken(req.creationToken);
    return this.withLock(req.sessionId, async () => {
      // A caller that gave up while this call waited for the id's lock: nothing is made for it.
      if (signal?.aborted) throw signal.reason;
      if (this.importing.has(req.sessionId)) throw failedPrecondition(`session ${req.sessionId} is being imported; attach it once the import ended`);
      const existing = this.live.get(req.sessionId);
      if (existing?.corrupt) throw existing.corrupt;
      if (existing) {
        if (req.geometry && req.geometry.layers !== 0 && !sameGeometry(resolveGeometry(req.geometry), existing.record.geometry)) {
          throw failedPrecondition(`session ${req.sessionId} exists with a different geometry`);
        }
        // A create_only call is answered ALREADY_EXISTS by its caller: it neither opens the session
        // nor grows its reservation.
        if (req.createOnly) return this.response(existing, false);
        if (req.reserveTokens !== undefined) await this.grow(existing, req.reserveTokens, "reserve_tokens", req.callerCommits);
        existing.openedAgain = true;
        return this.response(existing, false);
      }
      const geometry = resolveGeometry(req.geometry);
      const retrieval: RetrievalConfig = resolveRetrieval(req.retrieval, geometry.layers, "retrieval", req.maxContextTokens);
      const r = await this.create(req.sessionId, geometry, retrieval, req.maxContextTokens, req.metadata, req.reserveTokens, req.callerCommits);
      const made = this.live.get(req.sessionId);
      if (made && req.creationToken) made.creationToken = req.creationToken;
      if (signal?.aborted) {
        await this.releaseLocked(req.sessionId).catch((e: Error) => this.log.error({ session: req.sessionId, err: e.message }, "cannot release the session of a cancelled AttachSession"));
        this.log.warn({ session: req.sessionId }, "AttachSession cancelled by its caller: the session it created is released");
        throw signal.reason;
      }
      return r;
    });
  }

  /**
   * Attaches a session in this process, synchronously (the command line, the fidelity harness,
   * benchmarks and tests run the kvstore in-process over the in-memory directory): like
   * AttachSession, with a complete retrieval config (no "0 = default" fields) checked by the native
   * validator. The caller maps the segments by name.
   */
  attachLocal(sessionId: string, geometry: ModelGeometry, retrieval: RetrievalConfig, maxContextTokens: number): AttachSessionResponse {
    if (this.directory.kind !== "memory") throw new Error("attachLocal needs the in-memory directory");
    checkSessionId(sessionId);
    if (this.live.has(sessionId) || this.locks.has(sessionId)) throw failedPrecondition(`session ${sessionId} is already attached`);
    const g = resolveGeometry(geometry);
    const e = validateRetrieval(toNativeRetrieval(retrieval), g.layers);
    if (e) throw invalidArgument(`retrieval.${e.field}`, e.message);
    // The whole store is counted, but backed as it is touched (as before reservations): an
    // in-process run (fidelity traces, benchmarks) sizes its sessions generously and fills them.
    const l = this.createLive(sessionId, g, { ...retrieval, tauSet: true }, maxContextTokens, undefined, undefined);
    this.usedBytes += l.bytes;
    void this.directory.put(l.record);
    return this.admit(l);
  }

  /** Unmaps and removes every session's segments now (an in-process kvstore at process exit). */
  removeAllNow(): void {
    for (const l of this.live.values()) closeSegments(l.segments, true);
    this.live.clear();
    this.usedBytes = 0;
  }

  /**
   * A new session's segments and record (not yet live, not counted, no memory committed yet: see
   * commitLive), sized for `reserveTokens` (rounded up to an extent; undefined:
   * max_context_tokens, the whole store); RESOURCE_EXHAUSTED when its bytes do not fit now.
   */
  private createLive(
    sessionId: string,
    geometry: ModelGeometry,
    retrieval: RetrievalConfig,
    maxContextTokens: number,
    metadata: Uint8Array | undefined,
    reserveTokens: number | undefined,
  ): Live {
    if (!Number.isInteger(maxContextTokens) || maxContextTokens < 1) {
      throw invalidArgument("max_context_tokens", `must be >= 1, got ${maxContextTokens}`);
    }
    if (reserveTokens !== undefined && (!Number.isInteger(reserveTokens) || reserveTokens < 0 || reserveTokens > maxContextTokens)) {
      throw invalidArgument("reserve_tokens", `must be in [0, max_context_tokens ${maxContextTokens}], got ${reserveTokens}`);
    }
    this.checkSessionCount(sessionId);
    const { capacity, layout } = requestLayout(geometry, retrieval, maxContextTokens, "max_context_tokens");
    let reserved = reserveTokens === undefined ? maxContextTokens : extentTokens(reserveTokens, this.extentTokens, maxContextTokens);
    let reservedPages = reservedPagesOf(reserved, retrieval.pageSize, capacity);
    let bytes = reservedBytes(layout, geometry.layers, reservedPages);
    if (reserveTokens !== undefined && this.usedBytes + bytes > this.capacityBytes) {
      // A whole extent does not fit: what was asked for may (see grow).
      reserved = reserveTokens;
      reservedPages = reservedPagesOf(reserved, retrieval.pageSize, capacity);
      bytes = reservedBytes(layout, geometry.layers, reservedPages);
    }
    if (this.usedBytes + bytes > this.capacityBytes) {
      this.metrics?.rejected.inc({ reason: "capacity" });
      throw resourceExhausted(`session ${sessionId} needs ${bytes} bytes of shared memory for ${reserved} tokens; ${this.capacityBytes - this.usedBytes} of ${this.capacityBytes} are free`);
    }
    // Address space: a session maps its whole store (max_context_tokens), whatever is reserved, so
    // sessions of huge contexts and no reservation could map the process's whole address space
    // (47 bits) and fail its other allocations. The sessions together map at most MAX_MAPPED_BYTES.
    const mapping = totalBytes(layout);
    // Alone past the limit: no release will ever make room (not a RESOURCE_EXHAUSTED to retry).
    if (mapping > MAX_MAPPED_BYTES)
      throw invalidArgument("max_context_tokens", `${maxContextTokens} tokens map ${mapping} bytes, more than the ${MAX_MAPPED_BYTES} bytes (2^45) the sessions here may map together: it can never fit`);
    const mapped = this.mappedBytes();
    if (mapped + mapping > MAX_MAPPED_BYTES) {
      this.metrics?.rejected.inc({ reason: "capacity" });
      throw resourceExhausted(
        `session ${sessionId} maps ${mapping} bytes for max_context_tokens ${maxContextTokens}; the sessions here map ${mapped}, at most ${MAX_MAPPED_BYTES} together (2^45 bytes of address space)`,
      );
    }
    let segments: SessionSegments;
    try {
      segments = createSegments(layout, geometry.layers, this.tagSegments ? sessionId : undefined);
    } catch (e) {
      this.metrics?.rejected.inc({ reason: "shm" });
      throw new ServiceError(status.RESOURCE_EXHAUSTED, `cannot create shared memory for ${sessionId}: ${(e as Error).message}`);
    }
    const record: SessionRecord = {
      sessionId,
      geometry,
      retrieval,
      maxContextTokens,
      capacityPages: capacity,
      metadata: Buffer.from(metadata ?? Buffer.alloc(0)),
      segments: refsOf(segments),
      committedPages: new Array<number>(geometry.layers).fill(0),
      contextTokens: 0,
      createdAt: new Date().toISOString(),
      reservedTokens: reserved,
    };
    return { record, segments, layout, reservedPages, bytes };
  }

  /**
   * Counts a new session's bytes against the capacity, then commits its memory (fallocate) off the
   * event loop: at 128K tokens of an 8B model that is ~17 GB and over a second, during which the
   * kvstore keeps answering other calls. Counted before the wait, so concurrent reservations can
   * never overcommit; on failure the bytes are given back and the segments removed.
   */
  private async commitLive(l: Live, callerCommits = false): Promise<void> {
    const { segments, layout, record } = l;
    this.usedBytes += l.bytes;
    this.updateGauges();
    try {
      // Off the event loop too: their sizes follow the client's geometry (the tail is a page a
      // layer, gigabytes for large but valid shapes), and fallocate on tmpfs takes that long.
      for (const k of ["staging", "tail", "manifest"] as const) await segments[k].allocateAsync([[0, segments[k].size]], 0);
      const ranges = storeRanges(layout, record.geometry.layers, l.reservedPages);
      if (callerCommits) this.commitInBackground(l, ranges);
      else await segments.store.allocateAsync(offsetLengths(ranges), this.commitThreads);
    } catch (e) {
      // A shutdown that removed the segments meanwhile made the allocation fail: already closed.
      if (l.abandoned) throw new ServiceError(status.UNAVAILABLE, `session ${quoteId(record.sessionId)}: the kvstore shut down while its memory was committed`);
      this.usedBytes -= l.bytes;
      closeSegments(segments, true);
      this.updateGauges();
      throw this.allocationFailed(record.sessionId, l.bytes, e);
    }
  }

  /**
   * caller_commits: the store's memory for `ranges` is committed after the answer. The caller
   * (the CUDA engine) commits each range itself before it writes it, where a shortage is an error
   * it reports, never a SIGBUS; this commit keeps what the kvstore holds equal to what it counts
   * (freekv_kvstore_allocated_bytes catches up). A failure is logged and counted; a session
   * released meanwhile stops it quietly.
   */
  private commitInBackground(l: Live, ranges: readonly ByteRange[]): void {
    const id = l.record.sessionId;
    const run = async () => {
      try {
        // Throws at once when the segment was closed meanwhile (the session released, or the
        // kvstore shut down with FREEKV_KVSTORE_PERSIST). Never rolled back: the caller may have
        // written and committed pages in the ranges done (a persisted session keeps them).
        await l.segments.store.allocateAsync(offsetLengths(ranges), this.commitThreads, false);
      } catch (e) {
        const err = e as Error;
        if (this.live.get(id) !== l && !this.creatingLive.has(l)) {
          this.log.debug({ session: id, err: err.message }, "background commit stopped: the session is gone");
          return;
        }
        this.metrics?.backgroundCommitFailures.inc();
        this.log.error({ session: id, bytes: rangeBytes(ranges), err: err.message }, "committing a reservation's memory in the background failed; the compute tier meets the shortage when it commits the pages it writes");
      }
    };
    l.background = (l.background ?? Promise.resolve()).then(run);
  }

  /** Resolves once every background commit started so far has ended (tests). */
  async backgroundCommits(): Promise<void> {
    await Promise.all([...this.live.values(), ...this.creatingLive].map((l) => l.background));
  }

  /** A failed fallocate: RESOURCE_EXHAUSTED when /dev/shm is full, INTERNAL otherwise; counted and logged. */
  private allocationFailed(sessionId: string, bytes: number, e: unknown): ServiceError {
    const err = e as Error & { code?: string };
    const full = err.code === "ENOSPC";
    this.metrics?.rejected.inc({ reason: "shm" });
    this.log.warn({ session: sessionId, bytes, err: err.message }, full ? "shared memory is full: a reservation was refused" : "committing shared memory failed");
    return new ServiceError(
      full ? status.RESOURCE_EXHAUSTED : status.INTERNAL,
      `cannot commit ${bytes} bytes of shared memory for session ${quoteId(sessionId)}: ${full ? "/dev/shm is full" : err.message}`,
    );
  }

  /**
   * ReserveContext: commits memory for `tokens` tokens of the session's context (rounded up to an
   * extent, capped at max_context_tokens); a smaller request leaves the reservation as it is.
   * Returns the reservation and the bytes the session holds.
   */
  reserve(sessionId: string, tokens: number, callerCommits = false): Promise<{ reservedTokens: number; reservedBytes: number }> {
    checkSessionId(sessionId);
    if (!Number.isInteger(tokens) || tokens < 0) throw invalidArgument("tokens", `must be an integer >= 0, got ${tokens}`);
    return this.withLock(sessionId, async () => {
      const l = this.live.get(sessionId);
      if (!l) throw notFound(`session ${quoteId(sessionId)} is not attached`);
      if (l.corrupt) throw l.corrupt;
      await this.grow(l, tokens, "tokens", callerCommits);
      return { reservedTokens: recordReservedTokens(l.record), reservedBytes: l.bytes };
    });
  }

  /**
   * Grows a live session's reservation (the caller holds its lock): the new ranges are allocated
   * first, then the directory takes the record; a failure of either gives the new memory back
   * and leaves the session as it was.
   */
  private async grow(l: Live, tokens: number, field: string, callerCommits = false): Promise<void> {
    const r = l.record;
    if (!Number.isInteger(tokens) || tokens < 0 || tokens > r.maxContextTokens) {
      throw invalidArgument(field, `must be in [0, max_context_tokens ${r.maxContextTokens}], got ${tokens}`);
    }
    const current = recordReservedTokens(r);
    if (tokens <= current) return;
    const held = storeRanges(l.layout, r.geometry.layers, l.reservedPages);
    const plan = (t: number) => {
      const pages = reservedPagesOf(t, r.retrieval.pageSize, r.capacityPages);
      const added = rangesAdded(held, storeRanges(l.layout, r.geometry.layers, pages));
      return { target: t, pages, added, more: rangeBytes(added) };
    };
    // A whole extent when it fits, else exactly what was asked for (near the capacity, rounding up
    // must not turn a request that fits into one that waits).
    let p = plan(extentTokens(tokens, this.extentTokens, r.maxContextTokens));
    if (this.usedBytes + p.more > this.capacityBytes) p = plan(tokens);
    const { target, pages, added, more } = p;
    if (this.usedBytes + more > this.capacityBytes) {
      this.metrics?.rejected.inc({ reason: "capacity" });
      throw resourceExhausted(
        `session ${quoteId(r.sessionId)} needs ${more} more bytes of shared memory to reserve ${target} tokens (it holds ${current}); ${this.capacityBytes - this.usedBytes} of ${this.capacityBytes} are free`,
      );
    }
    // Counted before the allocation runs off the event loop (see commitLive).
    this.usedBytes += more;
    if (!callerCommits) {
      try {
        await l.segments.store.allocateAsync(offsetLengths(added), this.commitThreads);
      } catch (e) {
        this.usedBytes -= more;
        throw this.allocationFailed(r.sessionId, more, e);
      }
    }
    const next: SessionRecord = { ...r, reservedTokens: target };
    try {
      await this.dir("put", r.sessionId, () => this.directory.put(next));
    } catch (e) {
      this.usedBytes -= more;
      punchRanges(l.segments.store, added, this.log);
      throw e;
    }
    if (callerCommits) this.commitInBackground(l, added);
    l.record = next;
    l.reservedPages = pages;
    l.bytes += more;
    this.metrics?.reservations.inc();
    this.updateGauges();
    this.log.debug({ session: r.sessionId, reservedTokens: target, bytes: l.bytes }, "session reservation grew");
  }

  /** Context tokens a session's store has memory for (its reservation); undefined when it is not attached. */
  reservedTokens(id: string): number | undefined {
    const l = this.live.get(id);
    return l && recordReservedTokens(l.record);
  }

  /** Makes a counted session live; `commitMs`: how long its memory took to commit (logged). */
  private admit(l: Live, commitMs?: number): AttachSessionResponse {
    this.live.set(l.record.sessionId, l);
    this.updateGauges();
    this.log.info({ session: l.record.sessionId, bytes: l.bytes, capacityPages: l.record.capacityPages, commitMs: commitMs === undefined ? undefined : Math.round(commitMs) }, "session attached");
    this.log.debug({ session: l.record.sessionId, segments: Object.values(l.record.segments).map((s) => s.name) }, "session segments");
    return this.response(l, true);
  }

  /** Creates a new session's segments and record; the caller holds the session's lock. */
  private async create(sessionId: string, geometry: ModelGeometry, retrieval: RetrievalConfig, maxContextTokens: number, metadata: Uint8Array | undefined, reserveTokens: number | undefined, callerCommits = false): Promise<AttachSessionResponse> {
    this.checkOpen(sessionId);
    const l = this.createLive(sessionId, geometry, retrieval, maxContextTokens, metadata, reserveTokens);
    const t0 = performance.now();
    let commitMs: number;
    // Known while it is made: a background commit that fails meanwhile is reported, not taken for
    // a release, and a shutdown waits for it (or removes its segments).
    this.creatingLive.add(l);
    try {
      await this.commitLive(l, callerCommits);
      commitMs = performance.now() - t0;
      try {
        await this.dir("put", sessionId, () => this.directory.put(l.record));
      } catch (e) {
        if (!l.abandoned) {
          this.usedBytes -= l.bytes;
          closeSegments(l.segments, true);
          this.updateGauges();
        }
        throw e;
      }
    } finally {
      this.creatingLive.delete(l);
    }
    // The shutdown removed its segments while its record was written: nothing to make live.
    if (l.abandoned) throw new ServiceError(status.UNAVAILABLE, `session ${quoteId(sessionId)}: the kvstore shut down while it was created`);
    return this.admit(l, commitMs);
  }

  /** Commits one layer's pages, or several layers' at once (see commitPages); the layer's committed pages (the fewest with `layers`). */
  async commit(req: CommitPagesRequest): Promise<number> {
    return (await this.commitPages(req)).committedPages;
  }

  /**
   * Two-phase commit of pages the compute tier wrote into the store: one layer's range
   * (req.layer, firstPage, count, checksums) or, with req.layers, several layers' ranges applied
   * together: every entry is checked (layer, no gap, capacity, context, checksums) before any is
   * recorded, and the directory is written once.
   */
  commitPages(req: CommitPagesRequest): Promise<{ committedPages: number; layerCommittedPages: number[] }> {
    checkMetadata(req.metadata, "metadata");
    return this.withLock(req.sessionId, async () => {
      const l = this.live.get(req.sessionId);
      if (!l) throw notFound(`session ${quoteId(req.sessionId)} is not attached`);
      if (l.corrupt) throw l.corrupt;
      const r = l.record;
      const multi = (req.layers ?? []).length > 0;
      if (multi && (req.layer !== 0 || req.firstPage !== 0 || req.count !== 0 || req.checksums.length !== 0)) {
        throw invalidArgument("layers", "with layers set, layer, first_page, count and checksums must be zero or empty");
      }
      const entries = multi ? req.layers : [{ layer: req.layer, firstPage: req.firstPage, count: req.count, checksums: req.checksums }];
      if (req.contextTokens > r.maxContextTokens) {
        throw invalidArgument("context_tokens", `${req.contextTokens} exceeds max_context_tokens ${r.maxContextTokens}`);
      }
      const seen = new Set<number>();
      for (const [i, e] of entries.entries()) {
        const at = multi ? `layers[${i}]: ` : "";
        if (!Number.isInteger(e.layer) || e.layer >= r.geometry.layers) {
          throw invalidArgument(multi ? `layers[${i}].layer` : "layer", `must be in [0, ${r.geometry.layers - 1}], got ${e.layer}`);
        }
        if (seen.has(e.layer)) throw invalidArgument(`layers[${i}].layer`, `layer ${e.layer} appears twice`);
        seen.add(e.layer);
        const committed = r.committedPages[e.layer];
        if (e.firstPage > committed) {
          throw failedPrecondition(`${at}layer ${e.layer}: first_page ${e.firstPage} leaves a gap after the ${committed} committed pages`);
        }
        const end = e.firstPage + e.count;
        if (end > r.capacityPages) throw invalidArgument(multi ? `layers[${i}].count` : "count", `pages [${e.firstPage}, ${end}) exceed capacity_pages ${r.capacityPages}`);
        if (end > l.reservedPages) {
          this.metrics?.rejected.inc({ reason: "reservation" });
          throw failedPrecondition(
            `${at}layer ${e.layer}: pages [${e.firstPage}, ${end}) reach past the session's reservation of ${l.reservedPages} pages (${recordReservedTokens(r)} tokens); reserve the context first (ReserveContext)`,
          );
        }
        if (end * r.retrieval.pageSize > req.contextTokens) {
          throw invalidArgument("context_tokens", `${at}${req.contextTokens} tokens cannot hold ${end} full pages of ${r.retrieval.pageSize}`);
        }
        if (e.checksums.length !== 0 && e.checksums.length !== e.count) {
          throw invalidArgument(multi ? `layers[${i}].checksums` : "checksums", `expected ${e.count} (one per page) or none, got ${e.checksums.length}`);
        }
      }
      // Every newly committed page is checksummed here (natively, off the main thread: the
      // session's lock keeps its other calls out meanwhile), checked against what compute sent
      // when it sent checksums, and kept for the scrubber.
      const layout = l.layout;
      const store = l.segments.store;
      let sums: Uint32Array[];
      try {
        sums = await Promise.all(entries.map((e) => store.crc32cPagesAsync(e.layer * layout.layerStride + e.firstPage * layout.pageBytes, layout.pageBytes, e.count)));
      } catch (e) {
        // The kvstore shut down (its segments were closed) while the checksums ran.
        if (this.live.get(req.sessionId) !== l) throw new ServiceError(status.UNAVAILABLE, `session ${quoteId(req.sessionId)}: the kvstore closed its segments during the commit`);
        throw e;
      }
      // Released or shut down meanwhile (its segments closed after the checksums ended)?
      if (this.live.get(req.sessionId) !== l) throw new ServiceError(status.UNAVAILABLE, `session ${quoteId(req.sessionId)}: the kvstore closed its segments during the commit`);
      // The scrubber may have found a committed page changed meanwhile.
      if (l.corrupt) throw l.corrupt;
      for (const [i, e] of entries.entries()) {
        const got = sums[i];
        for (let k = 0; k < e.checksums.length; k++) {
          if (got[k] !== e.checksums[k] >>> 0) {
            this.metrics?.checksumFailures.inc();
            const field = multi ? `layers[${i}].checksums` : "checksums";
            throw failedPrecondition(`${field}[${k}]: page ${e.firstPage + k} of layer ${e.layer} has CRC32C ${got[k].toString(16)}, expected ${(e.checksums[k] >>> 0).toString(16)}`);
          }
        }
      }
      // The directory takes the new record first; the live one changes only once it did, so a
      // failed write (UNAVAILABLE) leaves both as they were and the caller's retry repeats it.
      const next: SessionRecord = { ...r, committedPages: [...r.committedPages] };
      for (const e of entries) next.committedPages[e.layer] = Math.max(next.committedPages[e.layer], e.firstPage + e.count);
      next.contextTokens = Math.max(r.contextTokens, req.contextTokens);
      if (req.metadata.length > 0) next.metadata = Buffer.from(req.metadata);
      await this.dir("put", req.sessionId, () => this.directory.put(next));
      l.record = next;
      for (const [i, e] of entries.entries()) this.scrubber?.record(req.sessionId, r.geometry.layers, e.layer, e.firstPage, sums[i]);
      this.metrics?.commits.inc();
      this.updateGauges();
      const layerCommittedPages = entries.map((e) => next.committedPages[e.layer]);
      return { committedPages: Math.min(...layerCommittedPages), layerCommittedPages: multi ? layerCommittedPages : [] };
    });
  }

  /**
   * ReleaseSession. With `creationToken`: only a session that an AttachSession carrying that token
   * created, and that no AttachSession has opened since (create_only calls aside), is released;
   * another is FAILED_PRECONDITION and stays. An unknown id is false either way.
   */
  release(id: string, creationToken = ""): Promise<boolean> {
    checkSessionId(id);
    checkCreationToken(creationToken);
    return this.withLock(id, async () => {
      if (creationToken) {
        const l = this.live.get(id);
        if (!l) return false;
        if (l.creationToken !== creationToken)
          throw failedPrecondition(`session ${quoteId(id)} was not created with this creation_token; it stays`);
        if (l.openedAgain) throw failedPrecondition(`session ${quoteId(id)} was opened again since its creation; it stays`);
      }
      return this.releaseLocked(id);
    });
  }

  /** release's work, with the session's lock already held. */
  private async releaseLocked(id: string): Promise<boolean> {
    const l = this.live.get(id);
    if (!l) {
      // Known to the directory but not mapped here (segments lost): forget it.
      const rec = await this.dir("get", id, () => this.directory.get(id));
      if (!rec) return false;
      unlinkNames(rec.segments);
      await this.dir("delete", id, () => this.directory.delete(id));
      return true;
    }
    // Forgotten by the directory first: a failed delete keeps the session whole (and releasable again).
    await this.dir("delete", id, () => this.directory.delete(id));
    this.live.delete(id);
    this.scrubber?.forget(id);
    // Unmapped on a worker thread; its bytes count until then, so no reservation is made against
    // memory not yet free. Releasing 2 GiB of touched pages takes ~150 ms here; on the event loop
    // that stalled every other call as long, from a worker the largest stall measured 31-147 ms
    // (the unmap still contends with the main thread for the process's memory map).
    const t0 = performance.now();
    try {
      await closeSegmentsAsync(l.segments, true);
    } catch (e) {
      // The session is gone from the directory and the live map, so nothing could release it
      // again: its bytes stop counting, and what could not be unmapped or unlinked is said.
      this.log.error({ session: id, err: (e as Error).message }, "session released, but closing or unlinking its segments failed");
      throw e;
    } finally {
      this.usedBytes -= l.bytes;
      this.updateGauges();
    }
    this.log.info({ session: id, unmapMs: Math.round(performance.now() - t0) }, "session released");
    return true;
  }

  private corruptError(id: string, why: string): ServiceError {
    return new ServiceError(status.DATA_LOSS, `session ${quoteId(id)} is corrupt: ${why}; its context cannot be trusted. Release it and start a new session`);
  }

  /** Why the session is corrupt, if the kvstore found it so (the scrubber can mark it while a call holds its lock). */
  corruption(id: string): ServiceError | undefined {
    return this.live.get(id)?.corrupt;
  }

  /** The live sessions whose committed pages the scrubber checks (corrupt ones are left out). */
  scrubSessions(): ScrubSession[] {
    const out: ScrubSession[] = [];
    for (const [id, l] of this.live) {
      if (l.corrupt) continue;
      const r = l.record;
      out.push({ id, committed: r.committedPages, pageBytes: l.layout.pageBytes, layerStride: l.layout.layerStride, store: l.segments.store });
    }
    return out;
  }

  /**
   * A committed page of `id` no longer matches its checksum: the session answers DATA_LOSS from
   * now on, and its manifest carries the corrupt marker (compute checks it at every turn; a
   * re-attach refuses it). Its segments stay until it is released.
   */
  markCorrupt(id: string, layer: number, page: number, got: number, expected: number): void {
    const l = this.live.get(id);
    if (!l || l.corrupt) return;
    l.corrupt = this.corruptError(id, `page ${page} of layer ${layer} changed after it was committed (CRC32C ${got.toString(16)}, committed as ${expected.toString(16)})`);
    try {
      loadShm().markManifestCorrupt(l.segments.manifest.buffer());
    } catch (e) {
      this.log.error({ session: id, err: (e as Error).message }, "cannot mark the manifest corrupt");
    }
  }

  stats(): GetStatsResponse {
    return {
      sessions: this.live.size,
      segmentBytes: this.usedBytes,
      committedPages: this.committedPages(),
      capacityBytes: this.capacityBytes,
      reservedBytes: this.usedBytes,
      allocatedBytes: this.allocatedBytes(),
      apparentBytes: this.apparentBytes(),
      features: [...KVSTORE_FEATURES],
    };
  }

  /** Bytes the live sessions' segments really hold (st_blocks); a segment that cannot be read counts 0 and is logged. */
  allocatedBytes(): number {
    let n = 0;
    for (const [id, l] of this.live) {
      for (const k of SEGMENT_KINDS) {
        try {
          n += l.segments[k].allocatedBytes();
        } catch (e) {
          this.log.warn({ session: id, segment: k, err: (e as Error).message }, "cannot read a segment's allocation");
        }
      }
    }
    return n;
  }

  /** Apparent size of the live sessions' segments (each store at its full max context). */
  apparentBytes(): number {
    let n = 0;
    for (const l of this.live.values()) n += totalBytes(l.layout);
    return n;
  }

  list(): string[] {
    return [...this.live.keys()].sort();
  }

  record(id: string): SessionRecord | undefined {
    return this.live.get(id)?.record;
  }

  // Hooks of session transfer (transfer.ts): export under the session's lock, import into
  // segments that are made and counted first and become a visible session only at the end.

  /**
   * Bytes the sessions' segments map (their whole stores, reserved or not): live ones, and those
   * being created or imported (mapped already, while their memory is committed or their stream runs).
   */
  private mappedBytes(): number {
    let n = 0;
    for (const l of this.live.values()) n += totalBytes(l.layout);
    for (const l of this.creatingLive) n += totalBytes(l.layout);
    for (const l of this.importing.values()) n += totalBytes(l.layout);
    for (const l of this.committingImports) n += totalBytes(l.layout);
    return n;
  }

  /**
   * Runs `fn` on the live session under its lock (nothing commits to or releases it meanwhile);
   * NOT_FOUND when absent, DATA_LOSS when it is corrupt. `reservedPages`: the store pages per layer
   * that have memory (no page past them may be read: on tmpfs a read allocates it, uncounted).
   */
  exclusive<T>(id: string, fn: (record: SessionRecord, segments: SessionSegments, reservedPages: number) => Promise<T>): Promise<T> {
    return this.withLock(id, async () => {
      const l = this.live.get(id);
      if (!l) throw notFound(`session ${quoteId(id)} is not attached`);
      if (l.corrupt) throw l.corrupt;
      return fn(l.record, l.segments, l.reservedPages);
    });
  }

  /**
   * Segments for a session to import, with memory for `reserveTokens` context tokens (the
   * exported context; rounded up to an extent) committed and counted against the capacity now
   * (RESOURCE_EXHAUSTED otherwise); ALREADY_EXISTS when the id is live, being imported or in the
   * directory. Not visible until publishImport; dropImport removes them.
   */
  reserveImport(id: string, geometry: ModelGeometry, retrieval: RetrievalConfig, maxContextTokens: number, metadata: Uint8Array, reserveTokens: number): Promise<ImportReservation> {
    checkSessionId(id);
    return this.withLock(id, async () => {
      this.checkOpen(id);
      if (this.live.has(id) || this.importing.has(id)) throw alreadyExists(`session ${quoteId(id)} already exists at this kvstore`);
      if (await this.dir("get", id, () => this.directory.get(id))) throw alreadyExists(`session ${quoteId(id)} is in this kvstore's directory`);
      this.checkOpen(id);
      const l = this.createLive(id, geometry, retrieval, maxContextTokens, metadata, Math.min(maxContextTokens, Math.max(0, reserveTokens)));
      this.committingImports.add(l);
      try {
        await this.commitLive(l);
      } finally {
        this.committingImports.delete(l);
      }
      // The shutdown removed its segments while its memory was committed (or is under way: it
      // would not see an import that joins now).
      if (l.abandoned || this.shuttingDown) {
        if (!l.abandoned) {
          l.abandoned = true;
          closeSegments(l.segments, true);
        }
        throw new ServiceError(status.UNAVAILABLE, `session ${quoteId(id)}: the kvstore is shutting down`);
      }
      this.importing.set(id, l);
      return l;
    });
  }

  /** Makes an imported session visible (directory first; a failed write leaves it reserved, for dropImport). */
  publishImport(r: ImportReservation, committedPages: number[], contextTokens: number, sums: Uint32Array[] = []): Promise<void> {
    const id = r.record.sessionId;
    return this.withLock(id, async () => {
      const record: SessionRecord = { ...r.record, committedPages: [...committedPages], contextTokens, createdAt: new Date().toISOString() };
      await this.dir("put", id, () => this.directory.put(record));
      r.record = record;
      this.importing.delete(id);
      this.live.set(id, r);
      // The committed pages' checksums (taken right after the import verified them) for the scrubber.
      sums.forEach((c, layer) => {
        if (c.length > 0) this.scrubber?.record(id, committedPages.length, layer, 0, c);
      });
      this.updateGauges();
      this.log.info({ session: id, bytes: r.bytes, committedPages, contextTokens }, "session imported");
    });
  }

  /** Removes an import's segments and gives their bytes back (the import failed or was cancelled). */
  dropImport(r: ImportReservation): void {
    const id = r.record.sessionId;
    if (this.importing.get(id) !== r) return;
    this.importing.delete(id);
    this.usedBytes -= r.bytes;
    closeSegments(r.segments, true);
    this.updateGauges();
  }

  /**
   * At shutdown: keep (persist) or remove every session's segments, then close the directory. New
   * sessions are refused from the start (UNAVAILABLE). Sessions still being created or imported
   * get SHUTDOWN_WAIT_MS to finish (a create becomes live, and so persisted or removed below, or
   * fails and removes its own segments); what is left then was never answered nor visible: its
   * segments are removed, persisted or not, and the call fails. The directory's deletes (without
   * persistence, all at once) and then its close get SHUTDOWN_WAIT_MS each at most (each command
   * also fails after DIRECTORY_COMMAND_TIMEOUT_MS): a record left behind names segments that are
   * gone, and the next start drops it as stale.
   */
  async shutdown(persist: boolean): Promise<void> {
    this.shuttingDown = true;
    const until = Date.now() + SHUTDOWN_WAIT_MS;
    while ((this.creatingLive.size > 0 || this.committingImports.size > 0) && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    for (const l of [...this.creatingLive, ...this.committingImports]) {
      l.abandoned = true;
      closeSegments(l.segments, true);
      this.log.warn({ session: l.record.sessionId }, "a session still being created or imported at shutdown: its segments are removed");
    }
    this.creatingLive.clear();
    this.committingImports.clear();
    // Imports still under way were never visible: their segments go, persisted or not.
    for (const l of this.importing.values()) closeSegments(l.segments, true);
    this.importing.clear();
    const deletes: Promise<void>[] = [];
    for (const [id, l] of this.live) {
      closeSegments(l.segments, !persist);
      if (!persist)
        deletes.push(
          this.directory.delete(id).catch((e: Error) => {
            // Its record stays, naming segments that are gone: the next start finds it stale.
            this.metrics?.directoryFailures.inc({ op: "delete" });
            this.log.warn({ session: id, err: e.message }, "could not remove the session's directory record at shutdown");
          }),
        );
    }
    this.log.info({ sessions: this.live.size, persist }, persist ? "segments kept for re-attach" : "segments removed");
    this.live.clear();
    this.usedBytes = 0;
    const bounded = async (what: string, p: Promise<unknown>) => {
      let timer: NodeJS.Timeout | undefined;
      const late = new Promise<boolean>((r) => (timer = setTimeout(r, SHUTDOWN_WAIT_MS, false)));
      const done = await Promise.race([p.then(() => true), late]);
      clearTimeout(timer);
      if (!done) this.log.warn({ waitedMs: SHUTDOWN_WAIT_MS }, `the session directory did not answer at shutdown: ${what} given up`);
    };
    await bounded("removing the records", Promise.all(deletes));
    await bounded("closing it", this.directory.close().catch((e: Error) => this.log.warn({ err: e.message }, "closing the session directory failed")));
  }
}

/** Bytes a session's segments hold (st_blocks); Infinity when one cannot be read (then its counted bytes are taken). */
function heldBytes(s: SessionSegments): number {
  let n = 0;
  try {
    for (const k of SEGMENT_KINDS) n += s[k].allocatedBytes();
  } catch {
    return Infinity;
  }
  return n;
}

/** Gives back ranges allocated for a reservation that did not happen. */
function punchRanges(store: ShmSegment, ranges: readonly ByteRange[], log: Logger): void {
  for (const [a, b] of ranges) {
    try {
      store.punch(a, b - a);
    } catch (e) {
      log.warn({ segment: store.name, err: (e as Error).message }, "giving back shared memory failed; it is freed when the session is released");
    }
  }
}
