/**
 * Moving a session from this pod to another (freekv.v1.SessionMoveService), for drains and
 * rebalancing.
 *
 * Source (MoveSession, and the drain's hand-off): under the session's lock (its turn in flight
 * ends first, no call appends meanwhile) its metadata and pages are committed to this pod's
 * kvstore and the engine's background recalls waited for; then this kvstore's ExportSession
 * stream is passed, message by message and with backpressure, to the target compute's
 * ReceiveSession. Only when the target answers OK is the session closed here (engine, mappings,
 * this kvstore's copy released) and its later calls redirected to the target (FAILED_PRECONDITION
 * with the trailer x-freekv-session-owner); on any failure it stays open here, intact, and the
 * error is returned. A session that is lost, or diverged (a failed decode may have appended to it,
 * diverged.ts), is refused with its DATA_LOSS error under the lock, before anything is saved or
 * sent (SessionManager.handOver). A cancellation or deadline before the digest was passed on
 * cancels both streams (the target kvstore removes what it had written); once the digest went
 * out, the answer is awaited so the outcome is known. When that answer is lost (the caller's
 * deadline passed on both sides, the transport broke), the source asks the target where this
 * move stands (GetArrival with the move's random id, which the header carried: each try with its
 * own short deadline, for up to SETTLE_MS): held there means the move happened and the session is
 * closed here; absent means it did not (another session of the same id there is not this move's),
 * and the session stays here; still receiving means ask again. A target that cannot be asked
 * leaves the session-owners directory to decide by whether its record still names this pod (the
 * target records itself as the owner only once it holds the session); when neither answers, the
 * session stays here and the unknown outcome is logged as an error and counted
 * (freekv_compute_move_outcome_unknown_total): both pods may then hold it.
 *
 * Target (ReceiveSession): the header is checked first (the id is free here, the caller may
 * move the session's tenant, its metadata is a JSON object, its tenant has room under
 * FREEKV_MAX_SESSIONS_PER_TENANT (a drain's hand-off aside: see receive), a model session's
 * geometry is the served model's, its context within FREEKV_MAX_CONTEXT_LIMIT); the messages go
 * on to this pod's kvstore ImportSession, which checks every chunk, the digest, and every size
 * against its capacity. If the caller is gone by then (cancelled, or its deadline passed), the
 * imported copy is released and nothing is opened: the session stays the source's. Otherwise the session is re-attached from the imported segments
 * (the engine continues it exactly as after a restart; from here on the move is done, whether or
 * not the answer arrives) and this pod is recorded as its owner; if the re-attach fails, the
 * imported copy is released and the error returned, so the source keeps it.
 *
 * Authentication: with FREEKV_AUTH_TOKENS_FILE both calls need a bearer token; a tenant moves
 * only its own sessions, FREEKV_MOVE_ADMIN_TENANT any. The source passes on its caller's token
 * (the drain, which has no caller, presents FREEKV_PEER_TOKEN_FILE's), over TLS when
 * FREEKV_PEER_TLS_* name the files (common/tls.ts).
 */
import { randomUUID } from "node:crypto";
import { Metadata, status, type ChannelCredentials, type ServiceError as GrpcError, type ServerReadableStream, type ServerUnaryCall, type sendUnaryData } from "@grpc/grpc-js";
import { Counter } from "prom-client";
import {
  ArrivalState,
  SessionMoveServiceClient,
  type GetArrivalRequest,
  type GetArrivalResponse,
  type MoveSessionRequest,
  type MoveSessionResponse,
  type ReceiveSessionRequest,
  type ReceiveSessionResponse,
  type SessionMoveServiceServer,
} from "../../../proto/gen/freekv/v1/compute.js";
import type { ExportSessionResponse, SessionTransferHeader } from "../../../proto/gen/freekv/v1/kvstore.js";
import { callScope, MAX_TIMER_MS } from "../../common/cancellation.js";
import { ServiceError, failedPrecondition, invalidArgument, quoteId, toStatus } from "../../common/errors.js";
import { resolveGeometry } from "../../common/geometry.js";
import { unary } from "../../common/handlers.js";
import { assertDecoded } from "../../common/malformed.js";
import { consume, sendUpstream } from "../../common/streams.js";
import { checkTenant } from "../auth.js";
import type { ComputeContext } from "../context.js";
import { MAX_CHUNK_BYTES, MAX_MOVE_ID_BYTES, MIN_CHUNK_BYTES } from "../../kvstore/transfer.js";
import { MAX_METADATA_BYTES } from "../../kvstore/store.js";
import { localSession } from "./owners.js";
import type { ComputeSession, SessionMetadata } from "./session.js";
import { checkSessionId } from "../../common/session-id.js";

