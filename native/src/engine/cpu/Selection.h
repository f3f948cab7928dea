// Selection: score the selectable pages of a KV head with each of its query heads
// (sum_i max(q_i * hi_i, q_i * lo_i)), combine the group's heads into one score per page
// (group-consistent selection for GQA), and keep the top-k pages.
#pragma once

#include <vector>

#include "engine/cpu/PageGeometry.h"

namespace freekv::cpu {

// Combines the group's per-head scores (scores[i * group + j]: page i, query head j) into combined[n]. The combined
// score is kept in double so that the ranking does not pick up float32 ties of its own.
//   SoftmaxMean: softmax over pages per head of the raw (unscaled) scores, then the mean.
//   Mean: mean of the raw scores. Max: max of the raw scores.
void CombineGroup(GroupCombine how, const float* scores, int group, int n, std::vector<double>& combined);

// Indices (into combined) of the k highest scores, best first; ties go to the lower index.
std::vector<int> TopK(const std::vector<double>& combined, int k);

// The whole selection for KV head h: scores pages [c0, c1) of the head's summaries ([pages][2][D])
// with the group's query heads of q ([Hq][D]), combines, and returns the chosen pages (best first) and every candidate's combined
// score (combined[p - c0]).
std::vector<int> SelectPages(const PageGeometry& g, GroupCombine how, const uint16_t* summaries, int h, const float* q,
                             int c0, int c1, std::vector<double>& combined);

}  // namespace freekv::cpu
