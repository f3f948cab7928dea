// Section "selection": the page selection of one layer (native/src/engine/cuda/selection.cu),
// flat against hierarchical, at Qwen2.5-7B shapes (28 query / 4 KV heads, head dim 128), pages of
// 32 tokens, 32 pages selected (1024 tokens), candidates = the context's pages less 16 sink and
// 16 window pages; contexts 8K .. 1M tokens.
//
// Summaries (bf16 bounds, as the engine keeps them), per KV head and channel:
//   walk:     a slow random walk of the page centre (keys drift, as real keys do) +- a spread;
//   iid:      every page's bounds drawn independently (nothing prunes: the worst case);
//   tied:     walk, but every 5th page repeats (whole groups tie: the lower page must win);
//   constant: every page the same (everything ties);
//   outlier:  walk with a few pages of huge bounds.
// Group bounds by LaunchGroupBounds, checked against a host fold. Before timing, every case's
// hierarchical selection must equal the flat one exactly (same pages, same order), for the mean
// and the max combine; the timed figure is the median of 30 single-layer selections (CUDA
// events), with the pages the hierarchical selection scored. "mean-folded" is the mean combine with
// SelectionParams::fold_mean (the group's 7 query heads folded into 2 score rows): checked like the
// others against its own raw scores, hierarchical, one block and a warp per 4 pages, and reported
// beside the per-head mean (pages of one selection missing from the other: rounding near the k-th
// place only).
#include <algorithm>
#include <cmath>
#include <memory>
#include <cstdlib>
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
      for (int h = 0; h < kHkv; ++h) s[((size_t)p * kHkv + h) * 2 * kD + (p % kD)] = fc::Bf16RoundUp(1e4f);
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

