#include "engine/cpu/Offload.h"

#include <cstring>

namespace freekv::cpu {

void OffloadPage(const PageGeometry& g, const uint8_t* nhd_page, uint8_t* store_page) {
  for (int h = 0; h < g.Hkv; ++h)
    for (int i = 0; i < g.P; ++i) {
      std::memcpy(store_page + g.HndK(i, h), nhd_page + g.NhdK(i, h), g.row_bytes);
      std::memcpy(store_page + g.HndV(i, h), nhd_page + g.NhdV(i, h), g.row_bytes);
    }
}

void LoadStorePage(const PageGeometry& g, const uint8_t* store_page, uint8_t* nhd_page, int tokens) {
  for (int h = 0; h < g.Hkv; ++h)
    for (int i = 0; i < tokens; ++i) {
      std::memcpy(nhd_page + g.NhdK(i, h), store_page + g.HndK(i, h), g.row_bytes);
      std::memcpy(nhd_page + g.NhdV(i, h), store_page + g.HndV(i, h), g.row_bytes);
    }
}

void WriteTailRow(const PageGeometry& g, uint8_t* tail_layer, int i, const uint8_t* nhd_page) {
  uint8_t* row = tail_layer + static_cast<size_t>(i) * TailRowBytes(g);
  // K[Hkv][D] of token i is contiguous in NHD, and so is V.
  std::memcpy(row, nhd_page + g.NhdK(i, 0), g.Hkv * g.row_bytes);
  std::memcpy(row + g.Hkv * g.row_bytes, nhd_page + g.NhdV(i, 0), g.Hkv * g.row_bytes);
}

void ReadTailRows(const PageGeometry& g, const uint8_t* tail_layer, int rows, uint8_t* nhd_page) {
  for (int i = 0; i < rows; ++i) {
    const uint8_t* row = tail_layer + static_cast<size_t>(i) * TailRowBytes(g);
    std::memcpy(nhd_page + g.NhdK(i, 0), row, g.Hkv * g.row_bytes);
    std::memcpy(nhd_page + g.NhdV(i, 0), row + g.Hkv * g.row_bytes, g.Hkv * g.row_bytes);
  }
}

}  // namespace freekv::cpu