/**
 * A move's target: host:port, the host a DNS name or IPv4 address ([A-Za-z0-9._-]) or an IPv6
 * address in brackets ([addr]:port, with an optional %zone), the port in 1-65535.
 */
const ADDRESS_RE = /^(?:[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]{2,45}(?:%[A-Za-z0-9._-]{1,64})?\]):(\d{1,5})$/;

/** INVALID_ARGUMENT naming `field` unless `target` is host:port (ADDRESS_RE) with a port in 1-65535. */
export function checkTarget(target: string, field = "target"): void {
  const m = ADDRESS_RE.exec(target);
  const port = m ? Number(m[1]) : 0;
  if (!m || port < 1 || port > 65535) throw invalidArgument(field, `must be host:port or [ipv6]:port with a port in 1-65535, got ${quoteId(target)}`);
}

/**
 * Request metadata with which a draining compute marks its hand-offs (value "drain"). The target
 * exempts them from FREEKV_MAX_SESSIONS_PER_TENANT when the caller may move any tenant's sessions
 * (FREEKV_MOVE_ADMIN_TENANT with authentication on, anyone without it): see SessionMover.receive.
 */
export const MOVE_REASON_KEY = "x-freekv-move-reason";

/** A downstream call's failure with its own status code, saying who answered it. */
function relayed(e: unknown, who: string): unknown {
  const g = e as { code?: unknown; details?: unknown };
  if (e instanceof ServiceError || typeof g.code !== "number" || typeof g.details !== "string") return e;
  return new ServiceError(g.code as status, `${who}: ${g.details}`);
}

/** Failures after which the target may or may not have taken the session (the answer was lost). */
const AMBIGUOUS = new Set<number>([status.UNAVAILABLE, status.DEADLINE_EXCEEDED, status.CANCELLED, status.UNKNOWN, status.INTERNAL]);

/** How long a source whose answer was lost keeps asking the target where the session stands. */
export const SETTLE_MS = 10_000;

/** Errors of moves whose outcome nobody could tell (the target may hold the session too). */
const UNKNOWN_OUTCOMES = new WeakSet<object>();

/** Whether a move failed without anyone able to tell whether the target took the session: it must not be offered to another pod. */
export const moveOutcomeUnknown = (e: unknown): boolean => typeof e === "object" && e !== null && UNKNOWN_OUTCOMES.has(e);
/** The deadline of each of those questions. */
const SETTLE_CALL_MS = 3_000;

export interface MoveOptions {
  chunkBytes?: number;
  /** Ms since the epoch: bounds both streams. */
  deadline: number;
  /** Cancels the move until its digest went out. */
  signal?: AbortSignal;
  /** The caller's authorization, passed on to the target. */
  authorization?: string;
  /** A draining pod's hand-off (handoff.ts): marked with MOVE_REASON_KEY (see SessionMover.receive). */
  drain?: boolean;
}

export interface MoveResult {
  sessionId: string;
  target: string;
  contextTokens: number;
  dataBytes: number;
  chunks: number;
  elapsedMs: number;
}

export interface MoveMetrics {
  moves: Counter<"role" | "result">;
  bytes: Counter<"role">;
  handoffFailures: Counter;
  outcomeUnknown: Counter;
}

export class SessionMover {
  readonly metrics: MoveMetrics;

