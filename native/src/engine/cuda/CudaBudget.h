// The budget's page ranges on the CUDA backend: for a layer holding `tokens` tokens, which pages
// are sink, selectable (middle) and window (DESIGN.md section 2). The one place the CUDA engine
// derives them (prefill placement, decode candidates, re-attach, resident-page statistics).
#pragma once

#include <algorithm>
#include <cstdint>

#include "CudaEngine.h"

namespace freekv::cuda {

// Page ranges of the budget for a layer holding `tokens` tokens (DESIGN.md section 2).
struct Ranges {
  int full, partial, sink_end, window_begin;  // middle (selectable): [sink_end, window_begin)
};
inline Ranges RangesFor(const Session& s, int64_t tokens) {
  Ranges r;
  r.full = static_cast<int>(tokens / s.P);
  r.partial = static_cast<int>(tokens % s.P);
  r.sink_end = std::min(s.SP, r.full);
  r.window_begin = std::max(r.sink_end, r.full - (s.WP - 1));
  return r;
}

}  // namespace freekv::cuda
