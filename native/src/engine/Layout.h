// The byte layout of one session's four shared-memory segments: the one definition, used by both
// backends, by the kvstore (through the binding's layout()) and on the wire as
// freekv.v1.SegmentLayout.
//   store:    [layers][capacity_pages] HND pages; page = [kv_heads][2 (K,V)][page_size][head_dim]
//   staging:  two buffers of staging_buffer_bytes (double-buffered recall)
//   tail:     [layers] NHD partial page = [page_size][2 (K,V)][kv_heads][head_dim], written
//             through every step so a restarted compute loses nothing
//   manifest: see engine/Manifest.h
#pragma once

#include <cstddef>

#include "engine/Retrieval.h"

namespace freekv {

struct Layout {
  size_t head_page_bytes;  // [2][P][D]
  size_t page_bytes;       // [Hkv][2][P][D]
  size_t layer_stride;     // capacity_pages * page_bytes
  size_t store_bytes;
  size_t staging_buffer_bytes;
  size_t tail_layer_bytes;  // [P][2][Hkv][D]
  size_t tail_bytes;
  size_t manifest_bytes;
  size_t manifest_query_offset;        // first ManifestQueryRecord (layer 0, record 0)
  size_t manifest_query_record_bytes;  // one record incl. its q; layer l record r at offset + (2l + r) * this
};

// Requires a valid config (page_size >= 1) and capacity_pages >= 1.
Layout ComputeLayout(const Geometry& g, const RetrievalConfig& c, int capacity_pages);

}  // namespace freekv
