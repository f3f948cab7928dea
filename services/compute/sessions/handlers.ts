/** CreateSession / GetSession / CloseSession over gRPC. */
import type { Metadata, ServerUnaryCall, handleUnaryCall } from "@grpc/grpc-js";
import { authenticatedTenant, type TenantAuth } from "../auth.js";
import type {
  CloseSessionRequest,
  CloseSessionResponse,
  CreateSessionRequest,
  CreateSessionResponse,
  GetSessionRequest,
  GetSessionResponse,
} from "../../../proto/gen/freekv/v1/compute.js";
import { invalidArgument } from "../../common/errors.js";
import { unary } from "../../common/handlers.js";
import type { Logger } from "../../common/log.js";
import type { SessionManager } from "./manager.js";
import { heldElsewhere, localSession, type SessionOwners } from "./owners.js";
import { tenantOf } from "./tenant.js";
import { SESSION_ID_RE, checkSessionId } from "../../common/session-id.js";

export interface SessionHandlers {
  createSession: handleUnaryCall<CreateSessionRequest, CreateSessionResponse>;
  getSession: handleUnaryCall<GetSessionRequest, GetSessionResponse>;
  closeSession: handleUnaryCall<CloseSessionRequest, CloseSessionResponse>;
}

export function sessionHandlers(sessions: SessionManager, log: Logger, owners?: () => SessionOwners | undefined, auth?: () => TenantAuth | undefined): SessionHandlers {
  /** The authenticated tenant of a call (auth.ts wrote it into the metadata), when authentication is on. */
  const authTenant = (md: Metadata): string | undefined => authenticatedTenant(auth?.(), md);
  const needId = (id: string) => {
    if (!id) throw invalidArgument("session_id", "is required");
    // Checked before any lookup (a directory's, with the id), as CreateSession does.
    checkSessionId(id);
  };
  return {
    createSession: unary(log, "CreateSession", async (req: CreateSessionRequest, signal: AbortSignal, call: ServerUnaryCall<CreateSessionRequest, CreateSessionResponse>) => {
      const directory = owners?.();
      // A name another live pod holds is that pod's session: the call is redirected there (the
      // trailer x-freekv-session-owner), never answered with a second, empty session of that id.
      if (directory && req.sessionId && SESSION_ID_RE.test(req.sessionId)) {
        const other = await directory.liveOwnerElsewhere(req.sessionId);
        if (other) throw heldElsewhere(req.sessionId, other);
      }
      // The tenant (x-freekv-tenant; with authentication, the token's) is saved with the session.
      const s = await sessions.create(req, signal, tenantOf(call.metadata));
      // Claimed only if no other live pod claimed the id meanwhile (two creates of one name at
      // once): the one that lost gives its copy up and redirects to the other.
      const other = await directory?.claimUnlessLive(s.id);
      if (other) {
        await sessions.close(s.id).catch((e: unknown) => log.warn({ err: e, session: s.id }, "could not close a session another live pod claimed first"));
        throw heldElsewhere(s.id, other);
      }
      if (signal.aborted) {
        // The caller gets CANCELLED or DEADLINE_EXCEEDED and never learns a generated id: the session
        // made after its deadline is closed, not left holding its reservation.
        await sessions.close(s.id).catch((e: unknown) => log.warn({ err: e, session: s.id }, "could not close a session created after its call ended"));
        await owners?.()?.release(s.id);
        throw signal.reason;
      }
      return { session: sessions.toProto(s) };
    }),
    getSession: unary(log, "GetSession", async (req: GetSessionRequest, _signal: AbortSignal, call: ServerUnaryCall<GetSessionRequest, GetSessionResponse>) => {
      needId(req.sessionId);
      return { session: sessions.toProto(await localSession(sessions, owners?.(), req.sessionId, authTenant(call.metadata))) };
    }),
    closeSession: unary(log, "CloseSession", async (req: CloseSessionRequest, signal: AbortSignal, call: ServerUnaryCall<CloseSessionRequest, CloseSessionResponse>) => {
      needId(req.sessionId);
      await localSession(sessions, owners?.(), req.sessionId, authTenant(call.metadata));
      try {
        return { closed: await sessions.close(req.sessionId, signal) };
      } finally {
        // Gone from this pod once close() removed it, even when the kvstore's release failed
        // (retried in the background): the owner record must not keep pointing here.
        if (!sessions.has(req.sessionId)) await owners?.()?.release(req.sessionId);
      }
    }),
  };
}