  constructor(
    private readonly ctx: ComputeContext,
    private readonly peerCredentials: ChannelCredentials,
    /** The bearer token presented to peers when no caller's token is passed on (FREEKV_PEER_TOKEN_FILE). */
    readonly peerToken?: string,
  ) {
    const registers = [ctx.metrics.registry];
    this.metrics = {
      moves: new Counter({ name: "freekv_compute_session_moves_total", help: "Session moves by role (out: this pod was the source, in: the target) and result (ok or the gRPC status)", labelNames: ["role", "result"], registers }),
      bytes: new Counter({ name: "freekv_compute_session_move_bytes_total", help: "Session bytes (pages, tail, manifest) moved out of or into this pod", labelNames: ["role"], registers }),
      handoffFailures: new Counter({ name: "freekv_compute_handoff_failures_total", help: "Sessions a draining compute could not hand off (they stay in this pod's kvstore; each is logged with its reason)", registers }),
      outcomeUnknown: new Counter({ name: "freekv_compute_move_outcome_unknown_total", help: "Moves whose answer was lost after the digest went out and whose outcome neither the target nor the session-owners directory could tell: the session stayed here and the target may hold it too (each is logged)", registers }),
    };
  }

  private count(role: "in" | "out", e: unknown): void {
    const code = e === undefined ? status.OK : ((e as { code?: number }).code ?? status.INTERNAL);
    this.metrics.moves.inc({ role, result: code === status.OK ? "ok" : (status[code] ?? String(code)).toLowerCase() });
  }

  /**
   * Moves `s` to the compute at `target` (see the file's comment). `authorization` is passed on to
   * the target; `deadline` (ms since the epoch) bounds both streams; `signal` cancels the move
   * until its digest went out.
   */
  async move(s: ComputeSession, target: string, opts: MoveOptions): Promise<MoveResult> {
    const { ctx } = this;
    const t0 = performance.now();
    checkTarget(target);
    if (target === ctx.config.FREEKV_ADVERTISE_ADDRESS) throw failedPrecondition(`target ${target} is this pod (FREEKV_ADVERTISE_ADDRESS)`);
    let contextTokens = 0;
    // The wait for the session's turn (a Generate may hold it for minutes) and what comes before
    // the streams honour the move's deadline and its caller's cancellation; the streams carry the
    // deadline themselves.
    const waiting = new AbortController();
    const onAbort = () => waiting.abort(opts.signal!.reason);
    if (opts.signal?.aborted) onAbort();
    else opts.signal?.addEventListener("abort", onAbort, { once: true });
    const timer = setTimeout(
      () => waiting.abort(new ServiceError(status.DEADLINE_EXCEEDED, `the move's deadline passed before the session's turn came (it is busy); it stays on this pod`)),
      Math.max(0, Math.min(opts.deadline - Date.now(), MAX_TIMER_MS)),
    );
    try {
      const res = await ctx.sessions.handOver(
        s,
        target,
        async () => {
          contextTokens = s.contextTokens;
          return this.stream(s.id, target, opts);
        },
        waiting.signal,
      );
      this.count("out", undefined);
      this.metrics.bytes.inc({ role: "out" }, res.dataBytes);
      const elapsedMs = performance.now() - t0;
      ctx.log.info({ session: s.id, target, contextTokens, dataBytes: res.dataBytes, chunks: res.chunks, ms: Math.round(elapsedMs) }, "session moved to another pod");
      return { sessionId: s.id, target, contextTokens, dataBytes: res.dataBytes, chunks: res.chunks, elapsedMs };
    } catch (e) {
      this.count("out", e);
      ctx.log.warn({ session: s.id, target, err: (e as Error).message }, "session move failed; the session stays on this pod");
      throw e;
    } finally {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
    }
  }

