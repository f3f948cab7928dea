/** CreateSession / GetSession / CloseSession over gRPC. */
import type { ServerUnaryCall, handleUnaryCall } from "@grpc/grpc-js";
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
import { localSession, type SessionOwners } from "./owners.js";
import { tenantOf } from "./tenant.js";

export interface SessionHandlers {
  createSession: handleUnaryCall<CreateSessionRequest, CreateSessionResponse>;
  getSession: handleUnaryCall<GetSessionRequest, GetSessionResponse>;
  closeSession: handleUnaryCall<CloseSessionRequest, CloseSessionResponse>;
}

export function sessionHandlers(sessions: SessionManager, log: Logger, owners?: () => SessionOwners | undefined): SessionHandlers {
  const needId = (id: string) => {
    if (!id) throw invalidArgument("session_id", "is required");
  };
  return {
    createSession: unary(log, "CreateSession", async (req: CreateSessionRequest, signal: AbortSignal, call: ServerUnaryCall<CreateSessionRequest, CreateSessionResponse>) => {
      const s = await sessions.create(req, signal, tenantOf(call.metadata));
      await owners?.()?.claim(s.id);
      return { session: sessions.toProto(s) };
    }),
    getSession: unary(log, "GetSession", async (req: GetSessionRequest) => {
      needId(req.sessionId);
      return { session: sessions.toProto(await localSession(sessions, owners?.(), req.sessionId)) };
    }),
    closeSession: unary(log, "CloseSession", async (req: CloseSessionRequest, signal: AbortSignal) => {
      needId(req.sessionId);
      await localSession(sessions, owners?.(), req.sessionId);
      const closed = await sessions.close(req.sessionId, signal);
      await owners?.()?.release(req.sessionId);
      return { closed };
    }),
  };
}
