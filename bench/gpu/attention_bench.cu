// Section 3: paged decode attention (native/cuda/attention_decode.cuh) GB/s against HBM.
//
// First a float64 CPU reference on a small case (two sequences with different page counts, a
// partial last page, per-head page orders, random slots, output poisoned before the run), then
// the timing cases: bytes = the K and V bytes the attention must read (every attended token,
// every KV head) over the median time, against the D2D copy bandwidth measured in section 1.
#include <cmath>
#include <numeric>
#include <random>

#include "attention_decode.cuh"
#include "bench.cuh"

namespace fkbench {
namespace fc = freekv::cuda;

namespace {
constexpr int kHq = 32, kH = 8, kD = 128, kP = 32;
constexpr size_t kPage = size_t(2) * kP * kH * kD;  // elements of one NHD page

struct AttnCase {
  int batch = 0, pages = 0, slots = 0;  // pages attended per (b, head); slots per pool
  int last_tokens = kP;                 // valid tokens of the last attended page
  std::vector<bf16*> pools;             // device
  bf16** dpools = nullptr;
  int *slot = nullptr, *tokens = nullptr, *num = nullptr;
  std::vector<int> h_slot, h_tokens, h_num;
  float *q = nullptr, *out = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  fc::DecodeAttentionParams p;

