/**
 * Validation of one Attention stream message against the sessions it names: known session
 * (NOT_FOUND), layer in range, shapes [n, kv_heads, head_dim] / [query_heads, head_dim], dtype,
 * byte length, finite values; each error names the field. A tensor comes either as bytes or as a
 * TensorRef into the stream's tensor exchange (exchange.ts), never both, never neither.
 */
import type { DType } from "../../../proto/gen/freekv/v1/common.js";
import { SessionKind } from "../../../proto/gen/freekv/v1/compute.js";
import type { Tensor } from "../../../proto/gen/freekv/v1/common.js";
import type { AttentionDecode, AttentionPrefill, AttentionRequest, TensorRef } from "../../../proto/gen/freekv/v1/compute.js";
import { failedPrecondition, invalidArgument, notFound, quoteId, resourceExhausted } from "../../common/errors.js";
import type { SessionManager } from "../sessions/manager.js";
import type { ComputeSession } from "../sessions/session.js";
import { pickOne, type TensorExchange } from "./exchange.js";
import { readTensor } from "./tensor.js";

export interface PrefillOp {
  op: "prefill";
  session: ComputeSession;
  layer: number;
  k: Float32Array;
  v: Float32Array;
  n: number;
}

export interface DecodeItemOp {
  session: ComputeSession;
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
  /** dtype of q, used for the output. */
  dtype: DType;
  /** Where the output goes in the exchange (q came as q_ref); undefined: sent back as bytes. */
  outputOffset?: number;
}

export interface DecodeOp {
  op: "decode";
  layer: number;
  items: DecodeItemOp[];
}

function session(sessions: SessionManager, id: string, field: string): ComputeSession {
  if (!id) throw invalidArgument(field, "is required");
  if (!sessions.has(id)) throw notFound(`${field}: session ${quoteId(id)} not found`);
  const s = sessions.get(id);
  // A model session's context belongs to its Generate turns (and its lock to a whole generation).
  if (s.kind !== SessionKind.SESSION_KIND_ATTENTION) throw failedPrecondition(`${field}: session ${quoteId(id)} is a model session; the Attention stream takes attention sessions`);
  return s;
}

/** The tokens a prefill adds, from its tensor's shape, checked against the layer's room before any tensor is read. */
export function checkPrefillRoom(s: ComputeSession, l: number, n: number): void {
  if (s.layerTokens[l] + n > s.maxContextTokens) {
    throw resourceExhausted(`prefill.k: ${n} more tokens would take layer ${l} of session ${s.id} past its max_context_tokens ${s.maxContextTokens} (now ${s.layerTokens[l]})`);
  }
}

function layer(s: ComputeSession, l: number, field: string): number {
  if (l >= s.geometry.layers) throw invalidArgument(field, `layer ${l} is out of range [0, ${s.geometry.layers - 1}] of session ${s.id}`);
  return l;
}

/** The bytes tensor or the ref (exactly one), read as float32 of `shape`. */
function input(t: Tensor | undefined, ref: TensorRef | undefined, field: string, shape: number[], exchange: TensorExchange | undefined) {
  if (pickOne(t, ref, field) === "bytes") return { ...readTensor(t, field, shape), dtype: t!.dtype };
  if (!exchange) throw failedPrecondition(`${field}_ref: no tensor exchange is open on this stream (send open_exchange first)`);
  return exchange.read(ref!, `${field}_ref`, shape);
}

export function validatePrefill(p: AttentionPrefill, sessions: SessionManager, exchange?: TensorExchange): PrefillOp {
  const s = session(sessions, p.sessionId, "prefill.session_id");
  const l = layer(s, p.layer, "prefill.layer");
  const g = s.geometry;
  // The claimed token count first, inline or by reference: one past the session's room is refused
  // before anything is read or converted.
  const claimed = (p.k ?? p.kRef)?.shape?.[0];
  if (Number.isInteger(claimed) && claimed! > 0) checkPrefillRoom(s, l, claimed!);
  const k = input(p.k, p.kRef, "prefill.k", [-1, g.kvHeads, g.headDim], exchange);
  const v = input(p.v, p.vRef, "prefill.v", [k.shape[0], g.kvHeads, g.headDim], exchange);
  const n = k.shape[0];
  checkPrefillRoom(s, l, n);
  return { op: "prefill", session: s, layer: l, k: k.data, v: v.data, n };
}

export function validateDecode(d: AttentionDecode, sessions: SessionManager, exchange?: TensorExchange): DecodeOp {
  if (d.items.length === 0) throw invalidArgument("decode.items", "is empty");
  const seen = new Set<string>();
  // The result carries either outputs or output_offsets, so all items answer the same way.
  const viaExchange = d.items[0].qRef !== undefined && d.items[0].q === undefined;
  const items = d.items.map((it, i) => {
    const f = `decode.items[${i}]`;
    const s = session(sessions, it.sessionId, `${f}.session_id`);
    if (seen.has(s.id)) throw invalidArgument(`${f}.session_id`, `session ${s.id} appears twice in one decode step`);
    seen.add(s.id);
    layer(s, d.layer, "decode.layer");
    const g = s.geometry;
    const q = input(it.q, it.qRef, `${f}.q`, [g.queryHeads, g.headDim], exchange);
    if ((it.q === undefined) !== viaExchange) {
      throw invalidArgument(`${f}.q_ref`, `items of one decode send q alike (items[0] uses ${viaExchange ? "q_ref" : "q"})`);
    }
    const k = input(it.k, it.kRef, `${f}.k`, [g.kvHeads, g.headDim], exchange);
    const v = input(it.v, it.vRef, `${f}.v`, [g.kvHeads, g.headDim], exchange);
    let outputOffset: number | undefined;
    if (viaExchange) {
      if (it.outputOffset === undefined) throw invalidArgument(`${f}.output_offset`, "is required with q_ref (where the output goes)");
      outputOffset = it.outputOffset;
      exchange!.checkOutput(outputOffset, g.queryHeads * g.headDim, q.dtype, `${f}.output_offset`);
    }
    return { session: s, q: q.data, k: k.data, v: v.data, dtype: q.dtype, outputOffset };
  });
  return { op: "decode", layer: d.layer, items };
}

export function validateRequest(req: AttentionRequest, sessions: SessionManager, exchange?: TensorExchange): PrefillOp | DecodeOp {
  const op = req.op;
  if (!op || op.$case === "openExchange") throw invalidArgument("op", "one of prefill or decode is required");
  return op.$case === "prefill" ? validatePrefill(op.value, sessions, exchange) : validateDecode(op.value, sessions, exchange);
}
