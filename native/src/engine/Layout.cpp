#include "engine/Layout.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "engine/Manifest.h"

namespace freekv {

static size_t RoundUp(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Largest store a layout describes: 2^50 bytes (1 PiB), far past any host, so that no size below
// (and no byte offset a kernel computes from them) wraps in 64 bits.
static constexpr size_t kMaxStoreBytes = size_t{1} << 50;

// Largest manifest: 1 GiB (see ComputeLayout).
static constexpr size_t kMaxManifestBytes = size_t{1} << 30;

static size_t CheckedMul(size_t a, size_t b, const char* what) {
  size_t r = 0;
  if (__builtin_mul_overflow(a, b, &r) || r > kMaxStoreBytes)
    throw std::invalid_argument(std::string("the session's ") + what + " would pass 2^50 bytes: the geometry, page size and capacity are too large");
  return r;
}

Layout ComputeLayout(const Geometry& g, const RetrievalConfig& c, int capacity_pages) {
  if (g.layers < 0 || g.kv_heads < 0 || g.head_dim < 0 || c.page_size < 0 || capacity_pages < 0)
    throw std::invalid_argument("layout: sizes must be >= 0");
  Layout l{};
  const size_t e = DTypeBytes(g.kv_dtype);
  l.head_page_bytes = CheckedMul(CheckedMul(2ull * static_cast<size_t>(c.page_size), static_cast<size_t>(g.head_dim), "page"), e, "page");
  l.page_bytes = CheckedMul(l.head_page_bytes, static_cast<size_t>(g.kv_heads), "page");
  l.layer_stride = CheckedMul(l.page_bytes, static_cast<size_t>(capacity_pages), "store layer");
  l.store_bytes = RoundUp(std::max<size_t>(1, CheckedMul(l.layer_stride, static_cast<size_t>(g.layers), "store")), 4096);
  // One staging buffer holds every selected head-page of one layer of one session.
  const size_t sel_pages = std::max(1, c.select_tokens / std::max(1, c.page_size));
  l.staging_buffer_bytes = RoundUp(CheckedMul(CheckedMul(sel_pages, l.head_page_bytes, "staging buffer"), static_cast<size_t>(g.kv_heads), "staging buffer"), 4096);
  l.tail_layer_bytes = l.page_bytes;  // [P][2][Hkv][D] holds as many elements as one page
  l.tail_bytes = RoundUp(l.tail_layer_bytes * g.layers, 4096);
  l.manifest_query_offset = RoundUp(sizeof(ManifestHeader) + kManifestLayerBytes * g.layers, 64);
  l.manifest_query_record_bytes =
      RoundUp(sizeof(ManifestQueryRecord) + 4ull * static_cast<size_t>(g.q_heads) * g.head_dim, 64);
  l.manifest_bytes = RoundUp(l.manifest_query_offset + 2ull * g.layers * l.manifest_query_record_bytes, 4096);
  // The manifest is read and written through one ArrayBuffer (at most 4 GiB); real models need a
  // few MB (two query records a layer: 128 layers of 128 x 256 queries are 33 MB).
  if (l.manifest_bytes > kMaxManifestBytes)
    throw std::invalid_argument("the session's manifest (two query records of qHeads x headDim floats a layer) would take " +
                                std::to_string(l.manifest_bytes) + " bytes, more than 1 GiB: too many layers, query heads or head dims");
  return l;
}

}  // namespace freekv
