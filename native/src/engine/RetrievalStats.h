// Per-layer retrieval dynamics, the one definition both backends accumulate (CPU in
// engine/cpu/CpuEngine.cpp, CUDA on the device in engine/cuda/correction.cu and residency.cu) and
// every caller reads (Engine.h's Stats::layers, the binding, freekv.v1.LayerRetrievalStats).
//
// Samples. A layer's decode that is not the first decode after a prefill (so q_{t-1} is the
// previous decode's query) takes, in every mode and on every layer (dense ones included):
//   * one adjacent-query cosine sample per KV head: the mean over the group's query heads of
//     cos(q_t, q_{t-1}), the value the correction compares with tau (cpu/Correction.h); a
//     zero-norm query head counts as cosine 0;
//   * on a retrieval layer whose previous decode also attended a selection, one top-k overlap
//     sample per KV head: of the selected pages attention reads at step t (S_t), how many it also
//     read at step t-1 (S_{t-1}); overlap_pages += |S_t & S_{t-1}|, overlap_base += |S_t|.
//
// Histogram of the cosine samples: kCosineBuckets buckets; bucket i holds [edge(i-1), edge(i)),
// the first from -inf, the last up to +inf. Lower edges are inclusive, as the correction test
// is `cosine < tau`: with tau equal to an edge (0.8 and 0.9, the paper's two settings, are), the
// samples of the buckets below that edge are exactly the groups a freekv layer corrects.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define FKV_HOST_DEVICE __host__ __device__
#else
#define FKV_HOST_DEVICE
#endif

namespace freekv {

constexpr int kCosineBuckets = 10;

// Upper edge of bucket i (i in [0, kCosineBuckets - 2]); finer near 1, where real models' queries
// are and where tau lies.
FKV_HOST_DEVICE constexpr float CosineBucketEdge(int i) {
  switch (i) {
    case 0: return 0.0f;
    case 1: return 0.5f;
    case 2: return 0.7f;
    case 3: return 0.8f;
    case 4: return 0.85f;
    case 5: return 0.9f;
    case 6: return 0.95f;
    case 7: return 0.98f;
    default: return 0.99f;
  }
}

// The bucket of a cosine (NaN goes to bucket 0).
FKV_HOST_DEVICE inline int CosineBucket(float c) {
  int b = 0;
  while (b < kCosineBuckets - 1 && c >= CosineBucketEdge(b)) ++b;
  return b;
}

// One layer's counters (summed over KV heads and decode steps).
struct LayerStats {
  // Selections attention used (one per KV head of a retrieval layer per decode), of which
  // corrected, and every selection performed (speculative ones included): pages chosen = hits +
  // recalled (a selection whose recall failed counts none). Engine.h's Stats holds their sums over
  // layers.
  uint64_t selections = 0;
  uint64_t corrections = 0;
  uint64_t pages_selected = 0;
  uint64_t pages_hit = 0;
  uint64_t pages_recalled = 0;
  // Adjacent-query cosine samples: number, sum, sum of squares, minimum (0 without samples), the
  // histogram (bucket edges above), and those below the session's tau (`cosine < tau`, the
  // correction's test, whether or not the layer corrects).
  uint64_t cosine_samples = 0;
  uint64_t cosine_below_tau = 0;
  double cosine_sum = 0;
  double cosine_sum_sq = 0;
  float cosine_min = 0;
  std::array<uint64_t, kCosineBuckets> cosine_hist{};
  // Top-k overlap samples: overlap fraction = overlap_pages / overlap_base.
  uint64_t overlap_pages = 0;
  uint64_t overlap_base = 0;
};

// Order-preserving map of a float onto uint32 (a < b <=> Key(a) < Key(b), for non-NaN values).
FKV_HOST_DEVICE inline uint32_t OrderedFloatKey(uint32_t bits) {
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
FKV_HOST_DEVICE inline uint32_t OrderedFloatBits(uint32_t key) {
  return (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
}

}  // namespace freekv
