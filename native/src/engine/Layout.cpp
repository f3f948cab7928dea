#include "engine/Layout.h"

#include <algorithm>

#include "engine/Manifest.h"

namespace freekv {

static size_t RoundUp(size_t n, size_t a) { return (n + a - 1) / a * a; }

Layout ComputeLayout(const Geometry& g, const RetrievalConfig& c, int capacity_pages) {
  Layout l{};
  const size_t e = DTypeBytes(g.kv_dtype);
  l.head_page_bytes = 2ull * c.page_size * g.head_dim * e;
  l.page_bytes = l.head_page_bytes * g.kv_heads;
  l.layer_stride = l.page_bytes * static_cast<size_t>(capacity_pages);
  l.store_bytes = RoundUp(std::max<size_t>(1, l.layer_stride * g.layers), 4096);
  // One staging buffer holds every selected head-page of one layer of one session.
  const size_t sel_pages = std::max(1, c.select_tokens / c.page_size);
  l.staging_buffer_bytes = RoundUp(sel_pages * l.head_page_bytes * g.kv_heads, 4096);
  l.tail_layer_bytes = l.page_bytes;  // [P][2][Hkv][D] holds as many elements as one page
  l.tail_bytes = RoundUp(l.tail_layer_bytes * g.layers, 4096);
  l.manifest_query_offset = RoundUp(sizeof(ManifestHeader) + kManifestLayerBytes * g.layers, 64);
  l.manifest_query_record_bytes =
      RoundUp(sizeof(ManifestQueryRecord) + 4ull * static_cast<size_t>(g.q_heads) * g.head_dim, 64);
  l.manifest_bytes = RoundUp(l.manifest_query_offset + 2ull * g.layers * l.manifest_query_record_bytes, 4096);
  return l;
}

}  // namespace freekv
