/**
 * SessionManager: creates a session (validates it, attaches its segments at the kvstore, maps
 * them here, creates the engine session over them), finds it, closes it (engine first, then
 * ReleaseSession so the kvstore removes the segments), commits filled pages to the kvstore, and
 * at start re-attaches every session the kvstore still holds (a compute restart loses nothing).
 * Memory follows the context: a model session's store has memory at the kvstore only for its
 * reservation, which grows before each turn to what the turn can reach (reserve); an attention
 * session (whose appends come from outside, token by token) reserves its whole context at creation.
 * A session the kvstore lost frees its engine session and mappings at once (markLost). A session a
 * failed decode left diverged (diverged.ts) has its mark saved with its metadata (saveDataLoss),
 * and a re-attach marks it again from there.
 * Bounds: at most FREEKV_MAX_SESSIONS_PER_TENANT open sessions per tenant, created here or
 * arrived by a move (a drain's hand-off aside: move.ts), and sessions idle longer than
 * FREEKV_SESSION_IDLE_TIMEOUT_S are closed.
 */
import { randomUUID } from "node:crypto";
import { totalmem } from "node:os";
import { loadAddon, type Engine, type HostSegments, type ShmSegment } from "../../../native/binding.js";
import { DType, type ModelGeometry, type RetrievalConfig, type RetrievalStats } from "../../../proto/gen/freekv/v1/common.js";
import { SessionKind, type CreateSessionRequest, type Session } from "../../../proto/gen/freekv/v1/compute.js";
import type { AttachSessionResponse, CommitPagesRequest, LayerPages } from "../../../proto/gen/freekv/v1/kvstore.js";
import { ServiceError, alreadyExists, failedPrecondition, invalidArgument, neverFits, notFound, quoteId, resourceExhausted } from "../../common/errors.js";
import { resolveGeometry, toNativeGeometry } from "../../common/geometry.js";
import type { Logger } from "../../common/log.js";
import { resolveRetrieval, toNativeRetrieval } from "../../common/retrieval.js";
import type { KvStoreClient } from "../kvstore-client.js";
import { reservedPagesOf } from "../../kvstore/layout.js";
import { ComputeSession, kindName, type SessionMetadata } from "./session.js";
import { checkDiverged, divergedError, MAX_DATA_LOSS_CHARS, restoreDiverged, savedDataLoss } from "./diverged.js";
import { retrievalStats } from "./stats.js";
import { heldElsewhere } from "./owners.js";
import { checkTenant } from "../auth.js";
import { status } from "@grpc/grpc-js";
import { checkSessionId } from "../../common/session-id.js";

export interface SessionManagerOptions {
  log: Logger;
  kvstore: KvStoreClient;
  engine: Engine;
  defaultMaxContextTokens: number;
  maxContextLimit: number;
  commitChecksums: boolean;
  /** Geometry of the served model (model sessions take it); throws the status of a call when there is none yet. */
  modelGeometry?: () => ModelGeometry;
  backend: string;
  /** KV storage type of sessions that leave it unspecified (and of model sessions): the backend's. */
  defaultKvDtype: DType;
  onChange?: (sessions: number) => void;
  /** After the engine closed a session (its background work's failures are taken then). */
  onEngineClosed?: (s: ComputeSession) => void;
  /** A commit to the kvstore failed (freekv_compute_commit_failures_total). */
  onCommitFailure?: () => void;
  /** The kvstore no longer holds a session this process has open (freekv_compute_sessions_lost_total). */
  onLost?: () => void;
  /** Sessions one tenant may have open (FREEKV_MAX_SESSIONS_PER_TENANT; 0: no limit). */
  maxSessionsPerTenant?: number;
  /** A session no call used for this long is closed (FREEKV_SESSION_IDLE_TIMEOUT_S, in ms; 0: never). */
  idleTimeoutMs?: number;
  /** A session was closed for being idle (freekv_compute_sessions_expired_total, its owner record). */
  onExpired?: (id: string) => void;
  /** A release at the kvstore failed and is retried in the background (freekv_compute_release_failures_total). */
  onReleaseFailure?: () => void;
  /** How often failed releases are retried, in ms (default 2000). */
  releaseRetryMs?: number;
  /** The clock of idle expiry, in ms (tests replace it). */
  now?: () => number;
}

/**
 * Where a detach's time went (ms): the engine's close, then the segments' unmapping; of both, how
 * long the teardown waited for this process's session openings and store registrations
 * (FREEKV_TEARDOWN_YIELD_MS; where closes overlap, theirs is counted too).
 */
interface DetachTimes {
  engineCloseMs: number;
  unmapMs: number;
  teardownWaitMs?: number;
}

/** A commit the kvstore did not take (or that could not be prepared): the error a degraded session's calls get. */
export class CommitFailed extends ServiceError {}

export class SessionManager {
  /**
   * The CUDA engine commits each range of a session's store itself (MADV_POPULATE_WRITE, which
   * fails cleanly where /dev/shm is full) before it registers and writes it (CudaSession.cu), so
   * the kvstore need not commit a reservation before answering (caller_commits): at 32K tokens of
   * an 8B model that wait was 0.74 s of a 2.5 s time to first token. The CPU engine writes
   * through plain stores, so its reservations are committed first.
   */
  private get callerCommits(): boolean {
    return this.opts.backend === "cuda";
  }

  private readonly sessions = new Map<string, ComputeSession>();
  private cosineEdges: number[] | undefined;
  private readonly creating = new Set<string>();
  /** Sessions moved to another pod: id -> its compute address (bounded, see remember). */
  private readonly moved = new Map<string, string>();
  /** Sessions being created or received per tenant (counted by the quota until they are open). */
  private readonly creatingTenants = new Map<string, number>();
  /** Sessions being received from another pod: id -> the move's id (SessionTransferHeader.move_id). */
  private readonly arriving = new Map<string, string>();
  private expiryTimer: NodeJS.Timeout | undefined;
  /**
   * Sessions this process gave up that the kvstore may still hold: a release that failed (the
   * kvstore unreachable, the call timed out), or a fresh session whose AttachSession ended
   * without an answer. Their memory stays counted there until released, so each is released
   * again every releaseRetryMs until the kvstore answers (NOT_FOUND counts as done). The value:
   * how: "" is an unconditional release (it wins over the rest); a named session whose creation
   * went unanswered adds the creation token it was attached with (released only if that call made
   * it and nobody opened it since; FAILED_PRECONDITION drops that token, the session then being
   * someone's or another token's). Every token of several lost creations is tried.
   */
  private readonly pendingReleases = new Map<string, Set<string>>();
  private releaseTimer: NodeJS.Timeout | undefined;
  private readonly now: () => number;

  constructor(private readonly opts: SessionManagerOptions) {
    this.now = opts.now ?? (() => performance.now());
  }

  /**
   * Starts closing sessions idle for longer than idleTimeoutMs (checked every quarter of it, at
   * most every 30 s). Does nothing when the timeout is 0.
   */
  startExpiry(): void {
    const idle = this.opts.idleTimeoutMs ?? 0;
    if (idle <= 0 || this.expiryTimer) return;
    this.expiryTimer = setInterval(() => void this.expireIdle(), Math.max(50, Math.min(30_000, idle / 4)));
    this.expiryTimer.unref();
  }

