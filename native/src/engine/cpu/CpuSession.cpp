#include "engine/cpu/CpuSession.h"

#include <stdexcept>
#include <string>

namespace freekv::cpu {

static void Require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

PageGeometry MakePageGeometry(const Geometry& g, const RetrievalConfig& c) {
  PageGeometry p;
  p.P = c.page_size;
  p.Hkv = g.kv_heads;
  p.Hq = g.q_heads;
  p.D = g.head_dim;
  p.dtype = g.kv_dtype;
  p.elem = DTypeBytes(g.kv_dtype);
  p.row_bytes = p.elem * g.head_dim;
  p.nhd_page_bytes = 2ull * p.P * p.Hkv * p.row_bytes;
  p.head_page_bytes = 2ull * p.P * p.row_bytes;
  p.hnd_page_bytes = p.head_page_bytes * p.Hkv;
  p.sink_pages = c.sink_tokens / c.page_size;
  p.window_pages = c.window_tokens / c.page_size;
  p.select_pages = c.select_tokens / c.page_size;
  return p;
}

void ValidateSession(const Geometry& g, const RetrievalConfig& c, const HostStore& h, const Layout& layout) {
  Require(g.layers >= 1 && g.layers <= 4096, "geometry.layers must be in [1, 4096]");
  Require(g.q_heads >= 1 && g.q_heads <= 1024, "geometry.qHeads must be in [1, 1024]");
  Require(g.kv_heads >= 1 && g.kv_heads <= g.q_heads, "geometry.kvHeads must be in [1, qHeads]");
  Require(g.q_heads % g.kv_heads == 0, "geometry.qHeads must be a multiple of geometry.kvHeads");
  Require(g.head_dim >= 1 && g.head_dim <= 1024, "geometry.headDim must be in [1, 1024]");
  Require(g.kv_dtype == DType::F32 || g.kv_dtype == DType::BF16,
          "geometry.kvDtype must be F32 (1) or BF16 (2) on the CPU backend");
  if (auto e = ValidateRetrieval(c, g.layers)) throw std::invalid_argument("retrieval." + e->field + " " + e->message);
  Require(h.capacity_pages >= 1, "host.capacityPages must be >= 1");
  Require(h.store && h.store_bytes >= layout.store_bytes,
          "host.store segment is smaller than the layout's storeBytes (" + std::to_string(layout.store_bytes) + ")");
  Require(h.staging && h.staging_bytes >= 2 * layout.staging_buffer_bytes,
          "host.staging segment is smaller than two staging buffers (" + std::to_string(2 * layout.staging_buffer_bytes) + ")");
  Require(h.tail && h.tail_bytes >= layout.tail_bytes,
          "host.tail segment is smaller than the layout's tailBytes (" + std::to_string(layout.tail_bytes) + ")");
  Require(h.manifest && h.manifest_bytes >= layout.manifest_bytes,
          "host.manifest segment is smaller than the layout's manifestBytes (" + std::to_string(layout.manifest_bytes) + ")");
}

uint8_t* CpuSession::WorkingPage(LayerState& L, int page) {
  if (L.dense) {
    while (static_cast<int>(L.dense_pages.size()) <= page) {
      L.dense_pages.emplace_back(new uint8_t[pg.nhd_page_bytes]());
    }
    return L.dense_pages[page].get();
  }
  return L.ring.data() + static_cast<size_t>(page % pg.window_pages) * pg.nhd_page_bytes;
}

}  // namespace freekv::cpu
