/**
 * The host memory a model session takes at the kvstore: the bytes of its three small segments and
 * of its store as far as a reservation, from the same native layout and the same rounding the
 * kvstore uses (services/kvstore/layout.ts), for the geometry, retrieval and max context the
 * SessionManager would create it with. Admission compares it with the kvstore's capacity to tell a
 * request that must wait from one that can never fit. (The kvstore rounds a reservation up to its
 * extent only when that fits, so the exact figure is the one that decides.)
 */
import type { DType, ModelGeometry, RetrievalConfig } from "../../../proto/gen/freekv/v1/common.js";
import { resolveGeometry } from "../../common/geometry.js";
import { resolveRetrieval } from "../../common/retrieval.js";
import { capacityPages, computeLayout, reservedBytes, reservedPagesOf } from "../../kvstore/layout.js";

export function modelSessionBytes(
  model: ModelGeometry,
  kvDtype: DType,
  retrieval: RetrievalConfig | undefined,
  maxContextTokens: number,
  reserveTokens = maxContextTokens,
): number {
  const geometry = resolveGeometry({ ...model, kvDtype }, "model");
  // Capped at the session's capacity as the kvstore caps it, so both size the same session.
  const r = resolveRetrieval(retrieval, geometry.layers, "retrieval", maxContextTokens);
  const capacity = capacityPages(maxContextTokens, r.pageSize);
  return reservedBytes(computeLayout(geometry, r, capacity), geometry.layers, reservedPagesOf(Math.min(reserveTokens, maxContextTokens), r.pageSize, capacity));
}
