// The device counters of a session: kLayerWords 64-bit words per layer ([layers][kLayerWords]),
// zeroed at creation, updated by atomics in the kernels (residency diff, correction check,
// attention table) and read by GetStats, so no decode step waits for them. What they count is
// engine/RetrievalStats.h's LayerStats.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "engine/RetrievalStats.h"

namespace freekv::cuda {

enum LayerWord {
  kSelected = 0,      // pages chosen by every selection (residency diff: counters[0..2])
  kHits = 1,
  kMisses = 2,
  kCorrections = 3,   // groups flagged by the correction check
  kCosSamples = 4,    // adjacent-query cosine samples
  kCosSum = 5,        // double: sum of the samples
  kCosSumSq = 6,      // double: sum of their squares
  kCosMin = 7,        // 0: no sample; else 1 + (0xffffffff - OrderedFloatKey(min)) (atomicMax)
  kOverlapPages = 8,  // top-k overlap: |S_t & S_{t-1}|, then |S_t| (attention table)
  kOverlapBase = 9,
  kCosBelowTau = 10,  // samples below the session's tau
  kCosHist = 11,      // kCosineBuckets counts
  kLayerWords = kCosHist + kCosineBuckets,
};

// One adjacent-query cosine sample into a layer's words.
__device__ inline void AddCosineSample(unsigned long long* w, float c, float tau) {
  atomicAdd(&w[kCosSamples], 1ull);
  if (c < tau) atomicAdd(&w[kCosBelowTau], 1ull);
  atomicAdd(reinterpret_cast<double*>(&w[kCosSum]), (double)c);
  atomicAdd(reinterpret_cast<double*>(&w[kCosSumSq]), (double)c * (double)c);
  const uint32_t key = OrderedFloatKey(__float_as_uint(c));
  atomicMax(&w[kCosMin], 1ull + (unsigned long long)(0xffffffffu - key));
  atomicAdd(&w[kCosHist + CosineBucket(c)], 1ull);
}

// The minimum a kCosMin word holds (0 for a word without samples).
inline float CosineMinOf(unsigned long long word) {
  if (word == 0) return 0.f;
  const uint32_t key = 0xffffffffu - (uint32_t)(word - 1);
  const uint32_t bits = OrderedFloatBits(key);
  float f;
  static_assert(sizeof f == sizeof bits, "float is 32 bits");
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace freekv::cuda