  /**
   * This kvstore's export, passed on to the target's ReceiveSession; resolves with the target's
   * answer. Each move has a random id, which this kvstore writes into the header (covered by the
   * digest): the target keeps it with the session it opens, and a source whose answer was lost
   * asks the target about that move, not about whatever session of the id it holds (settle).
   */
  private async stream(id: string, target: string, opts: MoveOptions): Promise<{ dataBytes: number; chunks: number }> {
    const { ctx } = this;
    const md = new Metadata();
    const auth = opts.authorization ?? (this.peerToken ? `Bearer ${this.peerToken}` : undefined);
    if (auth) md.set("authorization", auth);
    if (opts.drain) md.set(MOVE_REASON_KEY, "drain");
    const moveId = randomUUID();
    // Whether the header went out with this move's id (a kvstore older than move ids leaves it out).
    let carried = false;
    const peer = new SessionMoveServiceClient(target, this.peerCredentials, { "grpc.max_send_message_length": 64 << 20, "grpc.max_receive_message_length": 64 << 20 });
    const exp = ctx.kvstore.exportSession(id, opts.chunkBytes ?? 0, opts.deadline, moveId);
    let out!: ReturnType<SessionMoveServiceClient["receiveSession"]>;
    const done = new Promise<ReceiveSessionResponse>((resolve, reject) => {
      out = peer.receiveSession(md, { deadline: opts.deadline }, (err, res) => (err ? reject(relayed(err, `target ${target}`)) : resolve(res!)));
    });
    done.catch(() => {});
    let digestSent = false;
    const onAbort = () => {
      if (digestSent) return;
      exp.cancel();
      out.cancel();
    };
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    try {
      try {
        for await (const m of exp as AsyncIterable<ExportSessionResponse>) {
          if (opts.signal?.aborted) throw opts.signal.reason;
          if (m.item?.$case === "header") carried = m.item.value.moveId === moveId;
          await sendUpstream(out, m as ReceiveSessionRequest, done);
          if (m.item?.$case === "digest") digestSent = true;
        }
      } catch (e) {
        if (opts.signal?.aborted && !digestSent) throw opts.signal.reason;
        // The target's own failure (the stream broke because it answered) says more than ours.
        const answered = await Promise.race([done.then(() => undefined, (x: unknown) => x), new Promise((r) => setTimeout(r, 50, undefined))]);
        throw answered ?? relayed(e, "this pod's kvstore (export)");
      }
      out.end();
      try {
        const res = await done;
        return { dataBytes: res.dataBytes, chunks: res.chunks };
      } catch (e) {
        const code = (e as { code?: number }).code;
        if (!digestSent || code === undefined || !AMBIGUOUS.has(code)) throw e;
        const outcome = await this.settle(id, target, peer, md, carried ? moveId : undefined);
        if (outcome === "held") {
          ctx.log.warn({ session: id, target, err: (e as Error).message }, "the target's answer was lost, but it holds the session: the move happened");
          return { dataBytes: 0, chunks: 0 };
        }
        if (outcome === "unknown") {
          if (typeof e === "object" && e !== null) UNKNOWN_OUTCOMES.add(e);
          this.metrics.outcomeUnknown.inc();
          ctx.log.error({ session: id, target, err: (e as Error).message }, "the target's answer was lost and neither it nor the session-owners directory tells whether it took the session: it stays on this pod, and the target may hold it too (close one copy)");
        }
        throw e;
      }
    } catch (e) {
      exp.cancel();
      out.cancel();
      throw e;
    } finally {
      opts.signal?.removeEventListener("abort", onAbort);
      peer.close();
    }
  }

  /**
   * Where the session stands at the target after its answer was lost: asks GetArrival about this
   * move (`moveId`) until it says held or absent (SETTLE_MS at most). A target that cannot be
   * asked (three failures, or one that will not pass), or a move whose header carried no id (a
   * kvstore older than move ids), leaves the session-owners directory to tell, by whether its
   * record still names this pod: the target records itself only once it holds the session, so a
   * record naming this pod means it did not take it ("absent"), one naming another pod that it did
   * ("held": the record names the target as it advertises itself, which need not be the caller's
   * spelling of it), and no record tells nothing ("unknown"). Without a directory it is unknown.
   */
  private async settle(id: string, target: string, peer: SessionMoveServiceClient, md: Metadata, moveId: string | undefined): Promise<"held" | "absent" | "unknown"> {
    const { ctx } = this;
    if (moveId !== undefined) {
      const state = await this.askArrival(id, target, peer, md, moveId);
      if (state) return state;
    } else {
      ctx.log.warn({ session: id, target }, "this pod's kvstore sent the move without its id, so the target cannot be asked about it; the session-owners directory decides");
    }
    if (!ctx.owners) return "unknown";
    // A directory that does not answer tells nothing either (not "absent": the target may hold it).
    let owner: string | undefined;
    try {
      owner = await ctx.owners.ownerOf(id);
    } catch (e) {
      ctx.log.warn({ session: id, target, err: (e as Error).message }, "the session-owners directory does not answer either");
      return "unknown";
    }
    if (owner === undefined) {
      ctx.log.warn({ session: id, target }, "the session-owners directory has no record of the session");
      return "unknown";
    }
    return owner === ctx.owners.self ? "absent" : "held";
  }

