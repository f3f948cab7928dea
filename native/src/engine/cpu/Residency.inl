// Template body of PlanResidency (see Residency.h).
#include <algorithm>
#include <limits>
#include <unordered_set>

namespace freekv::cpu {

template <typename ScoreFn>
ResidencyPlan PlanResidency(std::vector<int>& slot_page, const std::vector<int>& chosen, ScoreFn score) {
  ResidencyPlan plan;
  std::unordered_set<int> want(chosen.begin(), chosen.end());
  std::unordered_set<int> resident;
  // Free slots: empty ones first, then resident pages that were not chosen, lowest score first.
  std::vector<std::pair<double, int>> free_slots;
  for (int s = 0; s < static_cast<int>(slot_page.size()); ++s) {
    const int p = slot_page[s];
    if (p >= 0 && want.count(p)) {
      resident.insert(p);
      ++plan.hits;
    } else {
      free_slots.emplace_back(p < 0 ? -std::numeric_limits<double>::infinity() : static_cast<double>(score(p)), s);
    }
  }
  std::stable_sort(free_slots.begin(), free_slots.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  size_t next = 0;
  for (int p : chosen) {
    if (resident.count(p)) continue;
    const int s = free_slots[next++].second;  // |chosen| <= slots, so there is always one
    slot_page[s] = p;
    plan.misses.push_back({p, s});
  }
  return plan;
}

}  // namespace freekv::cpu
