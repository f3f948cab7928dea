/**
 * Byte layout of a session's four segments. Mirrors native ComputeLayout
 * (native/src/engine/Layout.cpp); a test checks both agree on many shapes.
 *
 *   store     [layers][capacity_pages] HND pages, page = [kv_heads][2 (K,V)][page_size][head_dim]
 *   staging   two recall buffers, each big enough for one layer's selected head-pages
 *   tail      [layers] NHD partial page [page_size][2][kv_heads][head_dim], written through
 *   manifest  header {magic u32, layers u32, context_tokens u64}, then per layer
 *             {committed full pages u32, tail tokens u32}
 */
import type { ModelGeometry, RetrievalConfig } from "../../proto/gen/freekv/v1/common.js";
import type { SegmentLayout } from "../../proto/gen/freekv/v1/kvstore.js";
import { dtypeBytes } from "../common/geometry.js";

export const MANIFEST_MAGIC = 0x31564b46; // "FKV1"
export const MANIFEST_HEADER_BYTES = 16;
export const MANIFEST_LAYER_BYTES = 8;

export interface Layout {
  headPageBytes: number;
  pageBytes: number;
  layerStride: number;
  storeBytes: number;
  stagingBufferBytes: number;
  tailLayerBytes: number;
  tailBytes: number;
  manifestBytes: number;
}

const roundUp = (n: number, a: number) => Math.ceil(n / a) * a;

/** Pages needed to hold `maxContextTokens` tokens. */
export function capacityPages(maxContextTokens: number, pageSize: number): number {
  return Math.max(1, Math.ceil(maxContextTokens / pageSize));
}

export function computeLayout(g: ModelGeometry, r: RetrievalConfig, capacity: number): Layout {
  const e = dtypeBytes(g.kvDtype);
  const headPageBytes = 2 * r.pageSize * g.headDim * e;
  const pageBytes = headPageBytes * g.kvHeads;
  const layerStride = pageBytes * capacity;
  const storeBytes = roundUp(Math.max(1, layerStride * g.layers), 4096);
  const selPages = Math.max(1, Math.floor(r.selectTokens / r.pageSize));
  const stagingBufferBytes = roundUp(selPages * headPageBytes * g.kvHeads, 4096);
  const tailLayerBytes = pageBytes;
  const tailBytes = roundUp(tailLayerBytes * g.layers, 4096);
  const manifestBytes = roundUp(MANIFEST_HEADER_BYTES + MANIFEST_LAYER_BYTES * g.layers, 4096);
  return { headPageBytes, pageBytes, layerStride, storeBytes, stagingBufferBytes, tailLayerBytes, tailBytes, manifestBytes };
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
