#include "engine/cpu/Residency.h"

#include <algorithm>
#include <unordered_set>

#include "engine/ResidentPool.h"

namespace freekv::cpu {

ResidencyPlan PlanResidency(std::vector<int>& slot_page, std::vector<int>& slot_age, const std::vector<int>& chosen, int k) {
  ResidencyPlan plan;
  const int n = static_cast<int>(slot_page.size());
  const bool extra = n > k;
  std::unordered_set<int> want(chosen.begin(), chosen.end());
  std::unordered_set<int> resident;
  std::vector<char> kept(n, 0);
  std::vector<int> victims;
  for (int s = 0; s < n; ++s) {
    const int p = slot_page[s];
    if (p >= 0 && want.count(p)) {
      resident.insert(p);
      kept[s] = 1;
      ++plan.hits;
    } else {
      victims.push_back(s);
    }
  }
  std::sort(victims.begin(), victims.end(), [&](int a, int b) {
    return ResidentVictimBefore(slot_page[a], slot_age[a], a, slot_page[b], slot_age[b], b, extra);
  });
  size_t next = 0;
  for (int p : chosen) {
    if (resident.count(p)) continue;
    const int s = victims[next++];  // |chosen| <= slots, so there is always one
    slot_page[s] = p;
    kept[s] = 1;
    resident.insert(p);
    plan.misses.push_back({p, s});
  }
  for (int s = 0; s < n; ++s) slot_age[s] = ResidentAgeAfter(slot_page[s], slot_age[s], kept[s] != 0);
  return plan;
}

}  // namespace freekv::cpu
