// Hierarchical page summaries: the context's pages in groups of kPagesPerGroup consecutive pages,
// each group with its own bounds per KV head (the element-wise max of its pages' hi and min of
// their lo), so that selection can score the groups first and then only the pages of the groups
// that can still reach the top-k (branch and bound; engine/cpu/HierSelection.h, and on the CUDA
// engine cuda/selection.cuh, inside the sync-free device step; there it takes the Mean and Max
// combines and SoftmaxMean with one query head per KV head, and SoftmaxMean with several query
// heads always scans every page).
//
// score(q, page) = sum_d max(q_d hi_d, q_d lo_d) is monotone in the bounds (larger hi, smaller lo
// never lower it, also in float arithmetic: multiplication, max and a sum in a fixed order are
// monotone under round-to-nearest), so a group's score is an upper bound of the score of every
// page inside it, for every query head. The group combines of GroupCombine:
//   Mean, Max: monotone in every head's score, so the combine of the group's per-head bounds
//              bounds the combined score of every page inside: the selection equals the flat
//              top-k exactly (same pages, same order, ties to the lower page).
//   SoftmaxMean, one query head per KV head: the ranking is that of the raw score (softmax is
//              monotone), so the selection equals the flat one exactly, except where the flat
//              combine's exp(s - max) underflows to zero and makes ties of its own (pages more
//              than ~745 below the best page).
//   SoftmaxMean, several query heads: the flat combine weighs head j by 1 / sum_pages exp(s_j),
//              which needs the score of every page. The hierarchical selection weighs it instead
//              by 1 / sum_groups n_g exp(ub_gj) (the softmax over the group bounds, n_g candidate
//              pages per group); with those weights fixed the combine is monotone again and the
//              branch and bound is exact for them. The page set can then differ from the flat
//              one near the k-th place (tools/fidelity measures it: README "Hierarchical
//              selection").
#pragma once

namespace freekv {

// Pages per group. 32 pages of 32 tokens: a group covers 1K tokens; at 64K tokens a KV head has
// 64 groups, at 1M tokens 1024 (the group bounds are a 32nd of the page summaries' bytes).
#ifndef FREEKV_PAGES_PER_GROUP
#define FREEKV_PAGES_PER_GROUP 32  // the micro-benchmark (tools/dev/hier-select-bench.cpp) varies it
#endif
constexpr int kPagesPerGroup = FREEKV_PAGES_PER_GROUP;

// When selection goes through the groups.
//   Off: always the flat scan of every candidate page.
//   On: always hierarchical (as soon as there is more than one candidate page).
//   Auto: hierarchical from kHierarchicalMinPages candidate pages per KV head on (CPU engine:
//         below that the flat scan is as fast; engine/cpu/HierSelection.h has the measurement;
//         the CUDA engine's threshold and its measurement: cuda/CudaDecode.cu).
enum class HierarchicalSelection : int { Off = 0, On = 1, Auto = 2 };

}  // namespace freekv