  /**
   * Closes every session no call has used for longer than idleTimeoutMs (one in use, its lock
   * or its turn lock held, is not idle): engine session, mappings and the kvstore's segments. Logged and counted.
   * Returns the ids closed.
   */
  async expireIdle(): Promise<string[]> {
    const idle = this.opts.idleTimeoutMs ?? 0;
    if (idle <= 0) return [];
    const now = this.now();
    const closed: string[] = [];
    for (const s of [...this.sessions.values()]) {
      // A turn waiting for admission holds the session's turn lock, not yet its lock: not idle.
      if (s.closed || s.lock.busy || s.turnLock.busy || now - s.lastUsed <= idle) continue;
      const idleS = Math.round((now - s.lastUsed) / 1000);
      try {
        await this.close(s.id);
      } catch (e) {
        // Closed here but not yet released at the kvstore (retried in the background): expired all the same.
        if (this.sessions.has(s.id)) {
          this.opts.log.warn({ session: s.id, err: (e as Error).message }, "closing an idle session failed");
          continue;
        }
      }
      closed.push(s.id);
      this.opts.onExpired?.(s.id);
      this.opts.log.info({ session: s.id, idleSeconds: idleS, tenant: s.metadata.tenant || undefined }, "session expired: idle longer than FREEKV_SESSION_IDLE_TIMEOUT_S; its memory is released");
    }
    return closed;
  }

  /** Open sessions of `tenant` (those being created included). */
  tenantSessions(tenant: string): number {
    let n = this.creatingTenants.get(tenant) ?? 0;
    // A lost session holds nothing any more: it does not count against the quota.
    for (const s of this.sessions.values()) if ((s.metadata.tenant ?? "") === tenant && !s.lost) n++;
    return n;
  }

  get size(): number {
    return this.sessions.size;
  }

  list(): ComputeSession[] {
    return [...this.sessions.values()];
  }

  get engine(): Engine {
    return this.opts.engine;
  }

  get(id: string): ComputeSession {
    const s = this.sessions.get(id);
    if (!s) throw this.goneError(id);
    s.lastUsed = this.now();
    return s;
  }

  /** The session if it is open here, without counting it as used (idle expiry). */
  peek(id: string): ComputeSession | undefined {
    return this.sessions.get(id);
  }

  has(id: string): boolean {
    return this.sessions.has(id);
  }

  /**
   * What a new session of `req` would be (kind, geometry, context, retrieval), or the error its
   * creation would answer for the request alone (INVALID_ARGUMENT, FAILED_PRECONDITION): a
   * stateless Generate checks it before it queues, so bad input is refused at once rather than
   * at its deadline behind a busy server.
   */
  resolveNew(req: CreateSessionRequest): { kind: SessionKind; geometry: ModelGeometry; maxContextTokens: number; retrieval: RetrievalConfig } {
    const kind = req.kind === SessionKind.SESSION_KIND_UNSPECIFIED ? SessionKind.SESSION_KIND_MODEL : req.kind;
    if (kind !== SessionKind.SESSION_KIND_MODEL && kind !== SessionKind.SESSION_KIND_ATTENTION) throw invalidArgument("kind", `unknown session kind ${req.kind}`);
    let geometry: ModelGeometry;
    if (kind === SessionKind.SESSION_KIND_ATTENTION) {
      geometry = resolveGeometry(req.geometry, "geometry", this.opts.defaultKvDtype);
    } else {
      if (!this.opts.modelGeometry) throw failedPrecondition("no model is served; use kind SESSION_KIND_ATTENTION with a geometry for attention-only sessions");
      const g = this.opts.modelGeometry();
      // The KV cache of the served model is stored in the backend's type.
      geometry = resolveGeometry({ ...g, kvDtype: this.opts.defaultKvDtype }, "model");
    }
    const maxContextTokens = req.maxContextTokens || this.opts.defaultMaxContextTokens;
    if (maxContextTokens > this.opts.maxContextLimit) {
      throw invalidArgument("max_context_tokens", `must be <= ${this.opts.maxContextLimit}, got ${maxContextTokens}`);
    }
    const retrieval = resolveRetrieval(req.retrieval, geometry.layers, "retrieval", maxContextTokens);
    this.checkEngineMemory(geometry, retrieval);
    return { kind, geometry, maxContextTokens, retrieval };
  }

  /**
   * Creates a session. `tenant` (CreateSession's `x-freekv-tenant`) counts it against
   * FREEKV_MAX_SESSIONS_PER_TENANT; a stateless Generate's own session passes none (the request
   * queue bounds those). `reserveTokens`: context a model session gets memory for now (a stateless
   * Generate: prompt + max_tokens; CreateSession: none, its turns reserve); an attention session
   * always reserves its whole max context. `ephemeral`: the session of one request (a stateless
   * Generate), released rather than re-attached by a restarted compute (SessionMetadata.ephemeral).
   */
  async create(req: CreateSessionRequest, signal?: AbortSignal, tenant?: string, reserveTokens = 0, ephemeral = false): Promise<ComputeSession> {
    const id = req.sessionId || `s-${randomUUID()}`;
    checkSessionId(id);
    if (this.sessions.has(id) || this.creating.has(id)) throw alreadyExists(`session ${quoteId(id)} already exists`);
    // A session this pod moved away lives on at its target: a create of its name here would make a
    // second, empty session of that id (and take its owner record over), so it is redirected there.
    const movedTo = this.moved.get(id);
    if (movedTo) throw heldElsewhere(id, movedTo);
    const { kind, geometry, maxContextTokens, retrieval } = this.resolveNew(req);
    if (tenant !== undefined) this.checkQuota(tenant);
    this.creating.add(id);
    if (tenant !== undefined) this.countCreating(tenant, 1);
    try {
      const metadata: SessionMetadata = { kind: kindName(kind) };
      if (tenant) metadata.tenant = tenant;
      if (ephemeral) metadata.ephemeral = true;
      const reserve = kind === SessionKind.SESSION_KIND_ATTENTION ? undefined : Math.min(maxContextTokens, Math.max(0, reserveTokens));
      // A name the client chose may be its own session already: this call opens it only if it
      // creates it (create_only), and the token lets a lost creation be undone without touching
      // a session someone else has opened since.
      const creationToken = req.sessionId ? randomUUID() : "";
      const t0 = performance.now();
      let attach: AttachSessionResponse;
      try {
        attach = await this.opts.kvstore.attach(
          {
            sessionId: id,
            geometry,
            retrieval,
            maxContextTokens,
            metadata: Buffer.from(JSON.stringify(metadata)),
            reserveTokens: reserve,
            callerCommits: this.callerCommits,
            creationToken,
            createOnly: true,
          },
          signal,
        );
      } catch (e) {
        // No answer (cancelled, past its deadline, the kvstore unreachable): it may have created
        // the session. One with an id made here is nobody else's: released, now or later. A named
        // one is released only if this call made it and nobody opened it since (its token). (The
        // kvstore also drops what a cancelled AttachSession created, when it sees the cancel in
        // time; an answer lost after that is what this covers.)
        const code = (e as { code?: number }).code;
        const unanswered = code === status.CANCELLED || code === status.DEADLINE_EXCEEDED || code === status.UNAVAILABLE;
        if (unanswered) this.releaseLater(id, e as Error, creationToken);
        throw e;
      }
      if (!attach.created) throw alreadyExists(`session ${quoteId(id)} already exists at the kvstore`);
      const t1 = performance.now();
      try {
        const s = this.open(id, kind, attach, metadata, false);
        this.sessions.set(id, s);
        this.opts.onChange?.(this.sessions.size);
        s.unnamed = !req.sessionId;
        // kvstoreMs: the kvstore's reservation (its memory committed); openMs: mapping it and the engine session.
        const times = { kvstoreMs: Math.round(t1 - t0), openMs: Math.round(performance.now() - t1), reservedTokens: attach.reservedTokens };
        this.opts.log[s.unnamed ? "debug" : "info"]({ session: id, kind: metadata.kind, ...times }, "session created");
        this.opts.log.debug({ session: id, segments: segmentNames(attach) }, "session segments");
        return s;
      } catch (e) {
        await this.opts.kvstore.release(id).catch((err: Error) => this.releaseLater(id, err));
        throw e;
      }
    } finally {
      this.creating.delete(id);
      if (tenant !== undefined) this.countCreating(tenant, -1);
    }
  }

