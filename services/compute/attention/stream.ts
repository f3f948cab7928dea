/**
 * The bidirectional per-layer Attention stream (freekv.v1.ComputeService/Attention) for
 * disaggregated engines. Messages of one stream are handled in order (a decode of layer l must
 * see the prefill sent before it); decode requests of different streams meet in the
 * AttentionBatcher. Reading pauses while too many messages wait, and writing waits for 'drain', so
 * a slow client slows the stream instead of filling memory. Any bad message ends the stream
 * with its status (INVALID_ARGUMENT naming the field, NOT_FOUND, RESOURCE_EXHAUSTED).
 *
 * An open_exchange message gives the stream a shared-memory tensor exchange (exchange.ts): later
 * messages may then name q/k/v by offset and have outputs written there. It is removed when the
 * stream ends, however it ends (end, error, cancellation, server drain). One exchange per stream; one
 * past the process's total (FREEKV_EXCHANGE_CAPACITY_BYTES) or /dev/shm's free space ends the
 * stream with RESOURCE_EXHAUSTED.
 */
import type { ServerDuplexStream, handleBidiStreamingCall } from "@grpc/grpc-js";
import type { AttentionRequest, AttentionResponse } from "../../../proto/gen/freekv/v1/compute.js";
import { callScope } from "../../common/cancellation.js";
import { send } from "../../common/streams.js";
import { invalidArgument, toStatus } from "../../common/errors.js";
import type { Logger } from "../../common/log.js";
import type { SessionManager } from "../sessions/manager.js";
import type { AttentionBatcher } from "./batcher.js";
import { EXCHANGE_ALIGNMENT, TensorExchange, type ExchangeBudget } from "./exchange.js";
import { writeTensor } from "./tensor.js";
import { checkPrefillRoom, validateRequest } from "./validate.js";
import { assertDecoded } from "../../common/malformed.js";
import { authenticatedTenant, checkTenant, type TenantAuth } from "../auth.js";

// Messages read ahead of the one being handled: the stream pauses at HIGH_WATER of them or
// HIGH_WATER_BYTES of their tensors (a message may hold up to the transport's 256 MiB), and
// resumes below the low marks.
const HIGH_WATER = 32;
const LOW_WATER = 8;
const HIGH_WATER_BYTES = 64 << 20;
const LOW_WATER_BYTES = 16 << 20;

/** The tensor bytes a request carries inline (refs carry none). */
function tensorBytes(m: AttentionRequest): number {
  const op = m.op;
  if (op?.$case === "prefill") return (op.value.k?.data.length ?? 0) + (op.value.v?.data.length ?? 0);
  if (op?.$case === "decode") {
    let n = 0;
    for (const it of op.value.items) n += (it.q?.data.length ?? 0) + (it.k?.data.length ?? 0) + (it.v?.data.length ?? 0);
    return n;
  }
  return 0;
}

export interface AttentionObserver {
  request(op: "prefill" | "decode", seconds: number): void;
  prefilled(session: import("../sessions/session.js").ComputeSession, layer: number): void;
}

