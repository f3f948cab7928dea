/**
 * Validation of one Attention stream message against the sessions it names: known session
 * (NOT_FOUND), layer in range, shapes [n, kv_heads, head_dim] / [query_heads, head_dim], dtype,
 * byte length, finite values; each error names the field.
 */
import type { DType } from "../../../proto/gen/freekv/v1/common.js";
import type { AttentionDecode, AttentionPrefill, AttentionRequest } from "../../../proto/gen/freekv/v1/compute.js";
import { invalidArgument, notFound, resourceExhausted } from "../../common/errors.js";
import type { SessionManager } from "../sessions/manager.js";
import type { ComputeSession } from "../sessions/session.js";
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
}

export interface DecodeOp {
  op: "decode";
  layer: number;
  items: DecodeItemOp[];
}

function session(sessions: SessionManager, id: string, field: string): ComputeSession {
  if (!id) throw invalidArgument(field, "is required");
  if (!sessions.has(id)) throw notFound(`${field}: session ${JSON.stringify(id)} not found`);
  return sessions.get(id);
}

function layer(s: ComputeSession, l: number, field: string): number {
  if (l >= s.geometry.layers) throw invalidArgument(field, `layer ${l} is out of range [0, ${s.geometry.layers - 1}] of session ${s.id}`);
  return l;
}

export function validatePrefill(p: AttentionPrefill, sessions: SessionManager): PrefillOp {
  const s = session(sessions, p.sessionId, "prefill.session_id");
  const l = layer(s, p.layer, "prefill.layer");
  const g = s.geometry;
  const k = readTensor(p.k, "prefill.k", [-1, g.kvHeads, g.headDim]);
  const v = readTensor(p.v, "prefill.v", [k.shape[0], g.kvHeads, g.headDim]);
  const n = k.shape[0];
  if (s.layerTokens[l] + n > s.maxContextTokens) {
    throw resourceExhausted(`prefill.k: ${n} more tokens would take layer ${l} of session ${s.id} past its max_context_tokens ${s.maxContextTokens} (now ${s.layerTokens[l]})`);
  }
  return { op: "prefill", session: s, layer: l, k: k.data, v: v.data, n };
}

export function validateDecode(d: AttentionDecode, sessions: SessionManager): DecodeOp {
  if (d.items.length === 0) throw invalidArgument("decode.items", "is empty");
  const seen = new Set<string>();
  const items = d.items.map((it, i) => {
    const f = `decode.items[${i}]`;
    const s = session(sessions, it.sessionId, `${f}.session_id`);
    if (seen.has(s.id)) throw invalidArgument(`${f}.session_id`, `session ${s.id} appears twice in one decode step`);
    seen.add(s.id);
    layer(s, d.layer, "decode.layer");
    const g = s.geometry;
    const q = readTensor(it.q, `${f}.q`, [g.queryHeads, g.headDim]);
    const k = readTensor(it.k, `${f}.k`, [g.kvHeads, g.headDim]);
    const v = readTensor(it.v, `${f}.v`, [g.kvHeads, g.headDim]);
    return { session: s, q: q.data, k: k.data, v: v.data, dtype: it.q!.dtype };
  });
  return { op: "decode", layer: d.layer, items };
}

export function validateRequest(req: AttentionRequest, sessions: SessionManager): PrefillOp | DecodeOp {
  const op = req.op;
  if (!op) throw invalidArgument("op", "one of prefill or decode is required");
  return op.$case === "prefill" ? validatePrefill(op.value, sessions) : validateDecode(op.value, sessions);
}