  /**
   * RESOURCE_EXHAUSTED when `tenant` already has FREEKV_MAX_SESSIONS_PER_TENANT sessions open or
   * being created or received here (a create's check, and an arriving move's: see reserveArrival).
   */
  private checkQuota(tenant: string): void {
    const quota = this.opts.maxSessionsPerTenant ?? 0;
    if (quota <= 0) return;
    const open = this.tenantSessions(tenant);
    if (open >= quota) {
      throw resourceExhausted(`tenant ${quoteId(tenant)} has ${open} open sessions, the most FREEKV_MAX_SESSIONS_PER_TENANT=${quota} allows; close one first`);
    }
  }

  private countCreating(tenant: string, delta: 1 | -1): void {
    const n = (this.creatingTenants.get(tenant) ?? 0) + delta;
    if (n > 0) this.creatingTenants.set(tenant, n);
    else this.creatingTenants.delete(tenant);
  }

  /** Maps the segments and creates the engine session (when the engine exists). */
  private open(id: string, kind: SessionKind, attach: AttachSessionResponse, metadata: SessionMetadata, reattach: boolean): ComputeSession {
    const geometry = attach.geometry!;
    const retrieval = attach.retrieval!;
    const { ShmSegment } = loadAddon();
    const opened: ShmSegment[] = [];
    let host: HostSegments;
    try {
      const open = (name: string | undefined) => {
        const s = ShmSegment.open(name ?? "");
        opened.push(s);
        return s;
      };
      host = {
        store: open(attach.store?.name),
        staging: open(attach.staging?.name),
        tail: open(attach.tail?.name),
        manifest: open(attach.manifest?.name),
        capacityPages: attach.layout!.capacityPages,
        reservedPages: reservedPagesOf(attach.reservedTokens, retrieval.pageSize, attach.layout!.capacityPages),
      };
    } catch (e) {
      for (const s of opened) s.close();
      throw new ServiceError(status.UNAVAILABLE, `cannot map the kvstore's segments of ${id}: ${(e as Error).message}`);
    }
    let engineSession: number;
    const engine = this.opts.engine;
    try {
      engineSession = engine.createSession(toNativeGeometry(geometry), toNativeRetrieval(retrieval), host, reattach);
    } catch (e) {
      for (const s of opened) s.close();
      // A geometry or retrieval config the engine cannot serve is the caller's; a shortage of
      // memory (device or host) may pass; anything else is the engine's fault (INTERNAL).
      const message = (e as Error).message;
      if (e instanceof RangeError || e instanceof TypeError) throw invalidArgument("session", `the engine refused it: ${message}`);
      if (/out of memory|\/dev\/shm is full|cudaErrorMemoryAllocation|bad_alloc/i.test(message)) throw resourceExhausted(`the engine cannot hold session ${id} now: ${message}`);
      throw e;
    }
    const s = new ComputeSession(id, kind, geometry, retrieval, attach.maxContextTokens, attach, host, engineSession, metadata);
    s.lastUsed = this.now();
    if (reattach) s.layerTokens.fill(engine.contextTokens(engineSession));
    return s;
  }

  /** Re-attaches every session the kvstore holds (after a compute restart). */
  async reattachAll(): Promise<number> {
    const { sessionIds } = await this.opts.kvstore.list();
    let n = 0;
    for (const id of sessionIds) {
      if (this.sessions.has(id)) continue;
      try {
        const s = await this.reattach(id, { releaseEphemeral: true });
        if (!s) continue;
        n++;
        this.opts.log.info({ session: id, contextTokens: s.contextTokens, committedPages: s.committedPages, diverged: divergedError(s) ? true : undefined }, "session re-attached");
      } catch (e) {
        this.opts.log.error({ session: id, err: (e as Error).message }, "cannot re-attach session");
      }
    }
    this.opts.onChange?.(this.sessions.size);
    return n;
  }

  /**
   * Opens a session the kvstore holds and this process does not (a restart's re-attach, or a
   * session just imported by a move): maps its segments, continues its engine session from them
   * and commits what the engine offloaded that the kvstore had not acknowledged. A session saved
   * diverged (SessionMetadata.dataLoss, see saveDataLoss) is marked diverged again before any
   * call can see it: its calls get that DATA_LOSS, as they did in the process that marked it.
   * (A move never carries the mark: handOver refuses a diverged session.)
   */
  async reattach(id: string, opts?: { arrivedBy: string }): Promise<ComputeSession>;
  async reattach(id: string, opts: { releaseEphemeral: true }): Promise<ComputeSession | undefined>;
  async reattach(id: string, opts?: { releaseEphemeral?: true; arrivedBy?: string }): Promise<ComputeSession | undefined> {
    const attach = await this.opts.kvstore.attach({ sessionId: id });
    let metadata: SessionMetadata = { kind: "attention" };
    try {
      const parsed: unknown = attach.metadata.length ? JSON.parse(attach.metadata.toString("utf8")) : undefined;
      // Anything but a JSON object is foreign metadata too.
      if (typeof parsed === "object" && parsed !== null && !Array.isArray(parsed)) metadata = parsed as SessionMetadata;
    } catch {
      /* foreign metadata: keep the default */
    }
    if (opts?.releaseEphemeral && metadata.ephemeral === true) {
      // One request's session, left by a compute that died during it: nobody can continue it.
      await this.opts.kvstore.release(id);
      this.opts.log.info({ session: id }, "released a stateless request's session left by the previous compute");
      return undefined;
    }
    const kind = metadata.kind === "model" ? SessionKind.SESSION_KIND_MODEL : SessionKind.SESSION_KIND_ATTENTION;
    const s = this.open(id, kind, attach, metadata, true);
    const saved = savedDataLoss(id, metadata);
    if (saved) {
      restoreDiverged(s, saved.message);
      if (saved.malformed !== undefined) {
        this.opts.log.error({ session: id, why: saved.malformed }, "the session's saved data-loss mark is malformed; it is marked diverged anyway and its calls get DATA_LOSS until it is closed");
      } else {
        this.opts.log.warn({ session: id, dataLoss: saved.message }, "session re-attached diverged: a decode failed in a previous compute after it may have appended the token; its calls get DATA_LOSS until it is closed");
      }
    }
    const held = s.contextTokens;
    if (metadata.contextTokens !== undefined && metadata.contextTokens !== held && metadata.generate !== undefined) {
      // The previous process was stopped in the middle of a turn: the pages and tail hold
      // tokens appended after the metadata was saved, so its per-turn state (the pending token
      // of the turn before) no longer follows the context. The next turn continues after the
      // tokens the session holds.
      this.opts.log.warn({ session: id, metadataContextTokens: metadata.contextTokens, contextTokens: held }, "the session's saved turn state is older than its context; it is dropped");
      delete metadata.generate;
    }
    s.metadataContextTokens = held;
    s.arrivedBy = opts?.arrivedBy;
    this.sessions.set(id, s);
    this.moved.delete(id);
    this.opts.onChange?.(this.sessions.size);
    // Pages the engine offloaded that the kvstore had not acknowledged yet.
    this.commitLayers(s, s.layerTokens.map((_, l) => l));
    // A malformed mark is replaced at the kvstore by the message the session is refused with now.
    if (saved?.malformed !== undefined) void this.saveDataLoss(s);
    return s;
  }

