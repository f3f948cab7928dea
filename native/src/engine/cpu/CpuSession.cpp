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
  ValidateGeometry(g);
  Require(g.kv_dtype == DType::F32 || g.kv_dtype == DType::BF16,
          "geometry.kvDtype must be F32 (1) or BF16 (2) on the CPU backend");
  if (auto e = ValidateRetrieval(c, g.layers)) throw std::invalid_argument("retrieval." + e->field + " " + e->message);
  ValidateHostStore(h, layout, true);
}

uint8_t* CpuSession::WorkingPage(LayerState& L, int page) {
  if (L.keeps_all) {
    while (static_cast<int>(L.dense_pages.size()) <= page) {
      L.dense_pages.emplace_back(new uint8_t[pg.nhd_page_bytes]());
    }
    return L.dense_pages[page].get();
  }
  return L.ring.data() + static_cast<size_t>(page % pg.window_pages) * pg.nhd_page_bytes;
}

}  // namespace freekv::cpu
