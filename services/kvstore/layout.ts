/**
 * Byte layout of a session's four segments. Mirrors native ComputeLayout
 * (native/src/engine/Layout.cpp); a test checks both agree on many shapes.
 *
 *   store     [layers][capacity_pages] HND pages, page = [kv_heads][2 (K,V)][page_size][head_dim]
 *   staging   two recall buffers, each big enough for one layer's selected head-pages
 *   tail      [layers] NHD partial page [page_size][2][kv_heads][head_dim], written through
 *   manifest  header {magic u32, layers u32, context_tokens u64}, then per layer
 *             {committed full pages u32, tail tokens u32}; then, at manifestQueryOffset, two
 *             query records per layer {tokens u64, flags u32, seq u32, q f32[q_heads*head_dim]}
 *             that the engine writes alternately (what a re-attaching compute continues from)
 *
 * The kvstore sizes segments with the native ComputeLayout when the addon has the engine (the
 * engine is the authority on its own layout) and with this mirror otherwise.
 */
import type { ModelGeometry, RetrievalConfig } from "../../proto/gen/freekv/v1/common.js";
import type { SegmentLayout } from "../../proto/gen/freekv/v1/kvstore.js";
import { loadAddon } from "../../native/binding.js";
import { dtypeBytes, toNativeGeometry } from "../common/geometry.js";
import { toNativeRetrieval } from "../common/retrieval.js";

export const MANIFEST_MAGIC = 0x31564b46; // "FKV1"
export const MANIFEST_HEADER_BYTES = 16;
export const MANIFEST_LAYER_BYTES = 8;
export const MANIFEST_QUERY_RECORD_HEADER_BYTES = 16;

export interface Layout {
  headPageBytes: number;
  pageBytes: number;
  layerStride: number;
  storeBytes: number;
  stagingBufferBytes: number;
  tailLayerBytes: number;
  tailBytes: number;
  manifestBytes: number;
  manifestQueryOffset: number;
  manifestQueryRecordBytes: number;
}

const roundUp = (n: number, a: number) => Math.ceil(n / a) * a;

/** Pages needed to hold `maxContextTokens` tokens. */
export function capacityPages(maxContextTokens: number, pageSize: number): number {
  return Math.max(1, Math.ceil(maxContextTokens / pageSize));
}

/** The TypeScript mirror of native ComputeLayout. */
export function mirrorLayout(g: ModelGeometry, r: RetrievalConfig, capacity: number): Layout {
  const e = dtypeBytes(g.kvDtype);
  const headPageBytes = 2 * r.pageSize * g.headDim * e;
  const pageBytes = headPageBytes * g.kvHeads;
  const layerStride = pageBytes * capacity;
  const storeBytes = roundUp(Math.max(1, layerStride * g.layers), 4096);
  const selPages = Math.max(1, Math.floor(r.selectTokens / r.pageSize));
  const stagingBufferBytes = roundUp(selPages * headPageBytes * g.kvHeads, 4096);
  const tailLayerBytes = pageBytes;
  const tailBytes = roundUp(tailLayerBytes * g.layers, 4096);
  const manifestQueryOffset = roundUp(MANIFEST_HEADER_BYTES + MANIFEST_LAYER_BYTES * g.layers, 64);
  const manifestQueryRecordBytes = roundUp(MANIFEST_QUERY_RECORD_HEADER_BYTES + 4 * g.queryHeads * g.headDim, 64);
  const manifestBytes = roundUp(manifestQueryOffset + 2 * g.layers * manifestQueryRecordBytes, 4096);
  return { headPageBytes, pageBytes, layerStride, storeBytes, stagingBufferBytes, tailLayerBytes, tailBytes, manifestBytes, manifestQueryOffset, manifestQueryRecordBytes };
}

/** The native layout when the addon has the engine; the mirror otherwise. */
export function computeLayout(g: ModelGeometry, r: RetrievalConfig, capacity: number): Layout {
  const engine = loadAddon().Engine;
  if (typeof engine === "function" && typeof engine.layout === "function") {
    return engine.layout(toNativeGeometry(g), toNativeRetrieval(r), capacity) as Layout;
  }
  return mirrorLayout(g, r, capacity);
}

/** Total bytes of the four segments (staging holds two buffers). */
export function totalBytes(l: Layout): number {
  return l.storeBytes + 2 * l.stagingBufferBytes + l.tailBytes + l.manifestBytes;
}

export function toSegmentLayout(l: Layout, pageSize: number, capacity: number): SegmentLayout {
  return {
    pageSize,
    capacityPages: capacity,
    pageBytes: l.pageBytes,
    headPageBytes: l.headPageBytes,
    layerStrideBytes: l.layerStride,
    stagingBufferBytes: l.stagingBufferBytes,
    tailLayerBytes: l.tailLayerBytes,
  };
}