  /**
   * Saves the diverged mark of `s` (diverged.ts) with its metadata at the kvstore
   * (SessionMetadata.dataLoss, the DATA_LOSS message), so that a compute that re-attaches the
   * session after this process is gone refuses its calls the same way (reattach). It goes with a
   * commit queued now, on the session's commit chain like every metadata commit: a failed one
   * degrades the session, is logged and counted, and is retried with the metadata until the
   * kvstore takes it (commitFailed); shutdown tries once more and logs a mark it could not save.
   * The mark in this process's memory stays what the session's calls are refused by. Resolves
   * when the commit that carries the mark settled: true when the kvstore has it. Never throws nor
   * rejects (the batcher's observer calls it, and answers the failed call after it).
   */
  saveDataLoss(s: ComputeSession): Promise<boolean> {
    const e = divergedError(s);
    if (!e || s.closed || s.lost || s.detached) return Promise.resolve(false);
    const message = e.message.slice(0, MAX_DATA_LOSS_CHARS);
    const saved = () => s.metadata.dataLoss === message && !s.metadataDirty;
    if (saved()) return Promise.resolve(true);
    try {
      s.metadata.dataLoss = message;
      s.metadataDirty = true;
      this.queueCommit(s);
    } catch (err) {
      this.opts.log.error({ session: s.id, err: (err as Error).message }, "the session's data-loss mark could not be queued for the kvstore");
      return Promise.resolve(false);
    }
    // The commit chain never rejects: a failed commit is logged, counted and retried (commitFailed).
    return s.commitChain.then(saved, () => false);
  }

  // Moves between pods (move.ts): the source hands a session over under its lock and remembers
  // where it went; the receiving side reserves the id while the pages arrive.

  /**
   * A session re-attached at start that another live pod owns (SessionOwners.claimUnlessLive): this
   * copy is stale, so it is closed and released here (its calls are redirected to `owner`), never
   * served beside the other. Failures are logged (a release is retried in the background).
   */
  async dropStale(id: string, owner: string): Promise<void> {
    this.opts.log.warn({ session: id, owner }, "a re-attached session is owned by another live pod (it moved there, or its import here was never answered): this stale copy is released");
    try {
      await this.close(id);
    } catch (e) {
      this.opts.log.error({ session: id, err: (e as Error).message }, "closing a stale session copy failed");
    }
    this.remember(id, owner);
  }

  /** Where a session this process moved away went (the owner redirect without a session-owners directory). */
  movedTo(id: string): string | undefined {
    return this.moved.get(id);
  }

  /** The error for a session that is gone from here: FAILED_PRECONDITION naming its new pod when it moved, NOT_FOUND otherwise. */
  goneError(id: string): ServiceError {
    const to = this.moved.get(id);
    return to ? heldElsewhere(id, to) : notFound(`session ${quoteId(id)} not found`);
  }

  /**
   * Where the move `moveId` of `id` stands here, for a source that lost that move's answer
   * (move.ts): its stream still being received or its session being opened ("receiving"), the
   * session it brought open here ("held"), or neither ("absent"). The move is told by its id, not
   * the session's: another session of that id here (one created here, or brought by another move)
   * is "absent" for this move, so that its source keeps its own copy instead of closing it. With
   * `tenant` (tenant authentication on) a held session of another tenant is PERMISSION_DENIED.
   */
  arrivalState(id: string, moveId: string, tenant?: string): "held" | "receiving" | "absent" {
    if (this.arriving.get(id) === moveId) return "receiving";
    const s = this.sessions.get(id);
    if (s && s.arrivedBy === moveId) {
      checkTenant(s.metadata.tenant, tenant, id);
      return "held";
    }
    return "absent";
  }

  /**
   * Reserves `id` for a session arriving from another pod by the move `moveId` (its header's
   * move_id); ALREADY_EXISTS when it is open or being created here. With `tenant` (the arriving
   * session's), it counts against FREEKV_MAX_SESSIONS_PER_TENANT like a create (RESOURCE_EXHAUSTED
   * at the limit) until the returned function ends the reservation; without it (a drain's
   * hand-off, see SessionMover.receive) the quota is not checked.
   */
  reserveArrival(id: string, moveId: string, tenant?: string): () => void {
    if (this.sessions.has(id) || this.creating.has(id)) throw alreadyExists(`session ${quoteId(id)} already exists on this pod`);
    if (tenant !== undefined) this.checkQuota(tenant);
    this.creating.add(id);
    this.arriving.set(id, moveId);
    if (tenant !== undefined) this.countCreating(tenant, 1);
    return () => {
      this.creating.delete(id);
      this.arriving.delete(id);
      if (tenant !== undefined) this.countCreating(tenant, -1);
    };
  }

  /**
   * Hands the session over to another pod: waits for its turn in flight (its lock), refuses a
   * lost or diverged session (checkLost: DATA_LOSS, nothing saved or sent, the session stays
   * here), saves its metadata and pages at the kvstore and waits for the engine's background
   * recalls, then runs `transfer` still under the lock (no call can append meanwhile). When
   * `transfer` resolves, the session is closed here (engine, mappings), calls for it are
   * redirected to `target`, and the kvstore's copy is released; when it rejects, the session
   * stays open here, intact.
   */
  async handOver<T>(s: ComputeSession, target: string, transfer: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    // `signal` also ends the wait for the session's turn (a move's deadline, its caller gone).
    const release = await s.lock.acquire(signal);
    let result: T;
    try {
      if (s.closed) throw this.goneError(s.id);
      if (signal?.aborted) throw signal.reason;
      this.checkLost(s);
      await this.commitMetadata(s);
      await this.opts.engine.sync(s.engineSession);
      if (signal?.aborted) throw signal.reason;
      result = await transfer();
      s.closed = true;
      if (s.retryTimer) clearTimeout(s.retryTimer);
      this.sessions.delete(s.id);
      this.remember(s.id, target);
      this.opts.onChange?.(this.sessions.size);
      await s.commitChain;
      await this.detach(s);
    } finally {
      release();
    }
    try {
      await this.opts.kvstore.release(s.id);
    } catch (e) {
      // The target holds the session and this pod no longer serves it: the copy left in this
      // kvstore is released in the background (counted, retried until the kvstore answers, once
      // more at shutdown), so that a compute restarted over this kvstore does not re-attach it.
      this.opts.log.error({ session: s.id, target, err: (e as Error).message }, "the session moved, but this kvstore's copy could not be released; it is retried in the background");
      this.releaseLater(s.id, e as Error);
    }
    return result;
  }

