/**
 * The compute tier's gRPC server: ComputeService (sessions, Generate, Attention),
 * grpc.health.v1 and reflection. Health is SERVING while the kvstore serves (every new session
 * needs it) and the served model is ready (or none is served); NOT_SERVING otherwise, from the
 * start until both hold.
 */
import { authenticated } from "./auth.js";
import { credentials, Server, type ChannelCredentials, type handleServerStreamingCall } from "@grpc/grpc-js";
import { ComputeServiceService, SessionMoveServiceService, type GenerateRequest, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { Health } from "../common/health.js";
import { rejectMalformed } from "../common/malformed.js";
import { addReflection } from "../common/reflection.js";
import { AttentionBatcher } from "./attention/batcher.js";
import { attentionHandler } from "./attention/stream.js";
import type { ComputeContext } from "./context.js";
import { generateHandler } from "./generate/handler.js";
import { sessionHandlers } from "./sessions/handlers.js";
import { sessionMoveService, SessionMover } from "./sessions/move.js";

export const COMPUTE_SERVICE = "freekv.v1.ComputeService";

export interface ComputeServer {
  server: Server;
  health: Health;
  /** The Generate handler the server serves (the OpenAI front calls it in process). */
  generate: handleServerStreamingCall<GenerateRequest, GenerateResponse>;
  /** Records whether the kvstore serves (its health, followed by main). */
  upstream(serving: boolean): void;
  /** Moves sessions to other pods (SessionMoveService, the drain's hand-off). */
  mover: SessionMover;
}

/** `peer`: how this compute reaches other computes when it moves a session (FREEKV_PEER_TLS_*), and the token it presents without a caller's (FREEKV_PEER_TOKEN_FILE). */
export function createComputeServer(ctx: ComputeContext, peer: { credentials?: ChannelCredentials; token?: string } = {}): ComputeServer {
  const server = new Server({ "grpc.max_receive_message_length": 256 << 20, "grpc.max_send_message_length": 256 << 20 });
  const { metrics, sessions, log } = ctx;
  const batcher = new AttentionBatcher(sessions.engine, ctx.config.FREEKV_DECODE_BATCH_WINDOW_US, {
    batch(_layer, size, seconds) {
      metrics.decodeBatchSize.observe(size);
      metrics.decodeLayerSeconds.observe(seconds);
    },
    appended: (s, layer) => sessions.commitProgress(s, layer),
    diverged(s, layer, _error, cause) {
      metrics.sessionsDiverged.inc();
      log.warn(
        { session: s.id, layer, contextTokens: s.contextTokens, err: cause instanceof Error ? cause.message : String(cause) },
        "session diverged: a decode failed in the engine after it may have appended the token; its calls get DATA_LOSS until it is closed",
      );
      // Saved with the session at the kvstore before the failed call is answered, so that a
      // compute that re-attaches it marks it again.
      return sessions.saveDataLoss(s);
    },
  });
  // With FREEKV_AUTH_TOKENS_FILE every handler checks the caller's token first (auth.ts); the
  // OpenAI front calls this same `generate`.
  const handlers = authenticated(
    ctx.auth,
    log,
    {
      ...sessionHandlers(sessions, log, () => ctx.owners, () => ctx.auth),
      generate: generateHandler(ctx),
      attention: attentionHandler({
        auth: () => ctx.auth,
        writeStallMs: ctx.config.FREEKV_WRITE_STALL_MS,
        sessions,
        batcher,
        log,
        exchanges: ctx.exchanges,
        observer: {
          request(op, seconds) {
            metrics.attentionRequests.inc({ op });
            metrics.attentionSeconds.observe({ op }, seconds);
          },
          prefilled: (s, layer) => sessions.commitProgress(s, layer),
        },
      }),
    },
    { createSession: "unary", getSession: "unary", closeSession: "unary", generate: "stream", attention: "stream" },
  );
  const generate = handlers.generate;
  // A unary or server-streaming request holds at most a prompt of the largest context a session may
  // have (FREEKV_MAX_CONTEXT_LIMIT tokens): 8 bytes a token covers token ids (at most 5 bytes packed)
  // and text; larger requests are refused before they are decoded (malformed.ts).
  const maxRequestBytes = Math.min(256 << 20, ctx.config.FREEKV_MAX_CONTEXT_LIMIT * 8 + (1 << 20));
  const service = rejectMalformed(ComputeServiceService, handlers, { maxRequestBytes });
  server.addService(service.definition, service.implementation);
  // Moves between pods: an admin service beside ComputeService; its handlers authenticate themselves.
  const mover = new SessionMover(ctx, peer.credentials ?? credentials.createInsecure(), peer.token);
  const move = rejectMalformed(SessionMoveServiceService, sessionMoveService(ctx, mover), { maxRequestBytes });
  server.addService(move.definition, move.implementation);
  const health = new Health([COMPUTE_SERVICE]);
  health.addToServer(server);
  addReflection(server, ["freekv/v1/compute.proto"], [COMPUTE_SERVICE, "freekv.v1.SessionMoveService"]);
  let kvstore = false;
  const update = () => health.set(kvstore && ctx.served.servable ? "SERVING" : "NOT_SERVING");
  ctx.served.onChange(update);
  return {
    server,
    health,
    generate,
    mover,
    upstream(serving) {
      kvstore = serving;
      update();
    },
  };
}
