// Section "selection": the page selection of one layer (native/src/engine/cuda/selection.cu),
// flat against hierarchical, at Qwen2.5-7B shapes (28 query / 4 KV heads, head dim 128), pages of
// 32 tokens, 32 pages selected (1024 tokens), candidates = the context's pages less 16 sink and
// 16 window pages; contexts 8K .. 1M tokens.
//
// Summaries (fp32 holding bf16 bounds, as the engine keeps them), per KV head and channel:
//   walk:     a slow random walk of the page centre (keys drift, as real keys do) +- a spread;
//   iid:      every page's bounds drawn independently (nothing prunes: the worst case);
//   tied:     walk, but every 5th page repeats (whole groups tie: the lower page must win);
//   constant: every page the same (everything ties);
//   outlier:  walk with a few pages of huge bounds.
// Group bounds by LaunchGroupBounds, checked against a host fold. Before timing, every case's
// hierarchical selection must equal the flat one exactly (same pages, same order), for the mean
// and the max combine; the timed figure is the median of 30 single-layer selections (CUDA
// events), with the pages the hierarchical selection scored.
#include <cmath>
#include <cstring>
#include <random>

#include "bench.cuh"
#include "selection.cuh"
#include "summary.cuh"

namespace fkbench {
namespace fc = freekv::cuda;

namespace {
constexpr int kHq = 28, kHkv = 4, kD = 128, kK = 32, kEdge = 16;

std::vector<float> MakeSummaries(int pages, const std::string& kind, uint64_t seed) {
  std::vector<float> s((size_t)pages * kHkv * 2 * kD);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> N(0.f, 1.f);
  std::uniform_real_distribution<float> U(0.f, 1.f);
  std::vector<float> w((size_t)kHkv * kD);
  for (auto& x : w) x = N(rng);
  for (int p = 0; p < pages; ++p)
    for (int h = 0; h < kHkv; ++h)
      for (int d = 0; d < kD; ++d) {
        float& c = w[(size_t)h * kD + d];
        float hi, lo;
        if (kind == "iid") {
          hi = 1.2f + 0.5f * U(rng) + 0.3f * N(rng);
          lo = hi - 2.4f - U(rng);
        } else {
          c += 0.25f * N(rng);
          hi = c + 0.6f + 0.15f * U(rng);
          lo = c - 0.6f - 0.15f * U(rng);
        }
        if (kind == "constant") hi = 1.f + 0.01f * d, lo = -1.f;
        float* row = s.data() + ((size_t)p * kHkv + h) * 2 * kD;
        row[d] = fc::Bf16RoundUp(hi);
        row[kD + d] = fc::Bf16RoundDown(lo);
      }
  if (kind == "tied")
    for (int p = 5; p < pages; ++p)
      std::memcpy(s.data() + (size_t)p * kHkv * 2 * kD, s.data() + (size_t)(p % 5) * kHkv * 2 * kD,
                  sizeof(float) * kHkv * 2 * kD);
  if (kind == "outlier")
    for (int p = 7; p < pages; p += std::max(1, pages / 9))
      for (int h = 0; h < kHkv; ++h) s[((size_t)p * kHkv + h) * 2 * kD + (p % kD)] = 1e4f;
  return s;
}

std::vector<float> HostGroups(const std::vector<float>& s, int pages) {
  const size_t per = (size_t)kHkv * 2 * kD;
  const int ng = (pages + 31) / 32;
  std::vector<float> g((size_t)ng * per);
  for (int p = 0; p < pages; ++p)
    for (size_t i = 0; i < per; ++i) {
      float& x = g[(size_t)(p / 32) * per + i];
      const float y = s[(size_t)p * per + i];
      const bool hi = (i % (2 * kD)) < (size_t)kD;
      if (p % 32 == 0) x = y;
      else if (hi ? y > x : y < x) x = y;
    }
  return g;
}

template <class T>
struct Dev {
  T* p = nullptr;
  explicit Dev(size_t n) { CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T))); }
  ~Dev() { cudaFree(p); }
};
}  // namespace

