// Fine-grained correction: per KV head, the mean over its query heads of cos(q_t, q_{t-1}).
// A group whose mean similarity falls below tau has drifted too far for the speculative pages
// (selected with q_{t-1}); it is re-selected with q_t and recalled before attention.
#pragma once

#include <cmath>

namespace freekv::cpu {

inline float GroupCosine(const float* q, const float* q_prev, int group, int D) {
  double acc = 0;
  for (int j = 0; j < group; ++j) {
    const float* a = q + static_cast<size_t>(j) * D;
    const float* b = q_prev + static_cast<size_t>(j) * D;
    double ab = 0, aa = 0, bb = 0;
    for (int d = 0; d < D; ++d) {
      ab += static_cast<double>(a[d]) * b[d];
      aa += static_cast<double>(a[d]) * a[d];
      bb += static_cast<double>(b[d]) * b[d];
    }
    const double den = std::sqrt(aa) * std::sqrt(bb);
    acc += den > 0 ? ab / den : 0.0;
  }
  return static_cast<float>(acc / group);
}

// True when the group must be corrected.
inline bool NeedsCorrection(float mean_cosine, float tau) { return mean_cosine < tau; }

}  // namespace freekv::cpu
