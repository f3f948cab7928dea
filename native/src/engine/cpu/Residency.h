// Residency of the selected slots of one (layer, KV head): which page each slot holds.
// A new selection reuses the pages already resident (hits) and recalls only the misses; each miss
// replaces a slot whose page was not chosen, in the order of ResidentVictimBefore
// (engine/ResidentPool.h has the rule, shared with the CUDA engine). With as many slots as the selection (FREEKV_RESIDENT_FACTOR 1)
// every page not chosen leaves; with more (FREEKV_RESIDENT_FACTOR) the pages chosen longest ago
// leave first. Sink and window pages live in their own slots and never take part.
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
// returns the misses to recall. slot_age (per slot: selections of this head since its page was
// last chosen) is updated too. `k` is the selection's size: with more slots than k the victims
// are the oldest pages.
ResidencyPlan PlanResidency(std::vector<int>& slot_page, std::vector<int>& slot_age, const std::vector<int>& chosen, int k);

}  // namespace freekv::cpu
