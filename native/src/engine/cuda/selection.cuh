// Selection: score every candidate page with the query, combine the scores of a GQA group's
// query heads, and keep the top-k pages per KV head (group-consistent selection).
//
//   score(page, query head) = sum_i max(q_i * hi_i, q_i * lo_i)   (raw, no 1/sqrt(D))
//   combine over the group:  SoftmaxMean (default, the paper's "avgSM"): softmax over the
//                            candidate pages per head, then mean over the heads;
//                            Mean: mean of raw scores; Max: max of raw scores.
//   top-k per KV head, ordered by combined score (descending; ties: lower page first).
//
// One block per KV head; raw scores go through a global scratch, the combined scores and the
// bitonic sort through shared memory (up to kMaxSelectionCandidates pages).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace freekv::cuda {

enum CombineId : int { kCombineSoftmaxMean = 1, kCombineMean = 2, kCombineMax = 3 };
constexpr int kMaxSelectionCandidates = 16384;

struct SelectionParams {
  const float* q = nullptr;          // [q_heads][head_dim] fp32
  const float* summaries = nullptr;  // [pages][kv_heads][2 (hi, lo)][head_dim] fp32
  int first_page = 0;                // candidates: pages first_page .. first_page + num_candidates - 1
  int num_candidates = 0;
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  int k = 0;                         // pages selected per KV head
  int combine = kCombineSoftmaxMean;
  const int* head_mask = nullptr;    // [kv_heads] optional: only heads with mask != 0 are selected,
                                     // the others' rows of `selected` are left as they are
  float* scratch = nullptr;          // SelectionScratchBytes(params) bytes
  int* selected = nullptr;           // [kv_heads][k] page ids, -1 where fewer candidates than k
};

size_t SelectionScratchBytes(const SelectionParams& p);

void LaunchSelection(const SelectionParams& p, cudaStream_t stream);

// `count` selections in one launch per kernel (scoring, then top-k and/or sort): items is a device
// array of count SelectionParams, host_items the same array on the host (launch shapes and checks).
// The items share q_heads, kv_heads and head_dim; everything else may differ. Each item's
// `selected` is exactly what LaunchSelection would write for it.
void LaunchSelectionBatch(const SelectionParams* items, const SelectionParams* host_items, int count,
                          cudaStream_t stream);

// The launch shape LaunchSelectionBatch derives from host_items (grid of the scoring kernel, the
// top-k's shared memory, the sort's size), rounded up to kShapeQuantum candidates: all a captured
// batch selection depends on besides its arguments.
constexpr int kShapeQuantum = 256;
struct SelectionBatchShape {
  int score_m = 0;   // candidates the scoring grid covers (0: no scoring launch)
  int topk_m = -1;   // candidates the top-k's shared memory holds (-1: no top-k launch)
  int sort_np = 0;   // bitonic sort size (0: no sort launch)
};
SelectionBatchShape SelectionBatchShapeOf(const SelectionParams* host_items, int count);

}  // namespace freekv::cuda