void RunSelection(Bench& B) {
  Json sec = Json::Arr();
  const std::vector<int> contexts = B.quick ? std::vector<int>{8192, 32768}
                                            : std::vector<int>{8192, 32768, 131072, 524288, 1048576};
  const std::vector<std::string> kinds = {"walk", "iid", "tied", "constant", "outlier"};
  long mismatches = 0;
  std::mt19937_64 rng(12345);
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> q((size_t)kHq * kD);
  for (auto& x : q) x = N(rng);
  Dev<float> dq(q.size());
  CK(cudaMemcpy(dq.p, q.data(), q.size() * sizeof(float), cudaMemcpyHostToDevice));
  for (int ctx : contexts) {
    const int pages = ctx / 32, M = pages - 2 * kEdge;
    for (const std::string& kind : kinds) {
      // Adversarial kinds are checked for equality at every size but timed only on walk / iid.
      if (!B.TimeLeft(4)) break;
      const std::vector<float> s = MakeSummaries(pages, kind, 1000 + ctx + kind.size());
      const std::vector<float> hg = HostGroups(s, pages);
      Dev<float> ds(s.size()), dg(hg.size());
      CK(cudaMemcpy(ds.p, s.data(), s.size() * sizeof(float), cudaMemcpyHostToDevice));
      fc::LaunchGroupBounds(ds.p, dg.p, 0, pages, kHkv, kD, 32, B.stream);
      std::vector<float> gg(hg.size());
      CK(cudaMemcpyAsync(gg.data(), dg.p, gg.size() * sizeof(float), cudaMemcpyDeviceToHost, B.stream));
      CK(cudaStreamSynchronize(B.stream));
      const bool groups_ok = std::memcmp(gg.data(), hg.data(), gg.size() * sizeof(float)) == 0;
      if (!groups_ok) ++mismatches;
      fc::SelectionParams p;
      p.q = dq.p;
      p.summaries = ds.p;
      p.first_page = kEdge;
      p.num_candidates = M;
      p.q_heads = kHq;
      p.kv_heads = kHkv;
      p.head_dim = kD;
      p.k = kK;
      Dev<float> scratch(fc::SelectionScratchBytes(p) / 4);
      Dev<unsigned long long> ws(fc::SelectionWorkspaceBytes(p) / 8 + 1);
      Dev<int> sel_flat((size_t)kHkv * kK), sel_hier((size_t)kHkv * kK);
      p.scratch = scratch.p;
      p.workspace = ws.p;
      for (int combine : {fc::kCombineMean, fc::kCombineMax}) {
        p.combine = combine;
        fc::SelectionParams pf = p, ph = p;
        pf.selected = sel_flat.p;
        ph.selected = sel_hier.p;
        ph.groups = dg.p;
        CK(cudaMemsetAsync(sel_flat.p, 0x7f, sizeof(int) * kHkv * kK, B.stream));
        CK(cudaMemsetAsync(sel_hier.p, 0x7e, sizeof(int) * kHkv * kK, B.stream));
        fc::LaunchSelection(pf, B.stream);
        fc::LaunchSelection(ph, B.stream);
        const long long scored = fc::HierarchicalPagesScored(ph, B.stream);
        std::vector<int> a((size_t)kHkv * kK), b(a.size());
        CK(cudaMemcpy(a.data(), sel_flat.p, a.size() * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(b.data(), sel_hier.p, b.size() * 4, cudaMemcpyDeviceToHost));
        int diff = 0;
        for (size_t i = 0; i < a.size(); ++i) diff += a[i] != b[i];
        bool sane = true;  // pages in range, distinct per head
        for (int h = 0; h < kHkv; ++h)
          for (int i = 0; i < kK; ++i) {
            const int pg = a[(size_t)h * kK + i];
            sane = sane && pg >= kEdge && pg < kEdge + M;
            for (int j = 0; j < i; ++j) sane = sane && a[(size_t)h * kK + j] != pg;
          }
        if (diff || !sane) ++mismatches;
        const bool timed = (kind == "walk" || kind == "iid") && combine == fc::kCombineMean;
        double flat_us = 0, hier_us = 0;
        if (timed) {
          flat_us = 1e3 * MedianMs(B.stream, 3, 30, [&] { fc::LaunchSelection(pf, B.stream); });
          hier_us = 1e3 * MedianMs(B.stream, 3, 30, [&] { fc::LaunchSelection(ph, B.stream); });
        }
        Json j = Json::Obj();
        j.Set("context", ctx).Set("candidates", M).Set("summaries", kind)
            .Set("combine", combine == fc::kCombineMean ? "mean" : "max")
            .Set("groups_match_host", Json::Bool(groups_ok)).Set("selected_differ", diff)
            .Set("flat_selection_sane", Json::Bool(sane))
            .Set("hier_pages_scored_per_head", (double)scored / kHkv);
        if (timed) j.Set("flat_us", flat_us).Set("hier_us", hier_us);
        sec.Push(j);
        std::printf("selection ctx %7d %-8s %-4s: groups %s, differ %d%s, hier scored %.0f of %d pages/head", ctx,
                    kind.c_str(), combine == fc::kCombineMean ? "mean" : "max", groups_ok ? "ok" : "BAD", diff,
                    sane ? "" : " (flat result not sane)", (double)scored / kHkv, M);
        if (timed) std::printf("; flat %.1f us, hier %.1f us", flat_us, hier_us);
        std::printf("\n");
        std::fflush(stdout);
        if (timed)
          B.AddRow({"selection", "ctx " + std::to_string(ctx) + " " + kind + ": flat / hier us", "us", flat_us, 0,
                    "hier " + std::to_string(hier_us) + " us, " + std::to_string(scored / kHkv) + " pages scored"});
      }
    }
  }
  Json top = Json::Obj();
  top.Set("shape", "28 q / 4 kv heads, D 128, k 32 pages, 16 sink + 16 window pages excluded")
      .Set("cases", sec).Set("mismatches", mismatches);
  B.json.Set("selection", top);
  if (mismatches) throw std::runtime_error("selection: " + std::to_string(mismatches) + " cases differ");
}

}  // namespace fkbench
