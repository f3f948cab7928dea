// The budget's page ranges of a layer holding `tokens` tokens (DESIGN.md section 2), the same on
// every backend: the sink is the first S/P full pages, the window the partial page plus the
// W/P - 1 most recent full pages, and the middle pages between them are the ones selection picks.
#pragma once

#include <algorithm>
#include <cstdint>

namespace freekv {

struct BudgetRanges {
  int full = 0;          // full pages
  int partial = 0;       // tokens in the partial page (page index `full`)
  int sink_end = 0;      // sink full pages: [0, sink_end)
  int window_begin = 0;  // window full pages: [window_begin, full)
  // middle (selectable) pages: [sink_end, window_begin)
};

inline BudgetRanges BudgetRangesFor(int page_size, int sink_pages, int window_pages, int64_t tokens) {
  BudgetRanges r;
  r.full = static_cast<int>(tokens / page_size);
  r.partial = static_cast<int>(tokens % page_size);
  r.sink_end = std::min(sink_pages, r.full);
  r.window_begin = std::max(r.sink_end, r.full - (window_pages - 1));
  return r;
}

}  // namespace freekv
