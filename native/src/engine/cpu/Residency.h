// Residency of the selected slots of one (layer, KV head): which page each slot holds.
// A new selection reuses the pages already resident (hits) and recalls only the misses; each miss
// goes to an empty slot or else replaces the lowest-scoring resident page that was not chosen.
// Sink and window pages live in their own slots and never take part.
#pragma once

#include <vector>

namespace freekv::cpu {

struct SlotMiss {
  int page;
  int slot;
};

struct ResidencyPlan {
  std::vector<SlotMiss> misses;
  int hits = 0;
};

// Updates slot_page (page per slot, -1 = empty) so that every page of `chosen` is resident and
// returns the misses to recall. `score(page)` gives the new combined score of a resident page
// (pages outside the candidate range score lowest).
template <typename ScoreFn>
ResidencyPlan PlanResidency(std::vector<int>& slot_page, const std::vector<int>& chosen, ScoreFn score);

}  // namespace freekv::cpu

#include "engine/cpu/Residency.inl"