// The selection a host computes from the device's raw scores ([Hq][M] after a flat launch): the
// group combine in double (the engine's order of operations), then the k best per KV head, ties to
// the lower page. An independent check of the combine and the top-k (one block or chunked).
// raw: [Hkv][rows][M] (rows: the query heads per KV head, or 2 folded).
std::vector<int> HostSelect(const std::vector<float>& raw, int M, int combine, int first_page, int rows) {
  const int G = rows;
  std::vector<int> out((size_t)kHkv * kK, -1);
  std::vector<double> v(M);
  std::vector<int> idx(M);
  for (int h = 0; h < kHkv; ++h) {
    std::vector<float> mx(G, -3.4e38f);
    std::vector<double> z(G, 0.0);
    if (combine == fc::kCombineSoftmaxMean)
      for (int g = 0; g < G; ++g) {
        const float* r = raw.data() + (size_t)(h * G + g) * M;
        for (int m = 0; m < M; ++m) mx[g] = std::fmax(mx[g], r[m]);
        for (int m = 0; m < M; ++m) z[g] += std::exp((double)r[m] - (double)mx[g]);
      }
    for (int m = 0; m < M; ++m) {
      double a = 0.0;
      for (int g = 0; g < G; ++g) {
        const double r = raw[(size_t)(h * G + g) * M + m];
        if (combine == fc::kCombineMax) a = g == 0 ? r : std::fmax(a, r);
        else if (combine == fc::kCombineMean) a += r;
        else a += std::exp(r - (double)mx[g]) / z[g];
      }
      v[m] = combine == fc::kCombineMax ? a : a / G;
      idx[m] = m;
    }
    const int kk = std::min(kK, M);
    std::partial_sort(idx.begin(), idx.begin() + kk, idx.end(),
                      [&](int a, int b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
    for (int i = 0; i < kk; ++i) out[(size_t)h * kK + i] = first_page + idx[i];
  }
  return out;
}

const char* CombineName(int c, int fold = 0) {
  return c == fc::kCombineMean ? (fold ? "mean-folded" : "mean") : c == fc::kCombineMax ? "max" : "softmax-mean";
}
}  // namespace

void RunSelection(Bench& B) {
  Json sec = Json::Arr();
  std::vector<int> contexts = B.quick ? std::vector<int>{8192, 131072}
                                      : std::vector<int>{8192, 32768, 131072, 524288, 1048576};
  // FKB_SELECTION_CONTEXTS=1048576[,...]: only these contexts (e.g. one size under a profiler).
  if (const char* env = std::getenv("FKB_SELECTION_CONTEXTS")) {
    contexts.clear();
    for (const char* c = env; *c;) {
      char* end = nullptr;
      const long v = std::strtol(c, &end, 10);
      if (end == c || v < 2048 || v > (1 << 21)) throw std::runtime_error("FKB_SELECTION_CONTEXTS: bad context list");
      contexts.push_back((int)v);
      c = *end == ',' ? end + 1 : end;
    }
  }
  const std::vector<std::string> kinds = {"walk", "iid", "tied", "constant", "outlier"};
  long mismatches = 0;
  std::mt19937_64 rng(12345);
  std::normal_distribution<float> N(0.f, 1.f);
  std::vector<float> q((size_t)kHq * kD);
  for (auto& x : q) x = N(rng);
  Dev<float> dq(q.size());
  CK(cudaMemcpy(dq.p, q.data(), q.size() * sizeof(float), cudaMemcpyHostToDevice));
  auto fetch = [&](const int* d) {
    std::vector<int> v((size_t)kHkv * kK);
    CK(cudaMemcpyAsync(v.data(), d, v.size() * 4, cudaMemcpyDeviceToHost, B.stream));
    CK(cudaStreamSynchronize(B.stream));
    return v;
  };
  auto differ = [](const std::vector<int>& a, const std::vector<int>& b) {
    int d = 0;
    for (size_t i = 0; i < a.size(); ++i) d += a[i] != b[i];
    return d;
  };
  for (int ctx : contexts) {
    const int pages = ctx / 32, M = pages - 2 * kEdge;
    for (const std::string& kind : kinds) {
      // Adversarial kinds are checked for equality at every size but timed only on walk / iid.
      if (!B.TimeLeft(4)) break;
      const std::vector<float> s = MakeSummaries(pages, kind, 1000 + ctx + kind.size());
      const std::vector<float> hg = HostGroups(s, pages);
      // The device keeps the bounds as bf16 (summary.cuh); they are bf16 values, so the copy is exact.
      // Uploaded on the benchmark's stream (non-blocking: a plain cudaMemcpy from pageable memory
      // may still be in flight when a kernel on that stream starts).
      std::vector<__nv_bfloat16> sb(s.size());
      for (size_t i = 0; i < s.size(); ++i) sb[i] = __float2bfloat16_rn(s[i]);
      Dev<__nv_bfloat16> ds(s.size()), dg(hg.size());
      CK(cudaMemcpyAsync(ds.p, sb.data(), sb.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice, B.stream));
      fc::LaunchGroupBounds(ds.p, dg.p, 0, pages, kHkv, kD, 32, B.stream);
      std::vector<__nv_bfloat16> gb(hg.size());
      CK(cudaMemcpyAsync(gb.data(), dg.p, gb.size() * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost, B.stream));
      CK(cudaStreamSynchronize(B.stream));
      std::vector<float> gg(hg.size());
      for (size_t i = 0; i < gb.size(); ++i) gg[i] = __bfloat162float(gb[i]);
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
      Dev<int> sel_flat((size_t)kHkv * kK), sel_hier((size_t)kHkv * kK), sel_one((size_t)kHkv * kK),
          sel_grid((size_t)kHkv * kK);
      p.scratch = scratch.p;
      p.workspace = ws.p;
      std::vector<int> mean_pages;  // the per-head mean's flat selection (beside the folded one)
      for (const auto [combine, fold] : {std::pair{fc::kCombineSoftmaxMean, 0}, std::pair{fc::kCombineMean, 0},
                                         std::pair{fc::kCombineMean, 1}, std::pair{fc::kCombineMax, 0}}) {
        p.combine = combine;
        p.fold_mean = fold;
        const int rows = fc::SelectionRows(p);
        const bool hier = combine != fc::kCombineSoftmaxMean;  // softmax-mean over 7 heads: flat only
        fc::SelectionParams pf = p, ph = p, po = p, pg = p;
        pf.selected = sel_flat.p;
        ph.selected = sel_hier.p;
        ph.groups = dg.p;
        po.selected = sel_one.p;
        po.topk_single = 1;
        pg.selected = sel_grid.p;
        pg.score_grid = 1;
        CK(cudaMemsetAsync(sel_flat.p, 0x7f, sizeof(int) * kHkv * kK, B.stream));
        CK(cudaMemsetAsync(sel_hier.p, 0x7e, sizeof(int) * kHkv * kK, B.stream));
        CK(cudaMemsetAsync(sel_one.p, 0x7d, sizeof(int) * kHkv * kK, B.stream));
        fc::LaunchSelection(pf, B.stream);
        std::vector<float> raw((size_t)kHkv * rows * M);
        CK(cudaMemcpyAsync(raw.data(), scratch.p, raw.size() * 4, cudaMemcpyDeviceToHost, B.stream));
        CK(cudaStreamSynchronize(B.stream));
        const std::vector<int> a = fetch(sel_flat.p), ref = HostSelect(raw, M, combine, kEdge, rows);
        // Folded against per-head: pages of one selection missing from the other, per KV head.
        int fold_missing = -1;
        if (combine == fc::kCombineMean && !fold) mean_pages = a;
        if (fold && !mean_pages.empty()) {
          fold_missing = 0;
          for (int h = 0; h < kHkv; ++h)
            for (int i = 0; i < kK; ++i) {
              const int pg = a[(size_t)h * kK + i];
              bool found = false;
              for (int j = 0; j < kK; ++j) found = found || mean_pages[(size_t)h * kK + j] == pg;
              fold_missing += !found;
            }
        }
        // The scoring launched a warp per 4 pages (score_grid 1): the same raw scores bit for bit.
        fc::LaunchSelection(pg, B.stream);
        std::vector<float> raw_grid(raw.size());
        CK(cudaMemcpyAsync(raw_grid.data(), scratch.p, raw_grid.size() * 4, cudaMemcpyDeviceToHost, B.stream));
        CK(cudaStreamSynchronize(B.stream));
        const int diff_grid = differ(a, fetch(sel_grid.p)) +
                              (std::memcmp(raw.data(), raw_grid.data(), raw.size() * 4) != 0 ? 1000000 : 0);
        fc::LaunchSelection(po, B.stream);
        const std::vector<int> one = fetch(sel_one.p);
        long long scored = 0;
        std::vector<int> b = a;
        if (hier) {
          fc::LaunchSelection(ph, B.stream);
          scored = fc::HierarchicalPagesScored(ph, B.stream);
          b = fetch(sel_hier.p);
        }
        const int diff = differ(a, b), diff_one = differ(a, one), diff_ref = differ(a, ref);
        bool sane = true;  // pages in range, distinct per head
        for (int h = 0; h < kHkv; ++h)
          for (int i = 0; i < kK; ++i) {
            const int pg = a[(size_t)h * kK + i];
            sane = sane && pg >= kEdge && pg < kEdge + M;
            for (int j = 0; j < i; ++j) sane = sane && a[(size_t)h * kK + j] != pg;
          }
        if (diff || diff_one || diff_ref || diff_grid || !sane) ++mismatches;
        const bool timed = kind == "walk" || kind == "iid";
        double flat_us = 0, one_us = 0, hier_us = 0, grid_us = 0;
        if (timed) {
          flat_us = 1e3 * MedianMs(B.stream, 3, 30, [&] { fc::LaunchSelection(pf, B.stream); });
          one_us = 1e3 * MedianMs(B.stream, 3, 30, [&] { fc::LaunchSelection(po, B.stream); });
          grid_us = 1e3 * MedianMs(B.stream, 3, 30, [&] { fc::LaunchSelection(pg, B.stream); });
          if (hier) hier_us = 1e3 * MedianMs(B.stream, 3, 30, [&] { fc::LaunchSelection(ph, B.stream); });
        }
        Json j = Json::Obj();
        j.Set("context", ctx).Set("candidates", M).Set("summaries", kind).Set("combine", CombineName(combine, fold))
            .Set("groups_match_host", Json::Bool(groups_ok)).Set("hier_differ", diff)
            .Set("single_block_differ", diff_one).Set("host_reference_differ", diff_ref)
            .Set("warp_per_4_pages_differ", diff_grid)
            .Set("flat_selection_sane", Json::Bool(sane));
        if (hier) j.Set("hier_pages_scored_per_head", (double)scored / kHkv);
        if (fold_missing >= 0) j.Set("pages_not_in_per_head_mean", fold_missing);
        if (timed) {
          j.Set("flat_us", flat_us).Set("single_block_us", one_us).Set("warp_per_4_pages_us", grid_us);
          if (hier) j.Set("hier_us", hier_us);
        }
        sec.Push(j);
        std::printf("selection ctx %7d %-8s %-12s: groups %s, differ hier %d / one-block %d / host %d / grid %d%s",
                    ctx, kind.c_str(), CombineName(combine, fold), groups_ok ? "ok" : "BAD", diff, diff_one, diff_ref,
                    diff_grid, sane ? "" : " (flat result not sane)");
        if (fold_missing >= 0) std::printf(", %d of %d pages not in the per-head mean's", fold_missing, kHkv * kK);
        if (hier) std::printf(", hier scored %.0f of %d pages/head", (double)scored / kHkv, M);
        if (timed)
          std::printf("; flat %.1f us, one block %.1f us, warp per 4 pages %.1f us, hier %.1f us", flat_us, one_us,
                      grid_us, hier_us);
        std::printf("\n");
        std::fflush(stdout);
        if (timed)
          B.AddRow({"selection", "ctx " + std::to_string(ctx) + " " + kind + " " + CombineName(combine, fold) + ": us", "us",
                    flat_us, 0,
                    "one block " + std::to_string(one_us) + " us, warp per 4 pages " + std::to_string(grid_us) + " us" +
                        (hier ? ", hier " + std::to_string(hier_us) + " us" : std::string())});
      }
      // The batched launch (the engine's): items of several lengths (one block and chunked), combines
      // and a hierarchical one, each against its own single launch.
      if (kind == "walk" && M > 8192) {
        const int lens[4] = {M, 1000, M / 2 + 77, M - 5};
        const int combs[4] = {fc::kCombineSoftmaxMean, fc::kCombineSoftmaxMean, fc::kCombineMean, fc::kCombineMax};
        std::vector<fc::SelectionParams> items(4);
        std::vector<std::unique_ptr<Dev<float>>> scr;
        std::vector<std::unique_ptr<Dev<unsigned long long>>> wss;
        std::vector<std::unique_ptr<Dev<int>>> sel_b, sel_s;
        for (int i = 0; i < 4; ++i) {
          fc::SelectionParams it = p;
          it.num_candidates = lens[i];
          it.first_page = kEdge + (M - lens[i]) / 3;
          it.combine = combs[i];
          it.fold_mean = i == 2;  // folded rows beside per-head ones in one launch
          it.groups = i == 3 ? dg.p : nullptr;
          scr.emplace_back(new Dev<float>(fc::SelectionScratchBytes(it) / 4));
          wss.emplace_back(new Dev<unsigned long long>(fc::SelectionWorkspaceBytes(it) / 8 + 1));
          sel_b.emplace_back(new Dev<int>((size_t)kHkv * kK));
          sel_s.emplace_back(new Dev<int>((size_t)kHkv * kK));
          it.scratch = scr.back()->p;
          it.workspace = wss.back()->p;
          it.selected = sel_s.back()->p;
          fc::LaunchSelection(it, B.stream);
          it.selected = sel_b.back()->p;
          items[i] = it;
        }
        Dev<fc::SelectionParams> ditems(items.size());
        CK(cudaMemcpy(ditems.p, items.data(), sizeof(fc::SelectionParams) * items.size(), cudaMemcpyHostToDevice));
        fc::LaunchSelectionBatch(ditems.p, items.data(), (int)items.size(), B.stream);
        CK(cudaStreamSynchronize(B.stream));
        int bdiff = 0;
        for (int i = 0; i < 4; ++i) bdiff += differ(fetch(sel_b[i]->p), fetch(sel_s[i]->p));
        if (bdiff) ++mismatches;
        std::printf("selection ctx %7d batch of 4 (lengths %d %d %d %d): differ from single launches %d\n", ctx,
                    lens[0], lens[1], lens[2], lens[3], bdiff);
        Json j = Json::Obj();
        j.Set("context", ctx).Set("batch_items", 4).Set("batch_differ", bdiff);
        sec.Push(j);
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
