// Fine-grained correction, on the device: per KV head (group), the mean over its query heads of
// cos(q_t, q_{t-1}) is compared with tau; a group whose mean is below tau is flagged, and its
// speculative selection is redone with q_t before attention. The flags stay on the device (they
// mask the re-selection kernel), so the check costs no host round trip.
#pragma once
#include <cuda_runtime.h>

namespace freekv::cuda {

// q_now, q_prev: [q_heads][head_dim] fp32. flags: [kv_heads] int (1 = correct this group).
// corrections: optional device counter, incremented by the number of flagged groups.
// A zero-norm query counts as cosine 0.
void LaunchCorrectionCheck(const float* q_now, const float* q_prev, int q_heads, int kv_heads, int head_dim, float tau,
                           int* flags, unsigned long long* corrections, cudaStream_t stream);

// One batch item of the check: its queries, threshold, flags and optional counter. `flags` null:
// the group cosines are only sampled (a layer that does not correct). `stats`: optional, the
// layer's counter words (layer_counters.cuh), which take one cosine sample per group (and count
// it below tau when `cosine < tau`).
struct CorrectionItem {
  const float* q_now;
  const float* q_prev;
  int* flags;
  unsigned long long* corrections;
  unsigned long long* stats;
  float tau;
  int pad;
};

// `count` checks in one launch (grid kv_heads x count); items: device array.
void LaunchCorrectionCheckBatch(const CorrectionItem* items, int count, int q_heads, int kv_heads, int head_dim,
                                cudaStream_t stream);

}  // namespace freekv::cuda
