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
import { invalidArgument } from "../common/errors.js";

export type Layout = NativeLayout;

/** Pages needed to hold `maxContextTokens` tokens. */
export function capacityPages(maxContextTokens: number, pageSize: number): number {
  return Math.max(1, Math.ceil(maxContextTokens / pageSize));
}

export function computeLayout(g: ModelGeometry, r: RetrievalConfig, capacity: number): Layout {
  return loadShm().layout(toNativeGeometry(g), toNativeRetrieval(r), capacity);
}

/** Most pages a layer of a store may have: the native layout's bound (AddonContract, layout()). */
const MAX_CAPACITY_PAGES = 2 ** 30;

/**
 * The layout of a new session of `maxContextTokens` (from a request: field names the request's
 * field). INVALID_ARGUMENT naming it when the store needs more than 2^30 pages a layer, or when
 * the native layout refuses it (a store past 2^50 bytes, where sizes would wrap in 64 bits:
 * native/src/engine/Layout.cpp), not INTERNAL.
 */
export function requestLayout(g: ModelGeometry, r: RetrievalConfig, maxContextTokens: number, field: string): { capacity: number; layout: Layout } {
  const capacity = capacityPages(maxContextTokens, r.pageSize);
  if (capacity > MAX_CAPACITY_PAGES) throw invalidArgument(field, `${maxContextTokens} tokens need ${capacity} pages a layer; a session's store may hold at most 2^30 pages a layer`);
  let layout: Layout;
  try {
    layout = computeLayout(g, r, capacity);
  } catch (e) {
    throw invalidArgument(field, (e as Error).message);
  }
  // The kvstore keeps a 4-byte checksum per committed page outside the counted memory (the
  // commit's and the scrubber's): pages of at least MIN_PAGE_BYTES keep that under 1/16 of it.
  if (layout.pageBytes < MIN_PAGE_BYTES) {
    throw invalidArgument("retrieval.page_size", `a page of ${r.pageSize} tokens holds ${layout.pageBytes} bytes of K and V for all KV heads; the kvstore takes pages of at least ${MIN_PAGE_BYTES} bytes`);
  }
  return { capacity, layout };
}

/** The smallest page the kvstore stores, bytes (K and V of all KV heads). */
export const MIN_PAGE_BYTES = 64;

/**
 * Memory that follows the context. A store segment keeps its full apparent size (the
 * [layers][capacity_pages] addressing every kernel uses) but is backed only as far as the
 * session's reservation: pages [0, reservedPages) of every layer. The reservation is counted in
 * tokens, rounded up to an extent (FREEKV_KVSTORE_EXTENT_TOKENS) and capped by max_context_tokens,
 * so it grows in a few large steps. Memory is committed in OS pages: each layer's reserved byte
 * range is rounded out to OS_PAGE and the ranges are merged; the kvstore allocates exactly those
 * ranges (fallocate) and the CUDA engine registers exactly those (CudaSession.cu), so what is
 * counted, what is allocated and what is pinned agree.
 */
export const OS_PAGE = 4096;

/** Tokens reserved for a request of `tokens`: up to a whole extent, at most maxContextTokens. */
export function extentTokens(tokens: number, extent: number, maxContextTokens: number): number {
  if (tokens <= 0) return 0;
  return Math.min(maxContextTokens, Math.ceil(tokens / extent) * extent);
}

/** Store pages per layer backed for `reservedTokens` (every full page those tokens can fill, and one more). */
export function reservedPagesOf(reservedTokens: number, pageSize: number, capacity: number): number {
  return Math.min(capacity, Math.ceil(reservedTokens / pageSize));
}

export type ByteRange = readonly [start: number, end: number];

/** The store's byte ranges backed for `reservedPages` pages per layer: sorted, merged, OS-page aligned. */
export function storeRanges(l: Layout, layers: number, reservedPages: number): ByteRange[] {
  const out: [number, number][] = [];
  if (reservedPages <= 0) return out;
  for (let layer = 0; layer < layers; layer++) {
    const a = Math.floor((layer * l.layerStride) / OS_PAGE) * OS_PAGE;
    const b = Math.min(l.storeBytes, Math.ceil((layer * l.layerStride + reservedPages * l.pageBytes) / OS_PAGE) * OS_PAGE);
    const last = out[out.length - 1];
    if (last && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

/** The parts of `next` that `prev` does not cover (both sorted and merged, prev within next). */
export function rangesAdded(prev: readonly ByteRange[], next: readonly ByteRange[]): ByteRange[] {
  const out: ByteRange[] = [];
  for (const [a, b] of next) {
    let at = a;
    for (const [c, d] of prev) {
      if (d <= at || c >= b) continue;
      if (c > at) out.push([at, c]);
      at = Math.max(at, d);
    }
    if (at < b) out.push([at, b]);
  }
  return out;
}

export const rangeBytes = (r: readonly ByteRange[]) => r.reduce((n, [a, b]) => n + (b - a), 0);

/** Ranges as [offset, length] pairs, the form ShmSegment.allocateAsync takes. */
export const offsetLengths = (r: readonly ByteRange[]) => r.map(([a, b]) => [a, b - a] as const);

/** Bytes of the segments other than the store (staging, tail, manifest): committed whole at creation. */
export function fixedBytes(l: Layout): number {
  return 2 * l.stagingBufferBytes + l.tailBytes + l.manifestBytes;
}

/** Bytes of shared memory a session holds with `reservedPages` store pages per layer backed. */
export function reservedBytes(l: Layout, layers: number, reservedPages: number): number {
  return fixedBytes(l) + rangeBytes(storeRanges(l, layers, reservedPages));
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