  /** GetArrival about move `moveId`, asked again while the target is receiving; undefined when the target cannot tell (see settle). */
  private async askArrival(id: string, target: string, peer: SessionMoveServiceClient, md: Metadata, moveId: string): Promise<"held" | "absent" | undefined> {
    const { ctx } = this;
    const until = Date.now() + SETTLE_MS;
    let wait = 20;
    let failures = 0;
    for (;;) {
      const r = await new Promise<{ state?: ArrivalState; err?: GrpcError }>((resolve) =>
        peer.getArrival({ sessionId: id, moveId }, md, { deadline: Date.now() + SETTLE_CALL_MS }, (err, res) => resolve(err ? { err } : { state: res!.state })),
      );
      if (r.state === ArrivalState.ARRIVAL_STATE_HELD) return "held";
      if (r.state === ArrivalState.ARRIVAL_STATE_ABSENT) return "absent";
      // Still receiving, or a failure that may pass: ask again.
      if (r.err && (!AMBIGUOUS.has(r.err.code) || ++failures >= 3)) {
        ctx.log.warn({ session: id, target, err: r.err.details ?? r.err.message }, "could not ask the target where the session stands; the session-owners directory decides");
        break;
      }
      if (Date.now() + wait > until) {
        ctx.log.warn({ session: id, target, waitedMs: SETTLE_MS }, "the target is still receiving the session; the session-owners directory decides");
        break;
      }
      await new Promise((res) => setTimeout(res, wait));
      wait = Math.min(wait * 2, 500);
    }
    return undefined;
  }

  /**
   * The receiving side of a move: the stream goes on to this pod's kvstore; the session is opened
   * and claimed here, and keeps the move's id (its header's) for GetArrival.
   *
   * The arriving session counts against its tenant's FREEKV_MAX_SESSIONS_PER_TENANT here like a
   * create (RESOURCE_EXHAUSTED at the limit, before the kvstore is asked for memory), so moves
   * cannot gather more sessions of a tenant on one pod than it could create there. A drain's
   * hand-off (marked with MOVE_REASON_KEY) made by a caller that may move any tenant's sessions
   * (FREEKV_MOVE_ADMIN_TENANT with authentication on; anyone without authentication, where the
   * tenant is the caller's own header anyway) is exempt: a pod that stops must be able to hand
   * off every session it holds, and a refusal would leave the session in a kvstore that is about
   * to go away.
   */
  async receive(call: ServerReadableStream<ReceiveSessionRequest, ReceiveSessionResponse>, signal: AbortSignal): Promise<ReceiveSessionResponse> {
    const { ctx } = this;
    const tenant = ctx.auth ? ctx.auth.authenticate(call.metadata) : undefined;
    const admin = tenant === undefined || tenant === ctx.config.FREEKV_MOVE_ADMIN_TENANT;
    const drain = admin && call.metadata.get(MOVE_REASON_KEY)[0] === "drain";
    const deadline = deadlineOf(call, ctx.config.FREEKV_MOVE_TIMEOUT_MS);
    let kv: ReturnType<ComputeContext["kvstore"]["importSession"]> | undefined;
    let unreserve: (() => void) | undefined;
    let header: SessionTransferHeader | undefined;
    try {
      await consume(call, signal, async (m) => {
        assertDecoded(m);
        if (!header) {
          if (m.item?.$case !== "header") throw invalidArgument("item", "the first message must be the header");
          header = m.item.value;
          const meta = this.admit(header, tenant);
          unreserve = ctx.sessions.reserveArrival(header.sessionId, header.moveId ?? "", drain ? undefined : typeof meta.tenant === "string" ? meta.tenant : "");
          kv = ctx.kvstore.importSession(deadline);
        }
        try {
          await sendUpstream(kv!.stream, m, kv!.done, signal);
        } catch (e) {
          // The kvstore answered while this message waited for room: its status, as it gave it.
          throw relayed(e, "this pod's kvstore (import)");
        }
      }, ctx.config.FREEKV_WRITE_STALL_MS);
      if (!header || !kv) throw invalidArgument("header", "the stream ended without one");
      kv.stream.end();
      let imported;
      const id = header.sessionId;
      try {
        imported = await kv.done;
      } catch (e) {
        // An answer lost after the whole stream went in: the kvstore may have committed the
        // import. Its copy is released so that nothing the source still holds is left here.
        const code = (e as { code?: number }).code;
        if (code !== undefined && AMBIGUOUS.has(code)) {
          await ctx.kvstore.release(id).catch((r: { code?: number; message: string }) => {
            if (r.code !== status.NOT_FOUND) ctx.log.error({ session: id, err: r.message }, "an import whose answer was lost could not be released; release it (ReleaseSession)");
          });
        }
        throw relayed(e, "this pod's kvstore (import)");
      }
      if (signal.aborted) {
        // The caller is gone before the session was opened here: the move did not happen (the
        // source keeps it, and GetArrival says absent once the copy is released).
        await ctx.kvstore.release(id).catch((r: Error) => ctx.log.error({ session: id, err: r.message }, "an imported session whose mover gave up could not be released; release it (ReleaseSession)"));
        throw signal.reason;
      }
      let s: ComputeSession;
      try {
        s = await ctx.sessions.reattach(id, { arrivedBy: header.moveId ?? "" });
      } catch (e) {
        await ctx.kvstore.release(id).catch((r: Error) => ctx.log.error({ session: id, err: r.message }, "an imported session could not be opened nor released; release it (ReleaseSession)"));
        throw new ServiceError(status.FAILED_PRECONDITION, `session ${quoteId(id)} was imported but cannot be opened here: ${(e as Error).message}`);
      }
      await ctx.owners?.claim(id);
      this.count("in", undefined);
      this.metrics.bytes.inc({ role: "in" }, imported.dataBytes);
      ctx.log.info({ session: id, contextTokens: s.contextTokens, dataBytes: imported.dataBytes, chunks: imported.chunks }, "session received from another pod");
      return { sessionId: id, dataBytes: imported.dataBytes, chunks: imported.chunks, contextTokens: s.contextTokens };
    } catch (e) {
      kv?.stream.cancel();
      this.count("in", signal.aborted ? signal.reason : e);
      throw e;
    } finally {
      unreserve?.();
    }
  }

