// Hierarchical selection on the CPU (engine/Hierarchy.h has the principle and what is exact):
// group bounds per (group of kPagesPerGroup pages, KV head), kept up to date as pages fill, and a
// branch-and-bound top-k that scores the groups, visits them best bound first and scores only
// the pages of the groups whose bound can still beat the k-th best page found so far.
//
// The crossover is measured by tools/dev/hier-select-bench.cpp (see kHierarchicalMinPages).
#pragma once

#include <vector>

#include "engine/Hierarchy.h"
#include "engine/cpu/PageGeometry.h"

namespace freekv::cpu {

// Candidate pages per KV head from which Auto goes hierarchical. Measured on this 2-core machine
// with tools/dev/hier-select-bench.cpp (bench/results/hier-select-20261203-headmajor.txt; head-
// major summaries, the pair kernel): one KV head of 4 query heads, D = 128, k = 56, keys a slow
// random walk plus noise, median us per selection, flat / hierarchical (pages scored), four runs
// hot and cold:
//   2048: 126-197 / 158-235 (2020)   4096: 245-331 / 287-360 (3354)   6144: 363-487 / 296-435 (4422)
//   8192: 519-620 / 496-556 (6285)   16384: 978-1226 / 404-701 (4672)   32768: 2686 / 1150 (7456)
// Below about 5000 candidates the group bounds (1K tokens each) are too loose to prune and the
// group pass is overhead (flat wins by 2-25% at 4096); from 6144 on the hierarchical selection
// wins, and its cost then grows with the pages that can reach the top-k, not with the context.
// Auto starts at 6144 candidates (192K tokens of 32-token pages).
constexpr int kHierarchicalMinPages = 6144;

inline bool UseHierarchical(HierarchicalSelection mode, int candidates) {
  if (mode == HierarchicalSelection::Off || candidates < 2) return false;
  return mode == HierarchicalSelection::On || candidates >= kHierarchicalMinPages;
}

// Group bounds of one KV head: [groups][2 (hi, lo)][D] bf16, group g covering pages
// [g * kPagesPerGroup, (g + 1) * kPagesPerGroup); hi the element-wise max of its pages' hi, lo
// the element-wise min of their lo (of the pages summarised so far).
inline size_t GroupOf(int page) { return static_cast<size_t>(page) / kPagesPerGroup; }

// Folds the summary of `page` (already in the head's summaries, [pages][2][D]) into the head's
// group bounds, growing them to the page's group; the first page of a group initialises it.
void FoldPageIntoGroup(const PageGeometry& g, const uint16_t* summaries, int page, std::vector<uint16_t>& groups);

// Rebuilds every group bound of one head from its summaries of pages [0, pages).
void RebuildGroups(const PageGeometry& g, const uint16_t* summaries, int pages, std::vector<uint16_t>& groups);

// The combined score of one page (or group) from its per-query-head scores s[0 .. group), as the
// selection ranks them.
struct Combiner {
  GroupCombine how = GroupCombine::Mean;
  int group = 1;
  bool raw = false;            // SoftmaxMean with one head: the raw score (same ranking)
  std::vector<double> shift;   // SoftmaxMean: per head, exp(s - shift[j]) * inv_norm[j]
  std::vector<double> inv_norm;
  double operator()(const float* s) const;
};

// One KV head's selection, with what it was made from.
struct HeadSelection {
  std::vector<int> chosen;        // best first; ties to the lower page
  // Flat: every candidate's combined score (combined[p - c0]). Hierarchical: empty.
  std::vector<double> combined;
  bool hierarchical = false;
  Combiner combiner;
  const PageGeometry* g = nullptr;
  const uint16_t* summaries = nullptr;  // the head's [pages][2][D]
  const float* q = nullptr;  // the group's query heads [group][D]
  int h = 0, c0 = 0, c1 = 0;
  int groups_scored = 0, pages_scored = 0;
};

// The whole selection of KV head h among pages [c0, c1), flat or hierarchical (`hier`), from the
// head's summaries ([pages][2][D], Summary.h) and group bounds ([groups][2][D]); q holds every
// query head ([Hq][D]), h picks the group's.
HeadSelection SelectHead(const PageGeometry& g, GroupCombine how, const uint16_t* summaries, const uint16_t* groups,
                         int h, const float* q, int c0, int c1, bool hier);

// Hierarchical only (tests, the micro-benchmark): same result fields as SelectHead(..., true).
HeadSelection SelectPagesHierarchical(const PageGeometry& g, GroupCombine how, const uint16_t* summaries,
                                      const uint16_t* groups, int h, const float* q, int c0, int c1);

}  // namespace freekv::cpu
