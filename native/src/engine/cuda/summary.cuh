// Page summaries, computed on the device when a page fills (and for every page at prefill).
// Summary per (page, KV head) = two fp32 vectors (hi, lo) over the channels of the page's keys:
//   MaxMin (Quest, default):  hi = per-channel max, lo = per-channel min;
//   CuboidMean (ArkVale):     center c = (max + min) / 2, radius r = mean |k - c| per channel,
//                             stored as hi = c + r, lo = c - r,
// so that scoring is the same formula sum_i max(q_i * hi_i, q_i * lo_i) for both
// (= q.c + |q|.r for the cuboid). The bounds are kept at bf16 precision, hi rounded up and lo
// rounded down so they stay bounds (as the CPU backend keeps them, so both backends score with
// the same values). Every bound is therefore a bf16 value, and the device keeps it as bf16: the
// same values as fp32 in half the bytes, so that the selection, which reads every summary of the
// context at every step, reads half as much (scores are computed in fp32 from the exact values,
// bit for bit as before).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace freekv::cuda {

// Rounds toward +inf / -inf to the nearest bf16 value (NaN and exact values unchanged).
__host__ __device__ inline float Bf16RoundUp(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0xffffu) == 0 || (u & 0x7fffffffu) > 0x7f800000u) u &= 0xffff0000u;
  else u = ((u >> 31) ? (u >> 16) : (u >> 16) + 1) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}
__host__ __device__ inline float Bf16RoundDown(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0xffffu) == 0 || (u & 0x7fffffffu) > 0x7f800000u) u &= 0xffff0000u;
  else u = ((u >> 31) ? (u >> 16) + 1 : (u >> 16)) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

enum SummaryKindId : int { kSummaryMaxMin = 1, kSummaryCuboidMean = 2 };

// pages: [count][2][page_size][kv_heads][head_dim] NHD bf16 (full pages);
// summaries: [count][kv_heads][2 (hi, lo)][head_dim] bf16.
void LaunchPageSummary(const __nv_bfloat16* pages, int count, __nv_bfloat16* summaries, int kv_heads, int head_dim,
                       int page_size, int kind, cudaStream_t stream);

// One page of one batch item: its NHD page, where its summary goes ([kv_heads][2][head_dim]) and
// the summary kind (SummaryKindId; items may differ). `group` (optional): the bounds of the page's
// group ([kv_heads][2][head_dim], selection.cuh's hierarchical selection), which the kernel folds
// the new summary into (hi: max, lo: min, a NaN sticks, as the CPU engine's FoldPageIntoGroup);
// `first`: the page is its group's first, so the summary replaces the group's bounds.
struct PageSummaryItem {
  const __nv_bfloat16* page;
  __nv_bfloat16* summary;
  __nv_bfloat16* group;
  int kind;
  int first;
};

// `count` single-page summaries in one launch; items: device array (kinds checked by the caller).
// An item with a null page is skipped.
void LaunchPageSummaryBatch(const PageSummaryItem* items, int count, int kv_heads, int head_dim, int page_size,
                            cudaStream_t stream);

// Recomputes the group bounds [groups][kv_heads][2][head_dim] of every group overlapping pages
// [page_from, page_to) from the summaries of pages [group start, page_to) (a group's pages below
// page_from were summarised before). Group g covers pages [g * group_pages, (g + 1) * group_pages).
// Both bf16 (a fold of bf16 values is one of them).
void LaunchGroupBounds(const __nv_bfloat16* summaries, __nv_bfloat16* groups, int page_from, int page_to, int kv_heads,
                       int head_dim, int group_pages, cudaStream_t stream);

}  // namespace freekv::cuda
