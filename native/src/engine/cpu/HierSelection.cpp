#include "engine/cpu/HierSelection.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "engine/cpu/KvElement.h"
#include "engine/cpu/Selection.h"
#include "engine/cpu/Simd.h"
#include "engine/cpu/Summary.h"

namespace freekv::cpu {

namespace {

inline float Bf(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// "a before b" in the selection order: higher combined score first, then the lower page.
inline bool Better(const std::pair<double, int>& a, const std::pair<double, int>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

}  // namespace

void FoldPageIntoGroup(const PageGeometry& g, const uint16_t* summaries, int page, std::vector<uint16_t>& groups) {
  const size_t per = SummaryRow(g);
  const size_t gi = GroupOf(page);
  const bool first = page % kPagesPerGroup == 0 || groups.size() < (gi + 1) * per;
  if (groups.size() < (gi + 1) * per) groups.resize((gi + 1) * per);
  const uint16_t* src = summaries + static_cast<size_t>(page) * per;
  uint16_t* dst = groups.data() + gi * per;
  if (first) {
    std::memcpy(dst, src, per * sizeof(uint16_t));
    return;
  }
  for (int d = 0; d < g.D; ++d) {
    if (Bf(src[d]) > Bf(dst[d]) || std::isnan(Bf(src[d]))) dst[d] = src[d];
    if (Bf(src[g.D + d]) < Bf(dst[g.D + d]) || std::isnan(Bf(src[g.D + d]))) dst[g.D + d] = src[g.D + d];
  }
}

void RebuildGroups(const PageGeometry& g, const uint16_t* summaries, int pages, std::vector<uint16_t>& groups) {
  groups.clear();
  for (int p = 0; p < pages; ++p) FoldPageIntoGroup(g, summaries, p, groups);
}

double Combiner::operator()(const float* s) const {
  if (how == GroupCombine::Max) {
    double m = s[0];
    for (int j = 1; j < group; ++j) m = std::max(m, static_cast<double>(s[j]));
    return m;
  }
  if (how == GroupCombine::Mean) {
    double acc = 0.0;
    for (int j = 0; j < group; ++j) acc += s[j];
    return acc / group;
  }
  if (raw) return s[0];
  double acc = 0.0;
  for (int j = 0; j < group; ++j) acc += std::exp(static_cast<double>(s[j]) - shift[j]) * inv_norm[j];
  return acc / group;
}

HeadSelection SelectPagesHierarchical(const PageGeometry& g, GroupCombine how, const uint16_t* summaries,
                                      const uint16_t* groups, int h, const float* q, int c0, int c1) {
  HeadSelection r;
  const int group = g.Hq / g.Hkv;
  const size_t per = SummaryRow(g);
  r.hierarchical = true;
  r.g = &g;
  r.summaries = summaries;
  r.q = q + static_cast<size_t>(h) * group * g.D;
  r.h = h;
  r.c0 = c0;
  r.c1 = c1;
  const int n = std::max(0, c1 - c0);
  if (n == 0) return r;
  const int k = std::min(g.select_pages, n);
  const auto& kern = simd::Get();

  // 1. Every group overlapping [c0, c1): its per-head bounds (an upper bound of every page in
  //    it, in range or not) and its count of candidate pages.
  const int ga = c0 / kPagesPerGroup, gb = (c1 - 1) / kPagesPerGroup + 1, ng = gb - ga;
  std::vector<float> ub(static_cast<size_t>(ng) * group);
  kern.score_pages_bf16(r.q, group, groups + static_cast<size_t>(ga) * per, per, ng, g.D, ub.data());
  Combiner& cb = r.combiner;
  cb.how = how;
  cb.group = group;
  if (how == GroupCombine::SoftmaxMean) {
    cb.raw = group == 1;
    if (!cb.raw) {
      // The softmax over the group bounds (each counted once per candidate page) gives the heads'
      // weights: exp(s - shift_j) / norm_j.
      cb.shift.assign(group, -std::numeric_limits<double>::infinity());
      cb.inv_norm.assign(group, 0.0);
      for (int i = 0; i < ng; ++i)
        for (int j = 0; j < group; ++j) cb.shift[j] = std::max(cb.shift[j], static_cast<double>(ub[static_cast<size_t>(i) * group + j]));
      for (int j = 0; j < group; ++j) {
        double z = 0;
        for (int i = 0; i < ng; ++i) {
          const int lo = std::max(c0, (ga + i) * kPagesPerGroup), hi = std::min(c1, (ga + i + 1) * kPagesPerGroup);
          z += (hi - lo) * std::exp(static_cast<double>(ub[static_cast<size_t>(i) * group + j]) - cb.shift[j]);
        }
        cb.inv_norm[j] = z > 0 && std::isfinite(z) ? 1.0 / z : 0.0;
      }
    }
  }
  std::vector<std::pair<double, int>> order(ng);  // (combined bound, group)
  for (int i = 0; i < ng; ++i) order[i] = {cb(ub.data() + static_cast<size_t>(i) * group), ga + i};
  std::sort(order.begin(), order.end(), Better);
  r.groups_scored = ng;

  // 2. Groups best bound first; a group whose bound is below the k-th best page found so far
  //    cannot hold a page of the top-k (nor can any later group): stop. A bound equal to it can
  //    (a tie to a lower page), so that group is still scored.
  std::vector<std::pair<double, int>> heap;  // the best k so far; front: the worst of them
  heap.reserve(k + 1);
  std::vector<float> s(static_cast<size_t>(kPagesPerGroup) * group);
  for (const auto& [bound, gi] : order) {
    if (static_cast<int>(heap.size()) == k && bound < heap.front().first) break;
    const int lo = std::max(c0, gi * kPagesPerGroup), hi = std::min(c1, (gi + 1) * kPagesPerGroup);
    kern.score_pages_bf16(r.q, group, summaries + static_cast<size_t>(lo) * per, per, hi - lo, g.D, s.data());
    for (int p = lo; p < hi; ++p) {
      const std::pair<double, int> e{cb(s.data() + static_cast<size_t>(p - lo) * group), p};
      if (static_cast<int>(heap.size()) < k) {
        heap.push_back(e);
        std::push_heap(heap.begin(), heap.end(), Better);
      } else if (Better(e, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), Better);
        heap.back() = e;
        std::push_heap(heap.begin(), heap.end(), Better);
      }
    }
    r.pages_scored += hi - lo;
  }
  std::sort(heap.begin(), heap.end(), Better);
  r.chosen.reserve(heap.size());
  for (const auto& e : heap) r.chosen.push_back(e.second);
  return r;
}

HeadSelection SelectHead(const PageGeometry& g, GroupCombine how, const uint16_t* summaries, const uint16_t* groups,
                         int h, const float* q, int c0, int c1, bool hier) {
  if (hier && groups) return SelectPagesHierarchical(g, how, summaries, groups, h, q, c0, c1);
  HeadSelection r;
  r.g = &g;
  r.summaries = summaries;
  r.h = h;
  r.c0 = c0;
  r.c1 = c1;
  r.chosen = SelectPages(g, how, summaries, h, q, c0, c1, r.combined);
  r.pages_scored = std::max(0, c1 - c0);
  return r;
}

}  // namespace freekv::cpu