export function attentionHandler(deps: {
  sessions: SessionManager;
  batcher: AttentionBatcher;
  log: Logger;
  observer: AttentionObserver;
  /** The process's total for tensor exchanges (FREEKV_EXCHANGE_CAPACITY_BYTES). */
  exchanges: ExchangeBudget;
  /** Per-tenant tokens (FREEKV_AUTH_TOKENS_FILE): a session is then its tenant's only. */
  auth?: () => TenantAuth | undefined;
  /** How long a response waits for a client that stopped reading (FREEKV_WRITE_STALL_MS; 0 or left out: no limit). */
  writeStallMs?: number;
}): handleBidiStreamingCall<AttentionRequest, AttentionResponse> {
  const { sessions, batcher, log, observer, exchanges } = deps;
  return (call: ServerDuplexStream<AttentionRequest, AttentionResponse>) => {
    // With tenant authentication on, the stream's tenant (auth.ts wrote it into the metadata).
    const tenant = authenticatedTenant(deps.auth?.(), call.metadata);
    const scope = callScope(call);
    const queue: AttentionRequest[] = [];
    let queuedBytes = 0;
    let ended = false;
    let paused = false;
    let wake: (() => void) | undefined;
    const notify = () => {
      const w = wake;
      wake = undefined;
      w?.();
    };
    call.on("data", (m: AttentionRequest) => {
      queue.push(m);
      queuedBytes += tensorBytes(m);
      if ((queue.length >= HIGH_WATER || queuedBytes >= HIGH_WATER_BYTES) && !paused) {
        paused = true;
        call.pause();
      }
      notify();
    });
    call.on("end", () => {
      ended = true;
      notify();
    });
    call.on("error", () => {
      ended = true;
      notify();
    });
    scope.signal.addEventListener("abort", notify, { once: true });
    let exchange: TensorExchange | undefined;

    const handle = async (req: AttentionRequest): Promise<AttentionResponse> => {
      assertDecoded(req);
      const t0 = process.hrtime.bigint();
      if (req.op?.$case === "openExchange") {
        if (exchange) throw invalidArgument("open_exchange", `this stream already has the exchange ${exchange.name}`);
        exchange = TensorExchange.open(req.op.value.sizeBytes, "open_exchange.size_bytes", exchanges);
        return { requestId: req.requestId, result: { $case: "exchange", value: { segmentName: exchange.name, sizeBytes: exchange.size, alignment: EXCHANGE_ALIGNMENT } } };
      }
      const op = validateRequest(req, sessions, exchange);
      // A session is its creator tenant's only.
      for (const s of op.op === "prefill" ? [op.session] : op.items.map((it) => it.session)) checkTenant(s.metadata.tenant, tenant, s.id);
      // A session whose pages the kvstore did not take fails the call (UNAVAILABLE while the
      // kvstore is unreachable) until a retry commits them.
      if (op.op === "prefill") sessions.checkCommits(op.session);
      else for (const it of op.items) sessions.checkCommits(it.session);
      const engine = sessions.engine;
      if (op.op === "prefill") {
        const s = op.session;
        await s.lock.run(async () => {
          // Under the lock: a call that ended while it waited appends nothing, and the room is
          // checked again (another stream's prefill of the session may have taken it meanwhile).
          if (scope.signal.aborted) throw scope.signal.reason;
          if (s.closed) throw sessions.goneError(s.id);
          // Lost, or diverged: a failed decode may have appended a token the layer counts here do not know of.
          sessions.checkLost(s);
          checkPrefillRoom(s, op.layer, op.n);
          await engine.prefill(s.engineSession, op.layer, op.k, op.v, op.n);
          s.layerTokens[op.layer] += op.n;
          observer.prefilled(s, op.layer);
        }, scope.signal);
        observer.request("prefill", Number(process.hrtime.bigint() - t0) / 1e9);
        return { requestId: req.requestId, result: { $case: "prefill", value: { contextTokens: s.layerTokens[op.layer] } } };
      }
      const outs = await batcher.submit(op.layer, op.items, scope.signal);
      observer.request("decode", Number(process.hrtime.bigint() - t0) / 1e9);
      if (op.items[0].outputOffset !== undefined) {
        // The exchange is closed only after the pump (which awaits this) is over.
        op.items.forEach((it, i) => exchange!.write(it.outputOffset!, outs[i], it.dtype));
        return { requestId: req.requestId, result: { $case: "decode", value: { outputs: [], outputOffsets: op.items.map((it) => it.outputOffset!) } } };
      }
      return {
        requestId: req.requestId,
        result: {
          $case: "decode",
          value: { outputs: outs.map((o, i) => writeTensor(o, [op.items[i].session.geometry.queryHeads, op.items[i].session.geometry.headDim], op.items[i].dtype)), outputOffsets: [] },
        },
      };
    };

    // An aborted call ends with its reason as the status (a drain's UNAVAILABLE, a deadline),
    // written by the catch below; a client that cancelled gets nothing more.
    const pump = async () => {
      for (;;) {
        if (scope.signal.aborted) throw scope.signal.reason;
        const m = queue.shift();
        if (m === undefined) {
          if (ended) break;
          await new Promise<void>((r) => (wake = r));
          continue;
        }
        queuedBytes -= tensorBytes(m);
        if (paused && queue.length <= LOW_WATER && queuedBytes <= LOW_WATER_BYTES) {
          paused = false;
          call.resume();
        }
        const res = await handle(m);
        if (scope.signal.aborted) throw scope.signal.reason;
        await send(call, res, scope.signal, deps.writeStallMs);
      }
      call.end();
    };

    pump()
      .catch((e: unknown) => {
        if (call.cancelled) return;
        const st = toStatus(e, log, "Attention", scope.signal);
        call.emit("error", { code: st.code, details: st.details, metadata: st.metadata });
      })
      .finally(() => {
        try {
          exchange?.close();
        } catch (e) {
          log.error({ err: e, segment: exchange?.name }, "cannot remove the tensor exchange");
        }
        scope.done();
      });
  };
}
