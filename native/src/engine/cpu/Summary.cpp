#include "engine/cpu/Summary.h"

#include <cmath>
#include <limits>

#include "engine/cpu/KvElement.h"

namespace freekv::cpu {

void SummarisePage(const PageGeometry& g, SummaryKind kind, const uint8_t* nhd_page, uint16_t* out) {
  std::vector<float> keys(static_cast<size_t>(g.P) * g.D), bounds(2 * static_cast<size_t>(g.D));
  for (int h = 0; h < g.Hkv; ++h) {
    float* hi = bounds.data();
    float* lo = hi + g.D;
    for (int d = 0; d < g.D; ++d) {
      hi[d] = -std::numeric_limits<float>::infinity();
      lo[d] = std::numeric_limits<float>::infinity();
    }
    for (int i = 0; i < g.P; ++i) {
      float* k = keys.data() + static_cast<size_t>(i) * g.D;
      LoadRow(g.dtype, nhd_page + g.NhdK(i, h), k, g.D);
      for (int d = 0; d < g.D; ++d) {
        hi[d] = std::max(hi[d], k[d]);
        lo[d] = std::min(lo[d], k[d]);
      }
    }
    if (kind == SummaryKind::CuboidMean) {
      for (int d = 0; d < g.D; ++d) {
        const float c = 0.5f * (hi[d] + lo[d]);
        double acc = 0;
        for (int i = 0; i < g.P; ++i) acc += std::fabs(keys[static_cast<size_t>(i) * g.D + d] - c);
        const float r = static_cast<float>(acc / g.P);
        hi[d] = c + r;
        lo[d] = c - r;
      }
    }
    uint16_t* o = out + static_cast<size_t>(h) * 2 * g.D;
    for (int d = 0; d < g.D; ++d) {
      o[d] = BF16RoundUp(hi[d]);
      o[g.D + d] = BF16RoundDown(lo[d]);
    }
  }
}

}  // namespace freekv::cpu
