// The budget's page ranges of a CUDA session (engine/Budget.h): for a layer holding `tokens` tokens,
// which pages are sink, selectable (middle) and window. The CUDA engine uses them (prefill placement, decode candidates, re-attach, resident-page statistics).
#pragma once

#include <algorithm>
#include <cstdint>

#include "CudaEngine.h"
#include "engine/Budget.h"

namespace freekv::cuda {

// engine/Budget.h is the one definition of the ranges; the CUDA engine reads them per session.
using Ranges = BudgetRanges;
inline Ranges RangesFor(const Session& s, int64_t tokens) { return BudgetRangesFor(s.P, s.SP, s.WP, tokens); }

}  // namespace freekv::cuda
