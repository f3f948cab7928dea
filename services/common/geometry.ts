/**
 * Model geometry (layers, query heads, KV heads, head dim, KV dtype): validation with errors
 * naming the field, and conversion to the engine's native form.
 */
import { DType, type ModelGeometry } from "../../proto/gen/freekv/v1/common.js";
import type { Geometry } from "../../native/shm.js";
import { invalidArgument } from "./errors.js";

export const MAX_LAYERS = 1024;
export const MAX_HEADS = 1024;
export const MAX_HEAD_DIM = 1024;

function intIn(field: string, v: number | undefined, lo: number, hi: number): number {
  if (v === undefined || !Number.isInteger(v) || v < lo || v > hi) {
    throw invalidArgument(field, `must be an integer in [${lo}, ${hi}], got ${v ?? "nothing"}`);
  }
  return v;
}

/**
 * Validates a geometry and fills the default KV dtype (the backend's storage type: float32 on
 * the CPU backend, bf16 on CUDA). `prefix` names the message.
 */
export function resolveGeometry(g: ModelGeometry | undefined, prefix = "geometry", defaultKvDtype: DType = DType.D_TYPE_FLOAT32): ModelGeometry {
  if (!g) throw invalidArgument(prefix, "is required");
  const layers = intIn(`${prefix}.layers`, g.layers, 1, MAX_LAYERS);
  const queryHeads = intIn(`${prefix}.query_heads`, g.queryHeads, 1, MAX_HEADS);
  const kvHeads = intIn(`${prefix}.kv_heads`, g.kvHeads, 1, MAX_HEADS);
  const headDim = intIn(`${prefix}.head_dim`, g.headDim, 1, MAX_HEAD_DIM);
  if (queryHeads % kvHeads !== 0) {
    throw invalidArgument(`${prefix}.kv_heads`, `must divide query_heads (${queryHeads}), got ${kvHeads}`);
  }
  let kvDtype = g.kvDtype;
  if (kvDtype === DType.D_TYPE_UNSPECIFIED) kvDtype = defaultKvDtype;
  if (kvDtype !== DType.D_TYPE_FLOAT32 && kvDtype !== DType.D_TYPE_BFLOAT16 && kvDtype !== DType.D_TYPE_FLOAT16) {
    throw invalidArgument(`${prefix}.kv_dtype`, `unknown dtype ${kvDtype}`);
  }
  return { layers, queryHeads, kvHeads, headDim, kvDtype };
}

/** Bytes of one element of a KV dtype. */
export function dtypeBytes(d: DType): number {
  return d === DType.D_TYPE_FLOAT32 ? 4 : 2;
}

export function toNativeGeometry(g: ModelGeometry): Geometry {
  return { layers: g.layers, qHeads: g.queryHeads, kvHeads: g.kvHeads, headDim: g.headDim, kvDtype: g.kvDtype };
}
