/**
 * One session as the compute tier holds it: its geometry and retrieval config, the kvstore's
 * segments mapped here, the engine's session handle, and per-layer token and committed-page
 * counts (what has been offloaded to the host tier and recorded at the kvstore).
 */
import type { HostSegments } from "../../../native/binding.js";
import type { ModelGeometry, RetrievalConfig } from "../../../proto/gen/freekv/v1/common.js";
import { SessionKind } from "../../../proto/gen/freekv/v1/compute.js";
import type { AttachSessionResponse } from "../../../proto/gen/freekv/v1/kvstore.js";
import { AsyncLock } from "./lock.js";

/** What compute keeps in the kvstore's opaque per-session metadata (for re-attach). */
export interface SessionMetadata {
  kind: "model" | "attention";
  /**
   * Context tokens the state fields (e.g. `generate`) describe: they were saved when the session
   * held exactly this many tokens. A session re-attached with another count lost the tail of a
   * turn (a compute killed mid-turn) and its per-turn state is stale.
   */
  contextTokens?: number;
  /** The tenant (`x-freekv-tenant`) that created it, counted against FREEKV_MAX_SESSIONS_PER_TENANT. */
  tenant?: string;
  /**
   * The session is diverged (diverged.ts): the DATA_LOSS message its calls get, at most
   * MAX_DATA_LOSS_CHARS characters. Saved when a failed decode marks it
   * (SessionManager.saveDataLoss); a re-attach marks the session again from it (savedDataLoss
   * checks it; a malformed value still marks it). Absent for a healthy session.
   */
  dataLoss?: string;
  /**
   * A session made for one request (a stateless Generate's), closed when the request ends: no
   * client continues it, so a compute that finds it at start (its predecessor died during the
   * request) releases it instead of re-attaching it (SessionManager.reattachAll).
   */
  ephemeral?: boolean;
  /** Free-form fields of other components (e.g. the generate handler's token history). */
  [key: string]: unknown;
}

export class ComputeSession {
  readonly lock = new AsyncLock();
  /**
   * Generate's turns on this session, one after another, taken before the turn queues for a
   * running slot (generate/handler.ts): a turn waiting behind another turn of its session holds
   * no slot. Only turns take it; everything else (a close, a move) takes `lock` alone.
   */
  readonly turnLock = new AsyncLock();
  /** Tokens appended to each layer so far. */
  readonly layerTokens: number[];
  /** Full pages committed at the kvstore per layer. */
  readonly committedPages: number[];
  closed = false;
  /** Full pages per layer that are offloaded and should be committed (committedPages trails it until the kvstore acknowledges). */
  readonly commitTarget: number[];
  /** Context tokens to report with the pages of commitTarget. */
  commitContextTokens = 0;
  /** Full pages every layer holds (the fewest tokens of any layer, in pages): no layer's commit target passes it. */
  commitCap = 0;
  /** Named by the service (a stateless Generate's session): its life is logged at debug, the request's line says the rest. */
  unnamed = false;
  /** Commits to the kvstore run in order, off the request's critical path. */
  commitChain: Promise<void> = Promise.resolve();
  /** A commit is queued on commitChain and not started yet (later commit points join it). */
  commitQueued = false;
  /** The metadata changed since the kvstore last took it. */
  metadataDirty = false;
  /** Context tokens when the metadata was last made consistent (SessionMetadata.contextTokens). */
  metadataContextTokens: number | undefined;
  /** Why the latest commit failed; undefined once one succeeds (the session is degraded meanwhile). */
  commitError: Error | undefined;
  /**
   * Set when the kvstore no longer holds the session (it restarted without a persistent
   * directory): its pages are gone for good; every call that uses it fails with this (DATA_LOSS)
   * until it is closed.
   */
  lost: Error | undefined;
  /** When a call last used it (ms, the manager's clock): idle sessions expire (FREEKV_SESSION_IDLE_TIMEOUT_S). */
  lastUsed = 0;
  /** Consecutive failed commits (the retry backoff). */
  commitFailures = 0;
  retryTimer: NodeJS.Timeout | undefined;
  /**
   * Context tokens the kvstore has memory for in the session's store (its reservation); the
   * engine refuses appends past it. Grown before each turn (SessionManager.reserve).
   */
  reservedTokens: number;
  /** The engine session is closed and the segments unmapped (closed, or dropped when lost). */
  detached = false;
  /**
   * The manifest segment's bytes, mapped once: every turn reads its corrupt marker, and each
   * buffer() of a segment is kept referenced until the segment closes, so one per turn grew
   * with the session's life.
   */
  manifestView: ArrayBuffer | undefined;
  /**
   * The id of the move that brought the session to this pod (SessionTransferHeader.move_id), kept
   * in memory only: GetArrival answers HELD for that move alone (SessionManager.arrivalState).
   * Undefined for a session created or re-attached here.
   */
  arrivedBy: string | undefined;

  constructor(
    readonly id: string,
    readonly kind: SessionKind,
    readonly geometry: ModelGeometry,
    readonly retrieval: RetrievalConfig,
    readonly maxContextTokens: number,
    readonly attach: AttachSessionResponse,
    readonly host: HostSegments | undefined,
    readonly engineSession: number,
    public metadata: SessionMetadata,
  ) {
    this.layerTokens = new Array<number>(geometry.layers).fill(0);
    this.committedPages = [...attach.committedPages];
    while (this.committedPages.length < geometry.layers) this.committedPages.push(0);
    this.commitTarget = [...this.committedPages];
    this.reservedTokens = attach.reservedTokens;
  }

  /** Context tokens of the session: the smallest per-layer count (all layers agree between steps). */
  get contextTokens(): number {
    return this.layerTokens.length ? Math.min(...this.layerTokens) : 0;
  }

  /** Layers that offload pages to the host tier (dense mode and dense layers keep all on device). */
  offloads(layer: number): boolean {
    return this.retrieval.mode !== 2 /* dense */ && !this.retrieval.denseLayers.includes(layer);
  }
}

export const kindName = (k: SessionKind) => (k === SessionKind.SESSION_KIND_ATTENTION ? "attention" : "model");