  /** At most this many moved-away sessions are remembered for redirects (the oldest are forgotten). */
  static readonly MOVED_REMEMBERED = 65_536;

  private remember(id: string, target: string): void {
    this.moved.delete(id);
    this.moved.set(id, target);
    if (this.moved.size > SessionManager.MOVED_REMEMBERED) this.moved.delete(this.moved.keys().next().value as string);
  }

  /**
   * Records at the kvstore the pages of `layer` that filled since the last commit (two-phase:
   * the engine wrote them into the store, now the kvstore learns they are valid). Which pages
   * are full and offloaded is the engine's answer (filledPages). Runs in the background, in order
   * per session.
   */
  commitProgress(s: ComputeSession, layer: number): void {
    this.commitLayers(s, [layer]);
  }

  /**
   * The same for every layer at once, after a decode step appended to all of them: the layers
   * whose pages filled go to the kvstore in one CommitPages call (with `layers`), not one call
   * per layer (a batch-16 step that fills a page in 32 layers made 512 calls).
   */
  commitProgressAll(s: ComputeSession): void {
    this.commitLayers(s, s.layerTokens.map((_, l) => l));
    // Generate's commit point: a degraded session fails the call (the tokens appended so far stay
    // in the session, consistently; the pages are retried).
    this.checkCommits(s);
  }

  /**
   * Raises the session's commit target to the pages the engine has offloaded and queues a commit.
   * committedPages advances only when the kvstore acknowledges: a failed commit leaves them where
   * they were, so the next attempt (the next commit point, or the retry timer) sends the range from
   * the first uncommitted page again; nothing is skipped and no gap can form.
   */
  private commitLayers(s: ComputeSession, layers: number[]): void {
    if (s.lost || s.detached) return;
    // A page is committed in a layer only once every layer holds it: a re-attach resumes every
    // layer at the fewest tokens any layer holds, so a page committed beyond that in one layer
    // (an Attention stream's layer 0 ahead of the rest when its compute died) would be written
    // again, with whatever the client sends then, under the checksum the kvstore recorded.
    let fewest = Infinity;
    for (const t of s.layerTokens) if (t < fewest) fewest = t;
    const cap = Math.floor(fewest / s.retrieval.pageSize);
    if (cap > s.commitCap) {
      // The layers that waited for the slowest one may commit now.
      s.commitCap = cap;
      layers = s.layerTokens.map((_, l) => l);
    }
    let grew = false;
    for (const layer of layers) {
      if (!s.offloads(layer)) continue;
      const full = Math.min(this.opts.engine.filledPages(s.engineSession, layer), s.commitCap);
      if (full <= s.commitTarget[layer]) continue;
      s.commitTarget[layer] = full;
      s.commitContextTokens = Math.max(s.commitContextTokens, s.layerTokens[layer]);
      grew = true;
    }
    if (grew || s.commitError) this.queueCommit(s);
  }

  /** Queues one commit of everything not yet acknowledged (commit points in between join it). */
  private queueCommit(s: ComputeSession): void {
    if (s.commitQueued) return;
    s.commitQueued = true;
    s.commitChain = s.commitChain
      .then(() => this.sendCommit(s))
      .catch((e: Error) => {
        // Not left in a log only: the session's next call is told (INTERNAL), as for a failed commit.
        s.commitError ??= new ServiceError(status.INTERNAL, `session ${quoteId(s.id)}: a commit failed unexpectedly (${e.message})`);
        this.opts.log.error({ session: s.id, err: e.message }, "commit failed unexpectedly; the session is degraded");
      });
  }

  /**
   * The request that brings the kvstore from committedPages to `target` (the commit target the
   * caller took), with the metadata when it changed; undefined when there is nothing to send.
   * Everything it carries but the checksums is read from the session before its first await, so
   * commit points arriving while the checksums are computed are left to the next commit. The
   * checksums are computed off the main thread (ShmSegment.crc32cPagesAsync, several threads for
   * a long range), one layer after the other: each holds a thread of libuv's pool, which the
   * engine's and the model's work run on too, so a commit of many layers does not take all of it.
   */
  private async commitRequest(s: ComputeSession, target: readonly number[]): Promise<CommitPagesRequest | undefined> {
    const ranges: { layer: number; first: number; full: number }[] = [];
    for (let layer = 0; layer < target.length; layer++) {
      const first = s.committedPages[layer];
      const full = target[layer];
      if (full > first) ranges.push({ layer, first, full });
    }
    if (ranges.length === 0 && !s.metadataDirty) return undefined;
    const metadata = s.metadataDirty ? this.encodeMetadata(s) : Buffer.alloc(0);
    const contextTokens = Math.max(s.commitContextTokens, s.metadataDirty ? (s.metadataContextTokens ?? 0) : 0);
    const firstPage = s.committedPages[0];
    const store = s.host?.store;
    const l = s.attach.layout;
    let sums: Uint32Array[] | undefined;
    if (this.opts.commitChecksums && store && l) {
      sums = [];
      // Through the mapping (a store may be larger than the 4 GiB a JS buffer covers).
      for (const { layer, first, full } of ranges) sums.push(await store.crc32cPagesAsync(layer * Number(l.layerStrideBytes) + first * Number(l.pageBytes), Number(l.pageBytes), full - first));
    }
    const entries: LayerPages[] = ranges.map(({ layer, first, full }, i) => ({ layer, firstPage: first, count: full - first, checksums: sums ? Array.from(sums[i]) : [] }));
    if (entries.length === 1) return { sessionId: s.id, ...entries[0], contextTokens, metadata, layers: [] };
    return { sessionId: s.id, layer: 0, firstPage: entries.length ? 0 : firstPage, count: 0, checksums: [], contextTokens, metadata, layers: entries };
  }

  private encodeMetadata(s: ComputeSession): Buffer {
    const m: SessionMetadata = { ...s.metadata };
    if (s.metadataContextTokens !== undefined) m.contextTokens = s.metadataContextTokens;
    return Buffer.from(JSON.stringify(m));
  }