  // seed-driven tables: page i of (b, h) sits in a random slot (a permutation per (b, h))
  void Build(int b_, int pages_, int slots_, int last, const std::vector<int>& pages_per_b, uint64_t seed,
             cudaStream_t s) {
    batch = b_, pages = pages_, slots = slots_, last_tokens = last;
    pools.resize(batch);
    for (int b = 0; b < batch; ++b) {
      CK(cudaMalloc(&pools[b], slots * kPage * 2));
      FillBf16(pools[b], slots * kPage, seed * 31 + b, 1.0f, s);
    }
    CK(cudaMalloc(&dpools, sizeof(bf16*) * batch));
    CK(cudaMemcpy(dpools, pools.data(), sizeof(bf16*) * batch, cudaMemcpyHostToDevice));
    std::mt19937_64 rng(seed);
    h_slot.assign(size_t(batch) * kH * pages, 0);
    h_tokens.assign(size_t(batch) * kH * pages, 0);
    h_num.assign(size_t(batch) * kH, 0);
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < kH; ++h) {
        int n = pages_per_b.empty() ? pages : pages_per_b[b];
        std::vector<int> perm(slots);
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        h_num[size_t(b) * kH + h] = n;
        for (int i = 0; i < n; ++i) {
          h_slot[(size_t(b) * kH + h) * pages + i] = perm[i];
          h_tokens[(size_t(b) * kH + h) * pages + i] = i == n - 1 ? last_tokens : kP;
        }
      }
    CK(cudaMalloc(&slot, h_slot.size() * 4));
    CK(cudaMalloc(&tokens, h_tokens.size() * 4));
    CK(cudaMalloc(&num, h_num.size() * 4));
    CK(cudaMemcpy(slot, h_slot.data(), h_slot.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(tokens, h_tokens.data(), h_tokens.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(num, h_num.data(), h_num.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&q, sizeof(float) * batch * kHq * kD));
    CK(cudaMalloc(&out, sizeof(float) * batch * kHq * kD));
    std::vector<float> hq(size_t(batch) * kHq * kD);
    for (size_t i = 0; i < hq.size(); ++i) hq[i] = float(int(HashWord(seed + 5, i) % 2001) - 1000) / 500.f;
    CK(cudaMemcpy(q, hq.data(), hq.size() * 4, cudaMemcpyHostToDevice));
    p = fc::DecodeAttentionParams{};
    p.q = q;
    p.out = out;
    p.pools = dpools;
    p.page_slot = slot;
    p.page_tokens = tokens;
    p.num_pages = num;
    p.batch = batch;
    p.q_heads = kHq;
    p.kv_heads = kH;
    p.head_dim = kD;
    p.page_size = kP;
    p.max_pages = pages;
    p.scale = 1.0f / std::sqrt(float(kD));
    ws_bytes = fc::DecodeAttentionWorkspaceBytes(p);
    if (ws_bytes) CK(cudaMalloc(&ws, ws_bytes));
  }
  void Run(cudaStream_t s) { fc::LaunchDecodeAttention(p, ws, ws_bytes, s); }
  double KvBytes() const {
    double tok = 0;
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < kH; ++h) tok += (h_num[size_t(b) * kH + h] - 1) * kP + last_tokens;
    return tok * kD * 2 * 2;
  }
  void Free() {
    for (bf16* x : pools) cudaFree(x);
    cudaFree(dpools), cudaFree(slot), cudaFree(tokens), cudaFree(num), cudaFree(q), cudaFree(out);
    if (ws) cudaFree(ws);
  }
};

double CheckAgainstFp64(AttnCase& c, cudaStream_t s) {
  CK(cudaMemsetAsync(c.out, 0xFF, sizeof(float) * c.batch * kHq * kD, s));  // NaN poison
  c.Run(s);
  CK(cudaStreamSynchronize(s));
  std::vector<float> out(size_t(c.batch) * kHq * kD), q(out.size());
  CK(cudaMemcpy(out.data(), c.out, out.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(q.data(), c.q, q.size() * 4, cudaMemcpyDeviceToHost));
  std::vector<bf16> pool(c.slots * kPage);
  double num = 0, den = 0;
  const int G = kHq / kH;
  for (int b = 0; b < c.batch; ++b) {
    CK(cudaMemcpy(pool.data(), c.pools[b], pool.size() * 2, cudaMemcpyDeviceToHost));
    for (int h = 0; h < kH; ++h) {
      int n = c.h_num[size_t(b) * kH + h];
      for (int g = 0; g < G; ++g) {
        const float* qq = &q[(size_t(b) * kHq + h * G + g) * kD];
        std::vector<double> logits, acc(kD, 0.0);
        std::vector<const bf16*> vs;
        for (int i = 0; i < n; ++i) {
          int sl = c.h_slot[(size_t(b) * kH + h) * c.pages + i], nt = c.h_tokens[(size_t(b) * kH + h) * c.pages + i];
          for (int t = 0; t < nt; ++t) {
            const bf16* k = &pool[sl * kPage + (size_t(0) * kP + t) * kH * kD + size_t(h) * kD];
            const bf16* v = &pool[sl * kPage + (size_t(1) * kP + t) * kH * kD + size_t(h) * kD];
            double d = 0;
            for (int x = 0; x < kD; ++x) d += double(qq[x]) * double(__bfloat162float(k[x]));
            logits.push_back(d / std::sqrt(double(kD)));
            vs.push_back(v);
          }
        }
        double m = -1e300, z = 0;
        for (double l : logits) m = std::max(m, l);
        for (size_t i = 0; i < logits.size(); ++i) {
          double w = std::exp(logits[i] - m);
          z += w;
          for (int x = 0; x < kD; ++x) acc[x] += w * double(__bfloat162float(vs[i][x]));
        }
        const float* o = &out[(size_t(b) * kHq + h * G + g) * kD];
        for (int x = 0; x < kD; ++x) {
          double r = acc[x] / z, d = double(o[x]) - r;
          if (!std::isfinite(o[x])) throw std::runtime_error("attention check: unwritten or non-finite output");
          num += d * d;
          den += r * r;
        }
      }
    }
  }
  return std::sqrt(num / den);
}
}  // namespace

void RunAttention(Bench& B) {
  cudaStream_t s = B.stream;
  Json sec = Json::Obj(), cases = Json::Arr();
  {  // correctness: 2 sequences, 37 and 20 pages, partial last page of 13 tokens, 48 slots
    AttnCase c;
    c.Build(2, 37, 48, 13, {37, 20}, 41, s);
    double rel = CheckAgainstFp64(c, s);
    c.Free();
    sec.Set("check_rel_err_vs_fp64", rel);
    if (!(rel < 2e-3)) throw std::runtime_error("attention check failed: relative error " + std::to_string(rel));
    std::cout << "[attention] fp64 check: rel err " << rel << std::endl;
  }
  struct Shape { const char* name; int batch, pages, slots; };
  std::vector<Shape> shapes = {{"budget 2048 tokens, batch 16", 16, 64, 96},
                               {"budget 2048 tokens, batch 4", 4, 64, 96},
                               {"dense 32K, batch 4", 4, 1024, 1024},
                               {"dense 128K, batch 1", 1, 4096, 4096},
                               {"dense 128K, batch 4", 4, 4096, 4096}};
  if (B.quick) shapes.resize(3);
  for (const Shape& sh : shapes) {
    AttnCase c;
    c.Build(sh.batch, sh.pages, sh.slots, kP, {}, 50 + sh.pages, s);
    double ms = MedianMs(s, 3, 20, [&] { c.Run(s); });
    double gbs = c.KvBytes() / ms / 1e6;
    Json j = Json::Obj();
    j.Set("name", sh.name).Set("batch", sh.batch).Set("tokens_per_head", sh.pages * kP).Set("kv_bytes", c.KvBytes());
    j.Set("ms", ms).Set("GBps", gbs).Set("fraction_of_hbm", gbs / B.hbm_gbs);
    j.Set("pages_per_split", fc::DecodeAttentionPagesPerSplit(c.p));
    cases.Push(j);
    B.AddRow({"attention", std::string("decode attention, ") + sh.name, "GB/s", gbs, B.hbm_gbs,
              std::to_string(ms * 1e3).substr(0, 6) + " us"});
    c.Free();
  }
  sec.Set("cases", cases);
  B.json.Set("attention", sec);
}

}  // namespace fkbench
