/**
 * The host memory a model session takes at the kvstore: the bytes of its four segments, from the
 * same native layout the kvstore sizes them with (services/kvstore/layout.ts), for the geometry,
 * retrieval and max context the SessionManager would create it with. Admission compares it with
 * the kvstore's capacity to tell a request that must wait from one that can never fit.
 */
import type { DType, ModelGeometry, RetrievalConfig } from "../../../proto/gen/freekv/v1/common.js";
import { resolveGeometry } from "../../common/geometry.js";
import { resolveRetrieval } from "../../common/retrieval.js";
import { capacityPages, computeLayout, totalBytes } from "../../kvstore/layout.js";

export function modelSessionBytes(model: ModelGeometry, kvDtype: DType, retrieval: RetrievalConfig | undefined, maxContextTokens: number): number {
  const geometry = resolveGeometry({ ...model, kvDtype }, "model");
  // Capped at the session's capacity as the kvstore caps it, so both size the same session.
  const r = resolveRetrieval(retrieval, geometry.layers, "retrieval", maxContextTokens);
  return totalBytes(computeLayout(geometry, r, capacityPages(maxContextTokens, r.pageSize)));
}
