// Page summaries, computed on the device when a page fills (and for every page at prefill).
// Summary per (page, KV head) = two fp32 vectors (hi, lo) over the channels of the page's keys:
//   MaxMin (Quest, default):  hi = per-channel max, lo = per-channel min;
//   CuboidMean (ArkVale):     center c = (max + min) / 2, radius r = mean |k - c| per channel,
//                             stored as hi = c + r, lo = c - r,
// so that scoring is the same formula sum_i max(q_i * hi_i, q_i * lo_i) for both
// (= q.c + |q|.r for the cuboid).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace freekv::cuda {

enum SummaryKindId : int { kSummaryMaxMin = 1, kSummaryCuboidMean = 2 };

// pages: [count][2][page_size][kv_heads][head_dim] NHD bf16 (full pages);
// summaries: [count][kv_heads][2 (hi, lo)][head_dim] fp32.
void LaunchPageSummary(const __nv_bfloat16* pages, int count, float* summaries, int kv_heads, int head_dim,
                       int page_size, int kind, cudaStream_t stream);

}  // namespace freekv::cuda
