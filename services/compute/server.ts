/**
 * The compute tier's gRPC server: ComputeService (sessions, Generate, Attention),
 * grpc.health.v1 and reflection. Generate is served by services/compute/generate/handler.ts
 * when that module is present; without it Generate answers UNIMPLEMENTED.
 */
import { Server, status, type ServerWritableStream, type handleServerStreamingCall } from "@grpc/grpc-js";
import { ComputeServiceService, type GenerateRequest, type GenerateResponse } from "../../proto/gen/freekv/v1/compute.js";
import { Health } from "../common/health.js";
import { addReflection } from "../common/reflection.js";
import { DecodeBatcher } from "./attention/batcher.js";
import { attentionHandler } from "./attention/stream.js";
import type { ComputeContext } from "./context.js";
import { sessionHandlers } from "./sessions/handlers.js";

export const COMPUTE_SERVICE = "freekv.v1.ComputeService";

type GenerateFactory = (ctx: ComputeContext) => handleServerStreamingCall<GenerateRequest, GenerateResponse>;

/** The Generate handler from generate/handler.ts, or one that answers why it is unavailable. */
async function loadGenerate(ctx: ComputeContext): Promise<handleServerStreamingCall<GenerateRequest, GenerateResponse>> {
  const answer =
    (code: status, details: string) =>
    (call: ServerWritableStream<GenerateRequest, GenerateResponse>) => {
      call.emit("error", { code, details });
    };
  const spec = import.meta.url.endsWith(".ts") ? "./generate/handler.ts" : "./generate/handler.js";
  let mod: { generateHandler?: GenerateFactory };
  try {
    mod = (await import(spec)) as { generateHandler?: GenerateFactory };
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (err.code === "ERR_MODULE_NOT_FOUND" && String(err.message).includes("generate/handler")) {
      return answer(status.UNIMPLEMENTED, "Generate is not available in this build");
    }
    ctx.log.error({ err }, "cannot load the Generate handler");
    return answer(status.INTERNAL, `Generate handler failed to load: ${err.message}`);
  }
  if (typeof mod.generateHandler !== "function") return answer(status.UNIMPLEMENTED, "Generate is not available in this build");
  return mod.generateHandler(ctx);
}

export interface ComputeServer {
  server: Server;
  health: Health;
  batcher: DecodeBatcher;
}

export async function createComputeServer(ctx: ComputeContext): Promise<ComputeServer> {
  const server = new Server({ "grpc.max_receive_message_length": 256 << 20, "grpc.max_send_message_length": 256 << 20 });
  const { metrics, sessions, log } = ctx;
  const batcher = new DecodeBatcher(() => sessions.requireEngine(), ctx.config.FREEKV_DECODE_BATCH_WINDOW_US, {
    batch(_layer, size, seconds) {
      metrics.decodeBatchSize.observe(size);
      metrics.decodeStepSeconds.observe(seconds);
    },
    appended: (s, layer) => sessions.commitProgress(s, layer),
  });
  server.addService(ComputeServiceService, {
    ...sessionHandlers(sessions, log),
    generate: await loadGenerate(ctx),
    attention: attentionHandler({
      sessions,
      batcher,
      log,
      observer: {
        request(op, seconds) {
          metrics.attentionRequests.inc({ op });
          metrics.attentionSeconds.observe({ op }, seconds);
        },
        prefilled: (s, layer) => sessions.commitProgress(s, layer),
      },
    }),
  });
  const health = new Health([COMPUTE_SERVICE]);
  health.addToServer(server);
  addReflection(server, ["freekv/v1/compute.proto"]);
  return { server, health, batcher };
}
