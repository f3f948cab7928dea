/**
 * Byte layout of a session's four segments: the native one definition (native/src/engine/Layout.h
 * and Manifest.h, through native/shm.ts), and its wire form, freekv.v1.SegmentLayout.
 *
 *   store     [layers][capacity_pages] HND pages, page = [kv_heads][2 (K,V)][page_size][head_dim]
 *   staging   two recall buffers, each big enough for one layer's selected head-pages
 *   tail      [layers] NHD partial page [page_size][2][kv_heads][head_dim], written through
 *   manifest  header, per-layer committed pages and tail tokens, and query records
 */
import type { ModelGeometry, RetrievalConfig } from "../../proto/gen/freekv/v1/common.js";
import type { SegmentLayout } from "../../proto/gen/freekv/v1/kvstore.js";
import { loadShm, type NativeLayout } from "../../native/shm.js";
import { toNativeGeometry } from "../common/geometry.js";
import { toNativeRetrieval } from "../common/retrieval.js";

export type Layout = NativeLayout;

/** Pages needed to hold `maxContextTokens` tokens. */
export function capacityPages(maxContextTokens: number, pageSize: number): number {
  return Math.max(1, Math.ceil(maxContextTokens / pageSize));
}

export function computeLayout(g: ModelGeometry, r: RetrievalConfig, capacity: number): Layout {
  return loadShm().layout(toNativeGeometry(g), toNativeRetrieval(r), capacity);
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