  /**
   * What this pod checks of an arriving session before its kvstore is asked for memory; returns
   * its metadata. The metadata is compute's (a source saves it before the export: handOver), so
   * anything but a JSON object, or a tenant that is not a string, is refused (INVALID_ARGUMENT
   * naming header.metadata); none at all is an attention session, as a re-attach takes it.
   */
  private admit(h: SessionTransferHeader, tenant: string | undefined): SessionMetadata {
    const { ctx } = this;
    checkSessionId(h.sessionId, "header.session_id");
    if (h.moveId !== undefined && Buffer.byteLength(h.moveId) > MAX_MOVE_ID_BYTES) throw invalidArgument("header.move_id", `must be at most ${MAX_MOVE_ID_BYTES} bytes, got ${Buffer.byteLength(h.moveId)}`);
    // Bounded before it is parsed: this is a client stream, past the per-request byte cap.
    if (h.metadata.length > MAX_METADATA_BYTES) throw invalidArgument("header.metadata", `must be at most ${MAX_METADATA_BYTES} bytes, got ${h.metadata.length}`);
    let meta: SessionMetadata = { kind: "attention" };
    if (h.metadata.length) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(Buffer.from(h.metadata).toString("utf8"));
      } catch (e) {
        throw invalidArgument("header.metadata", `must be a JSON object (the session's metadata as compute saves it): ${(e as Error).message}`);
      }
      if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
        throw invalidArgument("header.metadata", `must be a JSON object (the session's metadata as compute saves it), got ${parsed === null ? "null" : Array.isArray(parsed) ? "an array" : typeof parsed}`);
      }
      meta = parsed as SessionMetadata;
      if (meta.tenant !== undefined && typeof meta.tenant !== "string") throw invalidArgument("header.metadata", `its tenant must be a string, got ${typeof meta.tenant}`);
    }
    if (tenant !== undefined && tenant !== ctx.config.FREEKV_MOVE_ADMIN_TENANT) checkTenant(meta.tenant, tenant, h.sessionId);
    if (h.maxContextTokens > ctx.config.FREEKV_MAX_CONTEXT_LIMIT) {
      throw failedPrecondition(`session ${quoteId(h.sessionId)} may reach ${h.maxContextTokens} tokens, more than this pod's FREEKV_MAX_CONTEXT_LIMIT=${ctx.config.FREEKV_MAX_CONTEXT_LIMIT}`);
    }
    if (meta.kind === "model") {
      const served = resolveGeometry({ ...ctx.served.geometry(), kvDtype: ctx.kvDtype }, "model");
      const g = resolveGeometry(h.geometry, "header.geometry");
      if (JSON.stringify(served) !== JSON.stringify(g)) {
        throw failedPrecondition(`session ${quoteId(h.sessionId)} is a model session of geometry ${JSON.stringify(g)}; this pod serves ${JSON.stringify(served)}`);
      }
    }
    return meta;
  }
}