  private async sendCommit(s: ComputeSession): Promise<void> {
    s.commitQueued = false;
    if (s.lost) return;
    // The target this commit covers, taken before the checksums are awaited: committedPages
    // advance to it, not to commit points that arrive meanwhile (they queue the next commit).
    const target = [...s.commitTarget];
    let req: CommitPagesRequest | undefined;
    try {
      req = await this.commitRequest(s, target);
    } catch (e) {
      // The session was lost (its mappings freed) while the checksums ran: nothing to degrade.
      if (s.lost || s.detached) return;
      // Preparing the commit failed here (not at the kvstore): the session is degraded, its calls
      // are told, and the process keeps serving every other session.
      const why = (e as Error).message;
      s.commitError = new CommitFailed(status.INTERNAL, `session ${quoteId(s.id)}: its pages could not be prepared for commit (${why})`);
      s.commitFailures++;
      this.opts.onCommitFailure?.();
      this.opts.log.error({ session: s.id, err: why }, "preparing a commit failed; the session is degraded");
      return;
    }
    if (!req || s.lost) return;
    const withMetadata = req.metadata.length > 0;
    try {
      await this.opts.kvstore.commit(req);
    } catch (e) {
      this.commitFailed(s, req, e);
      return;
    }
    for (let l = 0; l < target.length; l++) s.committedPages[l] = Math.max(s.committedPages[l], target[l]);
    if (withMetadata && req.metadata.equals(this.encodeMetadata(s))) s.metadataDirty = false;
    if (s.commitError) this.opts.log.info({ session: s.id, failures: s.commitFailures, committedPages: s.committedPages }, "commits to the kvstore recovered; the session's pages are committed");
    s.commitError = undefined;
    s.commitFailures = 0;
    if (s.retryTimer) clearTimeout(s.retryTimer);
    s.retryTimer = undefined;
  }

  /** A failed commit: the session is degraded (reported, counted, logged at error level) and retried with a backoff. */
  private commitFailed(s: ComputeSession, req: CommitPagesRequest, e: unknown): void {
    const err = e as Error & { code?: number; details?: string };
    const why = err.details || err.message;
    if (err.code === status.NOT_FOUND || err.code === status.DATA_LOSS) {
      this.markLost(s, `the kvstore answered a commit with: ${why}`, err.code === status.DATA_LOSS ? "the kvstore reports its pages corrupt" : undefined);
      return;
    }
    const transport = err.code === undefined || err.code === status.UNAVAILABLE || err.code === status.DEADLINE_EXCEEDED || err.code === status.CANCELLED;
    s.commitError = new CommitFailed(
      transport ? status.UNAVAILABLE : status.INTERNAL,
      `session ${quoteId(s.id)}: the kvstore did not take its pages (${why}); they are kept and committed again once it does`,
    );
    s.commitFailures++;
    this.opts.onCommitFailure?.();
    const layers = req.layers.length ? req.layers.map((l) => l.layer) : [req.layer];
    this.opts.log.error({ session: s.id, layers, failures: s.commitFailures, committedPages: s.committedPages, err: why }, "commit to the kvstore failed; the session is degraded until a retry succeeds");
    if (s.closed || s.retryTimer) return;
    const delay = Math.min(5000, 250 * 2 ** Math.min(s.commitFailures - 1, 5));
    s.retryTimer = setTimeout(() => {
      s.retryTimer = undefined;
      if (!s.closed) this.queueCommit(s);
    }, delay);
    s.retryTimer.unref();
  }

  /**
   * Throws the session's commit failure (UNAVAILABLE while the kvstore is unreachable): a call
   * that appends to a degraded session fails instead of reporting success over pages that are
   * not durable. The pages stay in the store and are retried. A lost session's calls get DATA_LOSS.
   */
  checkCommits(s: ComputeSession): void {
    s.lastUsed = this.now();
    this.checkLost(s);
    if (s.commitError) throw s.commitError;
  }

  /**
   * Throws DATA_LOSS when the kvstore no longer holds the session, when it marked the session
   * corrupt (its scrubber found a committed page that changed after the commit: the manifest
   * carries the marker, services/kvstore/scrubber.ts), or when a failed decode left the
   * session's context unknown (diverged.ts). Called at the start of every turn and before a move.
   */
  checkLost(s: ComputeSession): void {
    if (!s.lost && !s.closed && !s.detached && s.host && loadAddon().manifestCorrupt((s.manifestView ??= s.host.manifest.buffer()))) {
      this.markLost(s, "CRC32C mismatch found by the kvstore's scrubber", "a committed page changed after its commit");
    }
    if (s.lost) throw s.lost;
    checkDiverged(s);
  }

  /**
   * The kvstore does not know the session any more (it restarted with the in-memory directory,
   * or its record was removed): what it had committed is gone. The session is marked lost (its
   * calls get DATA_LOSS until it is closed; it is not retried), counted and logged at error level.
   */
  markLost(s: ComputeSession, why: string, cause = "the kvstore no longer holds it"): void {
    if (s.lost || s.closed) return;
    s.lost = new ServiceError(
      status.DATA_LOSS,
      `session ${quoteId(s.id)} is lost: ${cause} (${why}); its context cannot be recovered. Close it and start a new session`,
    );
    s.commitError = undefined;
    if (s.retryTimer) clearTimeout(s.retryTimer);
    s.retryTimer = undefined;
    this.opts.onLost?.();
    this.opts.log.error({ session: s.id, contextTokens: s.contextTokens, committedPages: s.committedPages, why }, `session lost: ${cause}; its engine session and mappings are freed now`);
    void this.dropLost(s);
  }

  /**
   * Frees what a lost session holds in this process at once, not at its CloseSession: the engine
   * session (device memory, registrations) and the mappings of its segments (whose memory the
   * kernel keeps while they are mapped, even after the kvstore removed them). It waits for the
   * call using the session (its lock), which then fails with DATA_LOSS. The session stays listed
   * (its calls get DATA_LOSS, GetSession shows it) until it is closed, and no longer counts
   * against its tenant's quota.
   */
  private async dropLost(s: ComputeSession): Promise<void> {
    try {
      await s.lock.run(async () => {
        if (s.closed || s.detached) return;
        await s.commitChain;
        await this.detach(s);
        this.opts.log.info({ session: s.id }, "lost session's engine session and mappings freed");
      });
    } catch (e) {
      this.opts.log.warn({ session: s.id, err: (e as Error).message }, "freeing a lost session failed");
    }
  }

  /**
   * Grows the session's reservation at the kvstore so its store has memory for `tokens` context
   * tokens (capped at its max context; the kvstore rounds up to its extent), then lets the engine
   * write that far. Nothing is sent when the reservation already covers it. Rejects with the
   * kvstore's status: RESOURCE_EXHAUSTED when its capacity is short (Generate then waits in the
   * request queue), DATA_LOSS when the kvstore lost the session (it is marked lost and freed).
   */
  async reserve(s: ComputeSession, tokens: number, signal?: AbortSignal): Promise<void> {
    const want = Math.min(tokens, s.maxContextTokens);
    if (want <= s.reservedTokens) return;
    this.checkLost(s);
    let reservedTokens: number;
    try {
      ({ reservedTokens } = await this.opts.kvstore.reserve(s.id, want, signal, this.callerCommits));
    } catch (e) {
      const err = e as Error & { code?: number; details?: string };
      if (err.code === status.NOT_FOUND || err.code === status.DATA_LOSS) {
        this.markLost(s, `the kvstore answered a reservation with: ${err.details || err.message}`);
        // Closed meanwhile (markLost leaves a closed session as it is): gone, not lost.
        throw s.lost ?? this.goneError(s.id);
      }
      throw e;
    }
    // Closed meanwhile: NOT_FOUND, or, where it was moved to another pod, the redirect there.
    if (s.closed || s.detached) throw this.moved.has(s.id) ? this.goneError(s.id) : notFound(`session ${quoteId(s.id)} was closed`);
    // Concurrent reservations may answer out of order; the engine's bound only grows.
    if (reservedTokens > s.reservedTokens) {
      this.opts.engine.reserveStore(s.engineSession, reservedPagesOf(reservedTokens, s.retrieval.pageSize, s.attach.layout!.capacityPages));
      s.reservedTokens = reservedTokens;
    }
  }

