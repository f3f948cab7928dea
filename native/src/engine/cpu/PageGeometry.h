// Byte geometry of one session's pages in both layouts, and the budget's page ranges in it.
//   NHD (device tier): page = [2 (K,V)][P][Hkv][D], token-major, what attention reads.
//   HND (host store):  page = [Hkv][2 (K,V)][P][D], head-major: one head's K and V of a page are
//                      one contiguous head-page, which is what recall moves.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "engine/Budget.h"
#include "engine/Engine.h"

namespace freekv::cpu {

struct PageGeometry {
  int P = 0, Hkv = 0, Hq = 0, D = 0;
  DType dtype = DType::F32;
  size_t elem = 4;
  size_t row_bytes = 0;        // one head's K (or V) row: D elements
  size_t nhd_page_bytes = 0;   // [2][P][Hkv][D]
  size_t head_page_bytes = 0;  // [2][P][D]
  size_t hnd_page_bytes = 0;   // [Hkv][2][P][D]
  int sink_pages = 0;          // S / P
  int window_pages = 0;        // W / P (the partial page + W/P - 1 full pages)
  int select_pages = 0;        // sel / P

  // NHD offsets of head h's K / V row i in a page.
  size_t NhdK(int i, int h) const { return (static_cast<size_t>(i) * Hkv + h) * row_bytes; }
  size_t NhdV(int i, int h) const { return (static_cast<size_t>(P + i) * Hkv + h) * row_bytes; }
  // HND offsets of head h's K / V row i in a page.
  size_t HndK(int i, int h) const { return h * head_page_bytes + static_cast<size_t>(i) * row_bytes; }
  size_t HndV(int i, int h) const { return h * head_page_bytes + static_cast<size_t>(P + i) * row_bytes; }
};

// The budget's page ranges (engine/Budget.h) of a layer holding `tokens` tokens.
inline BudgetRanges RangesFor(const PageGeometry& g, int64_t tokens) {
  return BudgetRangesFor(g.P, g.sink_pages, g.window_pages, tokens);
}

}  // namespace freekv::cpu
