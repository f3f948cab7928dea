// Selection: score every candidate page with the query, combine the scores of a GQA group's
// query heads, and keep the top-k pages per KV head (group-consistent selection).
//
//   score(page, query head) = sum_i max(q_i * hi_i, q_i * lo_i)   (raw, no 1/sqrt(D))
//   combine over the group:  SoftmaxMean (default, the paper's "avgSM"): softmax over the
//                            candidate pages per head, then mean over the heads;
//                            Mean: mean of raw scores; Max: max of raw scores.
//   top-k per KV head, ordered by combined score (descending; ties: lower page first).
//
// Up to 2 C candidates (C = 1024, or 4 k rounded up to a power of two) the combine and the top-k
// run in one block per KV head, the combined scores in shared memory up to kMaxSharedCandidates
// pages, in the workspace above that. Longer lists are cut into chunks of C candidates, one block
// each: every chunk keeps its own best min(k, n) (exact: a page among the k best of the list is
// among the k best of its chunk, ties going to the lower page in both), and the block per KV head
// ranks only the chunks' winners (PERF.md "A top-k over many blocks").
//
// Hierarchical (engine/Hierarchy.h; `groups` set): the group bounds are scored with the same
// kernel as the pages (so a group's float score is an upper bound of each of its pages' float
// scores, bit for bit: same products, same maxima, same summation tree), combined with the same
// combine; the best groups are taken until they hold k candidate pages (the seeds) and their pages
// scored; the k-th best seed score is a lower bound of the final k-th score, so every group whose
// combined bound is below it is dropped; the pages of the other groups (ascending) are scored and
// go through the same top-k. Same pages, same order, same ties as the flat selection for Mean and
// Max (and SoftmaxMean with one query head per KV head: the raw score's ranking, which is the
// softmax's except where its exp underflows). All on the device, fixed-size buffers, no host
// wait; in the worst case (nothing pruned) it scores every page once more than the flat scan.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace freekv::cuda {

enum CombineId : int { kCombineSoftmaxMean = 1, kCombineMean = 2, kCombineMax = 3 };
// Candidates per selection: up to kMaxSharedCandidates the top-k keeps its keys in shared memory;
// above that (flat or hierarchical) in the workspace.
constexpr int kMaxSelectionCandidates = 65536;
constexpr int kMaxSharedCandidates = 16384;
// Pages per group of the hierarchical selection (engine/Hierarchy.h's kPagesPerGroup).
constexpr int kSelGroupPages = 32;

struct SelectionParams {
  const float* q = nullptr;          // [q_heads][head_dim] fp32
  const __nv_bfloat16* summaries = nullptr;  // [pages][kv_heads][2 (hi, lo)][head_dim] bf16 (summary.cuh)
  int first_page = 0;                // candidates: pages first_page .. first_page + num_candidates - 1
  int num_candidates = 0;
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  int k = 0;                         // pages selected per KV head
  int combine = kCombineSoftmaxMean;
  const int* head_mask = nullptr;    // [kv_heads] optional: only heads with mask != 0 are selected,
                                     // the others' rows of `selected` are left as they are
  int invert_mask = 0;               // 1: the reverse, only heads with mask == 0 are selected
  float* scratch = nullptr;          // SelectionScratchBytes(params) bytes
  int* selected = nullptr;           // [kv_heads][k] page ids, -1 where fewer candidates than k
  // Hierarchical selection: the layer's group bounds [groups][kv_heads][2 (hi, lo)][head_dim] fp32,
  // group i the element-wise max of the hi / min of the lo of pages [32 i, 32 i + 32) (summary.cuh
  // keeps them); null: the flat scan. Combines: Mean, Max, SoftmaxMean with q_heads == kv_heads.
  const __nv_bfloat16* groups = nullptr;
  // SelectionWorkspaceBytes(params) bytes: the hierarchical selection's buffers, the top-k's keys
  // above kMaxSharedCandidates candidates and the chunks' winners (needed above 2048 candidates
  // or with groups; may be null otherwise).
  void* workspace = nullptr;
  // 1: the top-k in one block per KV head at any length (benchmarks compare the two ways).
  int topk_single = 0;
  // 1: the scoring launches a warp per 4 pages instead of one wave of the device whose warps loop
  // over the pages (benchmarks compare the two; the scores are the same bit for bit).
  int score_grid = 0;
  // 1 (the Mean combine with more than 2 query heads per KV head): the group's query heads are
  // folded into two rows before scoring, A = sum_g max(q_g, 0) and B = sum_g min(q_g, 0) per
  // channel. Since hi >= lo, max(q hi, q lo) = max(q, 0) hi + min(q, 0) lo, so the mean of the G
  // heads' scores is (score(A) + score(B)) / G: the same ranking from 2 rows instead of G
  // (SelectionRows). Rounding differs from the per-head sum in the last bits, so pages within an
  // ulp of the k-th place may differ from the unfolded selection; the hierarchical selection
  // scores its group bounds with the same rows, so it still equals the flat scan exactly.
  int fold_mean = 0;
};

// Raw score rows per KV head: 2 where fold_mean applies (above), else the query heads per KV head.
__host__ __device__ inline int SelectionRows(const SelectionParams& p) {
  const int G = p.kv_heads > 0 ? p.q_heads / p.kv_heads : 0;
  return p.fold_mean && p.combine == kCombineMean && G > 2 ? 2 : G;
}

size_t SelectionScratchBytes(const SelectionParams& p);
// For num_candidates and k of p (a layer sizes it once for its capacity and budget).
size_t SelectionWorkspaceBytes(const SelectionParams& p);
// Whether the combine allows the hierarchical selection (see above).
inline bool HierarchicalCombine(int combine, int q_heads, int kv_heads) {
  return combine == kCombineMean || combine == kCombineMax || q_heads == kv_heads;
}

// Whether head h is left out (head_mask and invert_mask).
__host__ __device__ inline bool SkipsHead(const SelectionParams& p, int h) {
  return p.head_mask && ((p.head_mask[h] != 0) == (p.invert_mask != 0));
}

void LaunchSelection(const SelectionParams& p, cudaStream_t stream);

// Diagnostic (tests, benchmarks; waits for the stream): after a hierarchical LaunchSelection of p,
// the pages it scored in the end, summed over the KV heads (the flat scan scores num_candidates
// per head).
long long HierarchicalPagesScored(const SelectionParams& p, cudaStream_t stream);

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
  int group_m = 0;   // hierarchical items: groups the group scoring covers (0: no hierarchical item)
  int seed_m = 0;    // hierarchical items: seed pages the seed scoring covers
  int chunk_n = 0;   // items ranked in chunks: the most chunks of one item (0: none)
  int chunk_stats = 0;  // 1: such an item combines by softmax-mean (its maxima and sums first)
  int score_rows = 0;   // the most raw score rows per KV head of an item (SelectionRows): the scoring's heads per pass
};
SelectionBatchShape SelectionBatchShapeOf(const SelectionParams* host_items, int count);

}  // namespace freekv::cuda