  /**
   * Compares the open sessions with those the kvstore holds (after it serves again: a restart
   * with the in-memory directory forgets every session) and marks the missing ones lost. Only
   * sessions open both before and after the listing count, so one created meanwhile is not
   * mistaken for a lost one. Returns how many were marked.
   */
  async checkKvstoreSessions(): Promise<number> {
    const before = new Set(this.sessions.keys());
    const { sessionIds } = await this.opts.kvstore.list();
    const held = new Set(sessionIds);
    let n = 0;
    for (const s of this.sessions.values()) {
      if (!before.has(s.id) || held.has(s.id) || s.lost || s.closed) continue;
      this.markLost(s, "it is not among the kvstore's sessions after the kvstore served again; the kvstore restarted without a persistent directory");
      n++;
    }
    return n;
  }

  /**
   * Commits the session's metadata at the kvstore together with any pages still to commit; the
   * metadata is stamped with the context it describes (see SessionMetadata.contextTokens) and is
   * sent again with every later commit until the kvstore has it. Rejects with the commit's
   * failure (the session is then degraded and the retry carries the metadata).
   */
  async commitMetadata(s: ComputeSession): Promise<void> {
    s.metadataContextTokens = s.contextTokens;
    s.metadataDirty = true;
    this.commitLayers(s, s.layerTokens.map((_, l) => l));
    this.queueCommit(s);
    await s.commitChain;
    this.checkCommits(s);
  }

  /**
   * The CPU engine keeps every layer's sink, window and selection slots in float32, allocated
   * when a session is made: sized by the client's geometry and retrieval config (resolved),
   * bounded only indirectly by the kvstore's capacity, and a session past the machine's memory
   * would have the kernel kill this process. Such a session can never be served here: throws
   * RESOURCE_EXHAUSTED naming the sizes (a stateless Generate is refused with it at once, not
   * left waiting for memory).
   */
  checkEngineMemory(geometry: ModelGeometry, retrieval: RetrievalConfig): void {
    if (this.opts.backend !== "cpu") return;
    const tokens = retrieval.sinkTokens + retrieval.windowTokens + retrieval.selectTokens;
    const working = geometry.layers * tokens * geometry.kvHeads * geometry.headDim * 2 * 4;
    if (working > Math.floor(totalmem() / 2)) {
      throw neverFits(
        `the session needs ${working} bytes of engine memory (${geometry.layers} layers x ${tokens} sink, window and selected tokens x ${geometry.kvHeads} KV heads x ${geometry.headDim} x K and V in float32); a session may take at most half of this machine's ${totalmem()} bytes: it can never fit`,
      );
    }
  }

  /** Releases `id` at the kvstore in the background until it answers (see pendingReleases); logged and counted. */
  private releaseLater(id: string, why: Error, creationToken = ""): void {
    this.opts.onReleaseFailure?.();
    const pending = this.pendingReleases.get(id);
    if (pending) {
      pending.add(creationToken);
      return;
    }
    this.pendingReleases.set(id, new Set([creationToken]));
    this.opts.log.warn({ session: id, err: why.message }, "releasing the session at the kvstore failed; retried in the background");
    if (this.releaseTimer) return;
    this.releaseTimer = setInterval(() => void this.retryReleases(), this.opts.releaseRetryMs ?? 2000);
    this.releaseTimer.unref();
  }

  /** Whether the kvstore honours creation tokens (GetStats' features); throws when it does not answer. */
  private async kvstoreHonoursTokens(): Promise<boolean> {
    const { features } = await this.opts.kvstore.stats();
    return (features ?? []).includes("creation_token");
  }

  private retrying = false;
  private async retryReleases(): Promise<void> {
    if (this.retrying) return;
    this.retrying = true;
    try {
      // Whether the kvstore honours creation tokens: undefined until asked, null when it did not answer.
      let honours: boolean | null | undefined;
      for (const [id, tokens] of [...this.pendingReleases]) {
        const unconditional = tokens.has("");
        // Open here again (a client reused the name since): not ours to release.
        if (this.sessions.has(id)) {
          this.pendingReleases.delete(id);
          continue;
        }
        if (this.creating.has(id)) {
          // Being made (or received) here again: the release waits for that call to end, and the
          // next round decides. A CreateSession's attach is create_only: it neither opens nor takes
          // over the session still held at the kvstore (it is answered ALREADY_EXISTS while that
          // one is there), so the session this release is owed stays releasable; one that the
          // call did make is open here by then, and the round drops the release (above).
          continue;
        }
        // Asked once a round, before the first token-guarded release.
        if (!unconditional && honours === undefined) {
          try {
            honours = await this.kvstoreHonoursTokens();
          } catch (e) {
            const code = (e as { code?: number }).code;
            if (code === status.UNIMPLEMENTED) honours = false;
            else {
              honours = null;
              this.opts.log.warn({ err: (e as Error).message }, "cannot ask the kvstore whether it honours creation tokens; token-guarded releases wait for the next round");
            }
          }
        }
        if (!unconditional && honours === null) continue; // no answer: the next round asks again
        if (!unconditional && !honours) {
          // A kvstore older than creation tokens would ignore the token and free the session
          // whoever opened it since: kept instead (it is still listed, and can be released by hand).
          this.pendingReleases.delete(id);
          this.opts.log.warn({ session: id }, "a session whose creation went unanswered is kept: the kvstore does not honour creation tokens (upgrade it with compute); release it by hand if nobody uses it");
          continue;
        }
        for (const token of unconditional ? [""] : [...tokens]) {
          try {
            await this.opts.kvstore.release(id, undefined, token);
            tokens.clear();
            this.opts.log.info({ session: id }, "session released at the kvstore after an earlier failure");
            break;
          } catch (e) {
            const code = (e as { code?: number }).code;
            if (code === status.NOT_FOUND) {
              tokens.clear();
              break;
            }
            if (token && code === status.FAILED_PRECONDITION) {
              // Not made by that lost call, or opened by someone since: kept.
              tokens.delete(token);
              this.opts.log.info({ session: id, reason: (e as { details?: string }).details ?? (e as Error).message }, "a session whose creation went unanswered is kept: it is someone's");
              continue;
            }
            break; // the kvstore did not answer: the next round tries again
          }
        }
        if (tokens.size === 0) this.pendingReleases.delete(id);
      }
    } finally {
      this.retrying = false;
      if (this.pendingReleases.size === 0 && this.releaseTimer) {
        clearInterval(this.releaseTimer);
        this.releaseTimer = undefined;
      }
    }
  }

  /** Session ids whose release at the kvstore is still to be retried. */
  get releasesPending(): number {
    return this.pendingReleases.size;
  }