/** The call's deadline in ms since the epoch, or `fallbackMs` from now when it has none. */
function deadlineOf(call: { getDeadline(): Date | number }, fallbackMs: number): number {
  const dl = call.getDeadline();
  if (dl instanceof Date) return dl.getTime();
  return Number.isFinite(dl) ? Number(dl) : Date.now() + fallbackMs;
}

export function sessionMoveService(ctx: ComputeContext, mover: SessionMover): SessionMoveServiceServer {
  const { log } = ctx;
  return {
    moveSession: unary(log, "MoveSession", async (req: MoveSessionRequest, signal: AbortSignal, call: ServerUnaryCall<MoveSessionRequest, MoveSessionResponse>): Promise<MoveSessionResponse> => {
      const tenant = ctx.auth ? ctx.auth.authenticate(call.metadata) : undefined;
      if (!req.sessionId) throw invalidArgument("session_id", "is required");
      checkSessionId(req.sessionId);
      if (!req.target) throw invalidArgument("target", "is required (host:port of the receiving compute)");
      checkTarget(req.target);
      // Refused here, before the session's turn is waited for (the export would refuse it too).
      if (req.chunkBytes !== 0 && (req.chunkBytes < MIN_CHUNK_BYTES || req.chunkBytes > MAX_CHUNK_BYTES)) {
        throw invalidArgument("chunk_bytes", `must be 0 (1 MiB) or in [${MIN_CHUNK_BYTES}, ${MAX_CHUNK_BYTES}], got ${req.chunkBytes}`);
      }
      const s = await localSession(ctx.sessions, ctx.owners, req.sessionId, tenant !== undefined && tenant !== ctx.config.FREEKV_MOVE_ADMIN_TENANT ? tenant : undefined);
      const authorization = call.metadata.get("authorization")[0];
      const r = await mover.move(s, req.target, {
        chunkBytes: req.chunkBytes,
        deadline: deadlineOf(call, ctx.config.FREEKV_MOVE_TIMEOUT_MS),
        signal,
        authorization: typeof authorization === "string" ? authorization : undefined,
      });
      return r;
    }),
    getArrival: unary(log, "GetArrival", async (req: GetArrivalRequest, _signal: AbortSignal, call: ServerUnaryCall<GetArrivalRequest, GetArrivalResponse>): Promise<GetArrivalResponse> => {
      const tenant = ctx.auth ? ctx.auth.authenticate(call.metadata) : undefined;
      checkSessionId(req.sessionId);
      // Without the move's id the answer could only be about the id, which another session may hold.
      if (!req.moveId) throw invalidArgument("move_id", "is required (the move_id of the move's header)");
      if (Buffer.byteLength(req.moveId) > MAX_MOVE_ID_BYTES) throw invalidArgument("move_id", `must be at most ${MAX_MOVE_ID_BYTES} bytes`);
      const state = ctx.sessions.arrivalState(req.sessionId, req.moveId, tenant !== undefined && tenant !== ctx.config.FREEKV_MOVE_ADMIN_TENANT ? tenant : undefined);
      const states = { held: ArrivalState.ARRIVAL_STATE_HELD, receiving: ArrivalState.ARRIVAL_STATE_RECEIVING, absent: ArrivalState.ARRIVAL_STATE_ABSENT } as const;
      return { state: states[state] };
    }),
    receiveSession(call: ServerReadableStream<ReceiveSessionRequest, ReceiveSessionResponse>, callback: sendUnaryData<ReceiveSessionResponse>) {
      const scope = callScope(call);
      Promise.resolve()
        .then(() => mover.receive(call, scope.signal))
        .then(
          (res) => callback(null, res),
          (e: unknown) => callback(toStatus(e, log, "ReceiveSession", scope.signal)),
        )
        .finally(() => scope.done());
    },
  };
}
