#include "engine/cpu/Selection.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "engine/cpu/Simd.h"
#include "engine/cpu/Summary.h"

namespace freekv::cpu {

void CombineGroup(GroupCombine how, const float* scores, int group, int n, std::vector<double>& combined) {
  combined.assign(n, 0.0);
  if (n == 0) return;
  auto at = [&](int i, int j) { return scores[static_cast<size_t>(i) * group + j]; };
  if (how == GroupCombine::Max) {
    for (int i = 0; i < n; ++i) {
      double m = at(i, 0);
      for (int j = 1; j < group; ++j) m = std::max(m, static_cast<double>(at(i, j)));
      combined[i] = m;
    }
    return;
  }
  std::vector<double> acc(n, 0.0), e;
  for (int j = 0; j < group; ++j) {
    if (how == GroupCombine::Mean) {
      for (int i = 0; i < n; ++i) acc[i] += at(i, j);
    } else {
      float m = at(0, j);
      for (int i = 1; i < n; ++i) m = std::max(m, at(i, j));
      e.resize(n);
      double z = 0;
      for (int i = 0; i < n; ++i) z += (e[i] = std::exp(static_cast<double>(at(i, j)) - m));
      for (int i = 0; i < n; ++i) acc[i] += e[i] / z;
    }
  }
  for (int i = 0; i < n; ++i) combined[i] = acc[i] / group;
}

std::vector<int> TopK(const std::vector<double>& combined, int k) {
  const int n = static_cast<int>(combined.size());
  k = std::min(k, n);
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  auto better = [&](int a, int b) { return combined[a] > combined[b] || (combined[a] == combined[b] && a < b); };
  if (k < n) std::nth_element(idx.begin(), idx.begin() + k, idx.end(), better);
  idx.resize(k);
  std::sort(idx.begin(), idx.end(), better);
  return idx;
}

std::vector<int> SelectPages(const PageGeometry& g, GroupCombine how, const uint16_t* summaries, int h, const float* q,
                             int c0, int c1, std::vector<double>& combined) {
  const int n = std::max(0, c1 - c0);
  const int group = g.Hq / g.Hkv;
  if (n == 0) {
    combined.clear();
    return {};
  }
  // One scan of the candidates' summaries, each read once for all query heads of the group.
  thread_local std::vector<float> scores;
  scores.resize(static_cast<size_t>(n) * group);
  const size_t per_page = SummaryRow(g);
  const float* qg = q + static_cast<size_t>(h) * group * g.D;
  simd::Get().score_pages_bf16(qg, group, summaries + c0 * per_page, per_page, n, g.D, scores.data());
  CombineGroup(how, scores.data(), group, n, combined);
  auto top = TopK(combined, g.select_pages);
  for (auto& i : top) i += c0;
  return top;
}

}  // namespace freekv::cpu