  async close(id: string, signal?: AbortSignal): Promise<boolean> {
    const s = this.get(id);
    const t0 = performance.now();
    let times: DetachTimes | undefined;
    // The wait for the session's lock (a Generate may hold it) ends with the caller's deadline.
    await s.lock.run(async () => {
      if (s.closed) throw this.goneError(id);
      s.closed = true;
      if (s.retryTimer) clearTimeout(s.retryTimer);
      this.sessions.delete(id);
      this.moved.delete(id);
      this.opts.onChange?.(this.sessions.size);
      await s.commitChain;
      if (!s.detached) times = await this.detach(s);
    }, signal);
    // A lost session is unknown to the kvstore (its segments went with the old kvstore process)
    // or known as corrupt (its segments are still there): released where it is held, and a
    // failure to reach the kvstore does not keep it open here.
    // The session is gone here whatever the kvstore answers: a release that fails is retried in
    // the background (its memory is counted there until then) and the caller still gets the error.
    const t1 = performance.now();
    try {
      await this.opts.kvstore.release(id, signal);
    } catch (e) {
      this.releaseLater(id, e as Error);
      if (!s.lost) throw e;
    }
    // Where a close's time goes (a long session's teardown runs beside the next requests):
    // engineCloseMs, the engine's wait for queued work and its unregistration and frees;
    // unmapMs, the segments' unmapping; teardownWaitMs, of those two, the wait for other sessions'
    // openings and registrations; releaseMs, the kvstore's release; closeMs, all of it.
    const t2 = performance.now();
    this.opts.log[s.unnamed ? "debug" : "info"](
      { session: id, lost: s.lost ? true : undefined, closeMs: Math.round(t2 - t0), ...times, releaseMs: Math.round(t2 - t1) },
      "session closed",
    );
    return true;
  }

  /**
   * Closes the engine session and unmaps the segments (the kvstore keeps them), both on worker
   * threads (closeSessionAsync, closeAsync): the CUDA engine's unregistration of a long
   * session's host store and the teardown of its page tables (16 GiB for 128K tokens of an 8B
   * model, ~70 ms a GiB for the unmap alone) held the event loop, so every other request's RPCs
   * and steps, for as long (the likely cause of the 0.6 s queue time measured after a 128K
   * prompt on the H200; not re-measured yet).
   */
  private async detach(s: ComputeSession): Promise<DetachTimes> {
    s.detached = true;
    const t0 = performance.now();
    const times: DetachTimes = { engineCloseMs: 0, unmapMs: 0 };
    const addon = loadAddon();
    const waited0 = addon.teardownStats().waitedMs;
    // A failed close leaves the engine session open (the binding keeps it so): tried once more.
    // One that fails again keeps its segments mapped (they cannot be unmapped under an engine
    // session): logged as an error, for as long as the process lives.
    let closed = false;
    for (let attempt = 1; attempt <= 2 && !closed; attempt++) {
      try {
        await this.opts.engine.closeSessionAsync(s.engineSession);
        closed = true;
      } catch (e) {
        this.opts.log.warn({ session: s.id, attempt, err: (e as Error).message }, "engine closeSession failed");
      }
    }
    this.opts.onEngineClosed?.(s);
    const t1 = performance.now();
    times.engineCloseMs = Math.round(t1 - t0);
    if (!closed) {
      this.opts.log.error({ session: s.id }, "the engine session could not be closed: its memory stays mapped in this process");
      return times;
    }
    if (!s.host) return times;
    const unmaps = await Promise.allSettled(
      [s.host.store, s.host.staging, s.host.tail, s.host.manifest].map((seg) => {
        try {
          return seg.closeAsync();
        } catch (e) {
          return Promise.reject(e);
        }
      }),
    );
    for (const u of unmaps) if (u.status === "rejected") this.opts.log.error({ session: s.id, err: (u.reason as Error).message }, "a segment of the session could not be unmapped");
    times.unmapMs = Math.round(performance.now() - t1);
    const waited = addon.teardownStats().waitedMs - waited0;
    if (waited > 0) times.teardownWaitMs = Math.round(waited);
    return times;
  }

  /** At shutdown: finish commits, close engine sessions and mappings; the kvstore keeps the pages. */
  async shutdown(): Promise<void> {
    if (this.expiryTimer) clearInterval(this.expiryTimer);
    this.expiryTimer = undefined;
    // Releases still owed to the kvstore get one more try; what still fails is logged (the
    // kvstore keeps those sessions until they are released or it restarts without them).
    if (this.releaseTimer) clearInterval(this.releaseTimer);
    this.releaseTimer = undefined;
    if (this.pendingReleases.size) {
      await this.retryReleases();
      if (this.releaseTimer) clearInterval(this.releaseTimer);
      this.releaseTimer = undefined;
      for (const id of this.pendingReleases.keys()) this.opts.log.error({ session: id }, "session left unreleased at the kvstore at shutdown");
    }
    for (const s of this.sessions.values()) {
      await s.lock.run(async () => {
        s.closed = true;
        if (s.retryTimer) clearTimeout(s.retryTimer);
        await s.commitChain;
        if (s.detached) return;
        if (s.metadataDirty && s.metadata.dataLoss !== undefined && !s.lost) {
          // The diverged mark's commits failed so far: one more try, else the next compute to
          // re-attach the session would not know that its context is unknown.
          this.queueCommit(s);
          await s.commitChain;
          if (s.metadataDirty) {
            this.opts.log.error(
              { session: s.id, dataLoss: s.metadata.dataLoss, err: s.commitError?.message },
              "the session's data-loss mark is not saved at the kvstore: a compute that re-attaches it will not know that its context is unknown; close it (CloseSession)",
            );
          }
        }
        // A failed wait for the session's recalls still lets the process shut down (the pages are
        // in the kvstore), but it is logged: the session may need a re-attach check.
        await this.opts.engine.sync(s.engineSession).catch((e: Error) => this.opts.log.warn({ session: s.id, err: e.message }, "waiting for the session's background recalls failed at shutdown"));
        await this.detach(s);
        // A stateless request's session (its request was cut short by the drain): nobody continues
        // it, so its memory goes back to the kvstore now rather than at the next compute's start.
        if (s.metadata.ephemeral === true && !s.lost) {
          await this.opts.kvstore.release(s.id).catch((e: Error) => this.opts.log.warn({ session: s.id, err: e.message }, "releasing a stateless request's session at shutdown failed; the next compute releases it at its start"));
        }
      });
    }
    this.sessions.clear();
  }

  stats(s: ComputeSession): RetrievalStats {
    this.cosineEdges ??= loadAddon().cosineBucketEdges();
    return retrievalStats(this.opts.engine.stats(s.engineSession), this.cosineEdges);
  }

  toProto(s: ComputeSession): Session {
    return {
      sessionId: s.id,
      kind: s.kind,
      geometry: s.geometry,
      retrieval: s.retrieval,
      maxContextTokens: s.maxContextTokens,
      contextTokens: s.contextTokens,
      // A lost session's engine session is already freed: no statistics.
      stats: s.detached ? undefined : this.stats(s),
      backend: this.opts.backend,
      // The DATA_LOSS every later call on the session gets (lost, or diverged by a failed decode).
      dataLoss: ((s.lost ?? divergedError(s))?.message ?? "").slice(0, MAX_DATA_LOSS_CHARS),
    };
  }
}

function segmentNames(a: AttachSessionResponse): string[] {
  return [a.store, a.staging, a.tail, a.manifest].map((s) => s?.name ?? "?");
}
