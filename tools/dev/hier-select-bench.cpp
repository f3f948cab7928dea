// Micro-benchmark of one KV head's page selection, flat scan vs hierarchical (branch and bound
// over the group bounds), as a function of the candidate page count: sets
// kHierarchicalMinPages (native/src/engine/cpu/HierSelection.h).
//
//   g++ -O2 -std=c++17 -fopenmp -Inative/src tools/dev/hier-select-bench.cpp \
//       native/src/engine/cpu/{Selection,HierSelection,Simd}.cpp -o /tmp/hier-select-bench
//   /tmp/hier-select-bench [drift] [cold]
//
// cold: 64 MiB are read between repetitions, so the summaries come from memory as in a step that
// went through the other layers first (a layer's summaries at 64K tokens are 8 MiB).
//
// Keys: per token a slowly drifting mean (a random walk over the context, as real keys are
// locally similar) plus noise; queries: a random direction. One query head group of 4 heads
// (Llama-3.1-8B), D = 128, k = 56 pages (1792 tokens), pages of 32 tokens, max/min summaries.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/HierSelection.h"
#include "engine/cpu/KvElement.h"
#include "engine/cpu/Selection.h"
#include "engine/cpu/Summary.h"

using namespace freekv;
using namespace freekv::cpu;

int main(int argc, char** argv) {
  const double drift = argc > 1 ? std::atof(argv[1]) : 0.05;
  const bool cold = argc > 2 && std::string(argv[2]) == "cold";
  std::vector<char> evict(cold ? 64 << 20 : 0, 1);
  long sink = 0;
  PageGeometry g;
  g.P = 32;
  g.Hkv = 1;
  g.Hq = 4;
  g.D = 128;
  g.select_pages = 56;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (int n : {64, 128, 192, 256, 384, 512, 1024, 2048, 4096, 6144, 8192, 16384, 32768}) {
    const size_t row = SummaryRow(g);
    std::vector<uint16_t> sums(static_cast<size_t>(n) * row);
    std::vector<float> mean(g.D);
    for (auto& m : mean) m = nd(rng);
    for (int p = 0; p < n; ++p) {
      std::vector<float> hi(g.D, -1e30f), lo(g.D, 1e30f);
      for (int t = 0; t < g.P; ++t) {
        for (int d = 0; d < g.D; ++d) {
          mean[d] += static_cast<float>(drift) * nd(rng);
          const float k = mean[d] + 0.5f * nd(rng);
          hi[d] = std::max(hi[d], k);
          lo[d] = std::min(lo[d], k);
        }
      }
      for (int d = 0; d < g.D; ++d) {
        sums[static_cast<size_t>(p) * row + d] = BF16RoundUp(hi[d]);
        sums[static_cast<size_t>(p) * row + g.D + d] = BF16RoundDown(lo[d]);
      }
    }
    std::vector<uint16_t> groups;
    RebuildGroups(g, sums.data(), n, groups);
    std::vector<double> tf, th;
    long scored = 0;
    bool same = true;
    const int reps = std::max(5, 20000 / n);
    for (int r = 0; r < reps; ++r) {
      std::vector<float> q(static_cast<size_t>(g.Hq) * g.D);
      for (auto& x : q) x = nd(rng);
      for (size_t i = 0; i < evict.size(); i += 64) sink += evict[i]++;
      auto t0 = std::chrono::steady_clock::now();
      auto a = SelectHead(g, GroupCombine::Mean, sums.data(), groups.data(), 0, q.data(), 0, n, false);
      auto t1 = std::chrono::steady_clock::now();
      auto b = SelectHead(g, GroupCombine::Mean, sums.data(), groups.data(), 0, q.data(), 0, n, true);
      auto t2 = std::chrono::steady_clock::now();
      tf.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      th.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
      scored += b.pages_scored;
      same = same && a.chosen == b.chosen;
    }
    std::sort(tf.begin(), tf.end());
    std::sort(th.begin(), th.end());
    std::printf("candidates %6d: flat %8.1f us, hierarchical %8.1f us (pages scored %6.0f), same %s\n", n, tf[tf.size() / 2],
                th[th.size() / 2], static_cast<double>(scored) / reps, same ? "yes" : "NO");
  }
  if (sink == 1) std::puts("");
}
