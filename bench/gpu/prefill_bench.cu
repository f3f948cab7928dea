// Section `prefill`: the tensor-core causal prefill attention (native/src/engine/cuda/
// attention_prefill_flash.cuh) checked against float64, then its TFLOP/s next to the bf16 peak.
// Both kernels behind LaunchFlashPrefillAttention are checked and timed side by side: the mma.sync
// one (every head dim) and, where the device has it (compute capability 9.0), the sm_90a wgmma one
// (head dim 128), each forced through FlashPrefillParams::path.
//
// (a) Check: fresh random bf16 Q and K/V pages (never zeros) for several shapes: head_dim 64 and
//     128, GQA groups 1, 3, 4, 8, ragged n (not a multiple of the 128-row tile), chunk offsets 0,
//     page aligned and not, a chunk after a long context, pages of 16/32/64 tokens, a peaky
//     softmax (large q). Outputs are poisoned with NaN before each run and every element must be
//     finite after it. A float64 CPU reference over a sample of query rows (all heads) gives
//     max |out - ref| / max |ref| per case, fp32 and bf16 outputs both. Tolerance 1e-2: K/V and Q
//     are the same bf16 values on both sides, so the kernel's error comes from rounding the
//     softmax probabilities P to bf16 before the PV product (relative 2^-9 per element, as in
//     FlashAttention), fp32 accumulation and ex2.approx; that lands at a few 1e-3. The bf16
//     output adds its own 2^-9 rounding.
// (b) Timing: n = 8K, 32K, 128K (start 0), head_dim 128, 32 query heads, 8 KV heads (GQA 4),
//     pages of 32 tokens; causal FLOPs = 4 * D * Hq * sum over queries of attended keys; CUDA
//     events, warm-up, median. Next to the bf16 GEMM rate (section ceilings, or 790 TFLOP/s).
//     Also D 64 at 32K, the bf16 output at 32K, and the existing per-query-row kernel
//     (LaunchPrefillAttention, fp32 q) at 8K for the speed-up (its outputs compared too).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <random>
#include <set>

#include "attention_prefill.cuh"
#include "attention_prefill_flash.cuh"
#include "bench.cuh"

namespace fkbench {
namespace fc = freekv::cuda;

namespace {
constexpr double kTol = 1e-2;

struct PrefillShape {
  const char* name;
  int d, hq, hkv, n, start, page;
  float q_scale;
};

__global__ void Bf16ToF32Kernel(const bf16* in, float* out, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(in[i]);
}

size_t PageElems(const PrefillShape& s) { return size_t(2) * s.page * s.hkv * s.d; }
size_t NumPages(const PrefillShape& s) { return (size_t(s.start) + s.n + s.page - 1) / s.page; }

double CausalFlops(const PrefillShape& s) {
  double keys = 0;
  for (int i = 0; i < s.n; ++i) keys += double(s.start) + i + 1;
  return 4.0 * s.d * s.hq * keys;
}

// Query rows the reference computes: the ends, tile edges and a seeded random sample.
std::vector<int> SampleRows(int n, int G, uint64_t seed) {
  std::set<int> rows = {0, n - 1};
  if (n > 1) rows.insert(1), rows.insert(n - 2);
  for (int e = 128 / G; e < n && rows.size() < 24; e += 128 / G) rows.insert(e - 1), rows.insert(std::min(e, n - 1));
  std::mt19937_64 rng(seed);
  while (int(rows.size()) < std::min(n, 40)) rows.insert(int(rng() % n));
  return {rows.begin(), rows.end()};
}

struct CheckResult {
  double rel_err = 0, rms_rel = 0;
  bool all_finite = true;
};

// Runs the kernel on fresh random inputs and compares with float64 over sampled rows.
CheckResult CheckCase(const PrefillShape& s, bool bf16_out, fc::FlashPrefillPath path, uint64_t seed, cudaStream_t st,
                      int variant = -1) {
  const size_t qn = size_t(s.n) * s.hq * s.d, pn = NumPages(s) * PageElems(s);
  bf16 *q = nullptr, *pages = nullptr, *ob = nullptr;
  float* of = nullptr;
  CK(cudaMalloc(&q, qn * 2));
  CK(cudaMalloc(&pages, pn * 2));
  FillBf16(q, qn, seed * 7 + 1, s.q_scale, st);
  FillBf16(pages, pn, seed * 7 + 2, 1.0f, st);
  if (bf16_out) {
    CK(cudaMalloc(&ob, qn * 2));
    CK(cudaMemsetAsync(ob, 0xFF, qn * 2, st));  // NaN poison
  } else {
    CK(cudaMalloc(&of, qn * 4));
    CK(cudaMemsetAsync(of, 0xFF, qn * 4, st));
  }
  fc::FlashPrefillParams p;
  p.q = q, p.pages = pages, p.out_f32 = of, p.out_bf16 = ob;
  p.n = s.n, p.start = s.start, p.q_heads = s.hq, p.kv_heads = s.hkv, p.head_dim = s.d, p.page_size = s.page;
  p.scale = 1.0f / std::sqrt(float(s.d));
  p.path = path;
  p.variant = variant;
  fc::LaunchFlashPrefillAttention(p, st);
  CK(cudaStreamSynchronize(st));
  std::vector<bf16> hq(qn), hp(pn);
  std::vector<float> out(qn);
  CK(cudaMemcpy(hq.data(), q, qn * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hp.data(), pages, pn * 2, cudaMemcpyDeviceToHost));
  if (bf16_out) {
    std::vector<bf16> tmp(qn);
    CK(cudaMemcpy(tmp.data(), ob, qn * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < qn; ++i) out[i] = __bfloat162float(tmp[i]);
  } else {
    CK(cudaMemcpy(out.data(), of, qn * 4, cudaMemcpyDeviceToHost));
  }
  cudaFree(q), cudaFree(pages), cudaFree(of), cudaFree(ob);

  CheckResult r;
  for (float v : out) r.all_finite &= std::isfinite(v);  // every element written (NaN poison)
  const int G = s.hq / s.hkv, D = s.d, H = s.hkv, P = s.page;
  const size_t kvs = size_t(P) * H * D;
  std::vector<float> fp(pn), fq(qn);
  for (size_t i = 0; i < pn; ++i) fp[i] = __bfloat162float(hp[i]);
  for (size_t i = 0; i < qn; ++i) fq[i] = __bfloat162float(hq[i]);
  auto kv = [&](int j, int h, int which) { return &fp[(size_t(j / P) * 2 + which) * kvs + (size_t(j % P) * H + h) * D]; };
  double num = 0, den = 0, se = 0, sr = 0;
  std::vector<double> lg, acc(D);
  for (int i : SampleRows(s.n, G, seed)) {
    const int len = s.start + i + 1;
    lg.resize(len);
    for (int hh = 0; hh < s.hq; ++hh) {
      const int h = hh / G;
      const float* qq = &fq[(size_t(i) * s.hq + hh) * D];
      double m = -1e300;
      for (int j = 0; j < len; ++j) {
        const float* k = kv(j, h, 0);
        double d = 0;
        for (int x = 0; x < D; ++x) d += double(qq[x]) * double(k[x]);
        lg[j] = d / std::sqrt(double(D));
        m = std::max(m, lg[j]);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      double z = 0;
      for (int j = 0; j < len; ++j) {
        const double w = std::exp(lg[j] - m);
        z += w;
        const float* v = kv(j, h, 1);
        for (int x = 0; x < D; ++x) acc[x] += w * double(v[x]);
      }
      const float* o = &out[(size_t(i) * s.hq + hh) * D];
      for (int x = 0; x < D; ++x) {
        const double ref = acc[x] / z, e = std::fabs(double(o[x]) - ref);
        if (!std::isfinite(o[x])) num = INFINITY;
        num = std::max(num, e), den = std::max(den, std::fabs(ref));
        se += e * e, sr += ref * ref;
      }
    }
  }
  r.rel_err = den > 0 ? num / den : num;
  r.rms_rel = sr > 0 ? std::sqrt(se / sr) : std::sqrt(se);
  if (!r.all_finite) r.rel_err = INFINITY;
  return r;
}
}  // namespace

void RunPrefill(Bench& B) {
  cudaStream_t st = B.stream;
  Json sec = Json::Obj();

  // FKB_PREFILL_ONE="N[:VARIANT]": only two launches of the sm_90a kernel at n N (D 128, GQA 4,
  // start 0), for a profiler to take the second one (ncu --launch-skip 1 --launch-count 1).
  if (const char* one = std::getenv("FKB_PREFILL_ONE"); one && *one) {
    const int n = std::atoi(one);
    const char* colon = std::strchr(one, ':');
    const int variant = colon ? std::atoi(colon + 1) : -1;
    const PrefillShape s{"", 128, 32, 8, n, 0, 32, 2.f};
    const size_t qn = size_t(n) * 32 * 128;
    bf16 *q = nullptr, *pages = nullptr;
    float* of = nullptr;
    CK(cudaMalloc(&q, qn * 2));
    CK(cudaMalloc(&pages, NumPages(s) * PageElems(s) * 2));
    CK(cudaMalloc(&of, qn * 4));
    FillBf16(q, qn, 77, 2.f, st);
    FillBf16(pages, NumPages(s) * PageElems(s), 78, 1.f, st);
    fc::FlashPrefillParams p;
    p.q = q, p.pages = pages, p.out_f32 = of;
    p.n = n, p.start = 0, p.q_heads = 32, p.kv_heads = 8, p.head_dim = 128, p.page_size = 32;
    p.path = fc::FlashPrefillPath::kWgmma;
    p.variant = variant;
    for (int i = 0; i < 2; ++i) fc::LaunchFlashPrefillAttention(p, st);
    CK(cudaStreamSynchronize(st));
    std::printf("[prefill] two launches at n %d, variant %d\n", n, variant);
    cudaFree(q), cudaFree(pages), cudaFree(of);
    B.json.Set("prefill", sec.Set("profile_only_n", n).Set("variant", variant));
    return;
  }

  // (a) correctness
  const std::vector<PrefillShape> checks = {
      {"D128 G4 (32/8 heads) n 300 start 0 P32", 128, 32, 8, 300, 0, 32, 2.f},
      {"D64 G1 (8/8) n 257 start 64 (page aligned) P32", 64, 8, 8, 257, 64, 32, 2.f},
      {"D128 G8 (16/2) n 190 start 45 (not aligned) P16", 128, 16, 2, 190, 45, 16, 2.f},
      {"D64 G4 (8/2) n 129 start 5000 (after a long context) P32", 64, 8, 2, 129, 5000, 32, 2.f},
      {"D128 G1 (4/4) n 1 start 77 P16", 128, 4, 4, 1, 77, 16, 2.f},
      {"D128 G4 (8/2) n 1000 start 3000 P64, peaky softmax", 128, 8, 2, 1000, 3000, 64, 8.f},
      {"D64 G8 (32/4) n 77 start 0 P16", 64, 32, 4, 77, 0, 16, 2.f},
      {"D128 G3 (6/2) n 211 start 33 P32", 128, 6, 2, 211, 33, 32, 2.f},
      {"D64 G1 (2/2) n 700 start 1 P8, peaky softmax", 64, 2, 2, 700, 1, 8, 8.f},
      {"D128 G8 (32/4) n 1024 start 2048 P32", 128, 32, 4, 1024, 2048, 32, 2.f},
      {"D128 G4 (8/2) n 333 start 129 P8", 128, 8, 2, 333, 129, 8, 2.f},
      {"D128 G2 (4/2) n 517 start 300 P24 (not a power of two)", 128, 4, 2, 517, 300, 24, 2.f},
      {"D128 G4 (4/1) n 2100 start 0 P32, peaky softmax", 128, 4, 1, 2100, 0, 32, 8.f},
  };
  int dev = 0, cc_major = 0, cc_minor = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev));
  CK(cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, dev));
  const bool has_wgmma = cc_major == 9 && cc_minor == 0;
  struct PathName { fc::FlashPrefillPath path; const char* name; };
  std::vector<PathName> paths = {{fc::FlashPrefillPath::kMmaSync, "mma.sync"}};
  if (has_wgmma) paths.push_back({fc::FlashPrefillPath::kWgmma, "wgmma"});
  sec.Set("wgmma_kernel_available", Json::Bool(has_wgmma));
  Json cj = Json::Arr();
  double worst = 0;
  std::string failed;
  for (size_t ci = 0; ci < checks.size(); ++ci) {
    const PrefillShape& s = checks[ci];
    Json j = Json::Obj();
    j.Set("name", s.name).Set("head_dim", s.d).Set("q_heads", s.hq).Set("kv_heads", s.hkv).Set("n", s.n);
    j.Set("start", s.start).Set("page_size", s.page).Set("q_scale", s.q_scale);
    for (const PathName& pn : paths) {
      if (pn.path == fc::FlashPrefillPath::kWgmma && s.d != 128) continue;
      for (int bo = 0; bo < 2; ++bo) {
        const CheckResult r = CheckCase(s, bo == 1, pn.path, 1000 + ci * 2 + bo, st);
        const bool pass = r.rel_err < kTol && r.all_finite;
        worst = std::max(worst, r.rel_err);
        if (!pass)
          failed += std::string(failed.empty() ? "" : "; ") + s.name + " [" + pn.name + "]" +
                    (bo ? " (bf16 out)" : " (fp32 out)");
        const std::string k = std::string(pn.name == std::string("wgmma") ? "wgmma_" : "") + (bo ? "bf16_out_" : "fp32_out_");
        j.Set(k + "max_rel_err", r.rel_err);
        j.Set(k + "rms_rel_err", r.rms_rel);
        j.Set(k + "all_written", Json::Bool(r.all_finite));
        std::printf("[prefill] check %-58s %-8s %s out: max rel err %.3g (rms %.3g)%s %s\n", s.name, pn.name,
                    bo ? "bf16" : "fp32", r.rel_err, r.rms_rel, r.all_finite ? "" : " UNWRITTEN/NaN",
                    pass ? "PASS" : "FAIL");
        std::fflush(stdout);
      }
    }
    cj.Push(j);
  }
  sec.Set("check_cases", cj).Set("check_max_rel_err", worst).Set("check_tolerance", kTol);
  sec.Set("check_pass", Json::Bool(failed.empty()));
  B.json.Set("prefill", sec);
  if (!failed.empty()) throw std::runtime_error("prefill attention check FAILED (tolerance 1e-2): " + failed);

  // (b) timing
  const int maxn = B.quick ? 32768 : 131072;
  const PrefillShape big{"", 128, 32, 8, maxn, 0, 32, 2.f};
  const size_t qmax = size_t(maxn) * 32 * 128;
  bf16 *q = nullptr, *pages = nullptr, *ob = nullptr;
  float* of = nullptr;
  CK(cudaMalloc(&q, qmax * 2));
  CK(cudaMalloc(&pages, NumPages(big) * PageElems(big) * 2));
  CK(cudaMalloc(&of, qmax * 4));
  CK(cudaMalloc(&ob, qmax * 2));
  FillBf16(q, qmax, 77, 2.f, st);
  FillBf16(pages, NumPages(big) * PageElems(big), 78, 1.f, st);  // D 64 reuses the same bytes
  CK(cudaStreamSynchronize(st));
  struct T { const char* name; int d, n; bool bf16_out; };
  std::vector<T> times = {{"flash D128 GQA4 n 8192", 128, 8192, false},
                          {"flash D128 GQA4 n 32768", 128, 32768, false},
                          {"flash D128 GQA4 n 131072", 128, 131072, false},
                          {"flash D128 GQA4 n 32768 bf16 out", 128, 32768, true},
                          {"flash D64 GQA4 n 32768", 64, 32768, false}};
  Json tj = Json::Arr();
  std::printf("[prefill] %-47s %10s %10s %8s\n", "case", "ms", "TFLOP/s", "% peak");
  double flash8k_ms = 0, last32k_ms = 0;
  for (const T& t : times) {
    if (t.n > maxn) continue;
    const PrefillShape s{t.name, t.d, 32, 8, t.n, 0, 32, 2.f};
    double mma_ms = 0;
    for (const PathName& pn : paths) {
      if (pn.path == fc::FlashPrefillPath::kWgmma && t.d != 128) continue;
      fc::FlashPrefillParams p;
      p.q = q, p.pages = pages;
      if (t.bf16_out) p.out_bf16 = ob; else p.out_f32 = of;
      p.n = t.n, p.start = 0, p.q_heads = 32, p.kv_heads = 8, p.head_dim = t.d, p.page_size = 32;
      p.path = pn.path;
      const double flops = CausalFlops(s);
      // 128K takes 16x the 32K time: fewer repetitions if that would be long (keeps the section short)
      int reps = t.n >= 131072 ? 5 : t.n >= 32768 ? 10 : 20, warm = 2;
      if (t.n >= 131072 && last32k_ms * 16 > 2000) reps = 1, warm = 1;
      const double ms = MedianMs(st, warm, reps, [&] { fc::LaunchFlashPrefillAttention(p, st); });
      if (t.n == 32768 && t.d == 128 && !t.bf16_out) last32k_ms = std::max(last32k_ms, ms);
      const double tf = flops / ms / 1e9;
      if (t.n == 8192 && t.d == 128 && !t.bf16_out && pn.path == fc::FlashPrefillPath::kMmaSync) flash8k_ms = ms;
      const std::string name = std::string(t.name) + " [" + pn.name + "]";
      if (pn.path == fc::FlashPrefillPath::kMmaSync) mma_ms = ms;
      std::printf("[prefill] %-47s %10.3f %10.1f %7.1f%%", name.c_str(), ms, tf, 100 * tf / B.gemm_tflops);
      if (pn.path == fc::FlashPrefillPath::kWgmma && mma_ms > 0) std::printf("  (%.2fx mma.sync)", mma_ms / ms);
      std::printf("\n");
      std::fflush(stdout);
      Json row = Json::Obj().Set("name", name).Set("kernel", pn.name).Set("head_dim", t.d).Set("n", t.n)
                     .Set("q_heads", 32).Set("kv_heads", 8).Set("out", t.bf16_out ? "bf16" : "fp32")
                     .Set("flops", flops).Set("ms", ms).Set("TFLOPs", tf).Set("fraction_of_bf16_peak", tf / B.gemm_tflops);
      if (pn.path == fc::FlashPrefillPath::kWgmma && mma_ms > 0) row.Set("speedup_vs_mma_sync", mma_ms / ms);
      tj.Push(row);
      B.AddRow({"prefill", name, "TFLOP/s", tf, B.gemm_tflops, std::to_string(ms).substr(0, 7) + " ms"});
    }
  }
  // The same causal prompt as the engine's prefill issues it: calls of FKB_PREFILL_CHUNK (2048)
  // queries at rising offsets over the context so far (one launch per chunk, back to back), so the
  // kernel's share of a chunked prefill is measured apart from the rest of the engine's work.
  if (has_wgmma) {
    const char* ce = std::getenv("FKB_PREFILL_CHUNK");
    const int chunk = ce && *ce ? std::atoi(ce) : 2048;
    for (const int n : {32768, 131072}) {
      if (n > maxn || chunk < 1) continue;
      for (const bool bf16_out : {false, true}) {
        const PrefillShape s{"", 128, 32, 8, n, 0, 32, 2.f};
        fc::FlashPrefillParams p;
        p.pages = pages, p.q_heads = 32, p.kv_heads = 8, p.head_dim = 128, p.page_size = 32;
        p.path = fc::FlashPrefillPath::kWgmma;
        const double ms = MedianMs(st, 1, n >= 131072 ? 2 : 4, [&] {
          for (int c0 = 0; c0 < n; c0 += chunk) {
            p.n = std::min(chunk, n - c0), p.start = c0;
            p.q = q + (size_t)c0 * 32 * 128;
            p.out_f32 = bf16_out ? nullptr : of;
            p.out_bf16 = bf16_out ? ob : nullptr;
            fc::LaunchFlashPrefillAttention(p, st);
          }
        });
        const double tf = CausalFlops(s) / ms / 1e9;
        const std::string name = "flash D128 GQA4 n " + std::to_string(n) + " in chunks of " + std::to_string(chunk) +
                                 (bf16_out ? " bf16 out" : "") + " [wgmma]";
        std::printf("[prefill] %-47s %10.3f %10.1f %7.1f%%\n", name.c_str(), ms, tf, 100 * tf / B.gemm_tflops);
        std::fflush(stdout);
        tj.Push(Json::Obj().Set("name", name).Set("kernel", "wgmma").Set("head_dim", 128).Set("n", n).Set("chunk", chunk)
                    .Set("q_heads", 32).Set("kv_heads", 8).Set("out", bf16_out ? "bf16" : "fp32")
                    .Set("flops", CausalFlops(s)).Set("ms", ms).Set("TFLOPs", tf).Set("fraction_of_bf16_peak", tf / B.gemm_tflops));
        B.AddRow({"prefill", name, "TFLOP/s", tf, B.gemm_tflops, std::to_string(ms).substr(0, 7) + " ms"});
      }
    }
  }
  sec.Set("bf16_peak_TFLOPs", B.gemm_tflops).Set("target_TFLOPs_at_32K", 350.0).Set("wgmma_target_TFLOPs", 450.0);
  sec.Set("timing", tj);

  // (c) the sm_90a kernel's other variants (FKB_PREFILL_VARIANTS, e.g. "0": the producer's page walk,
  // FlashPrefillParams::variant): each checked on every head-dim-128 shape against float64, then
  // timed at 32K and 128K beside the service's variant (-1) in the same run.
  if (has_wgmma && std::getenv("FKB_PREFILL_VARIANTS") && *std::getenv("FKB_PREFILL_VARIANTS")) {
    std::vector<int> variants = {-1};
    for (const char* c = std::getenv("FKB_PREFILL_VARIANTS"); *c;) {
      char* end = nullptr;
      const long v = std::strtol(c, &end, 10);
      if (end == c) break;
      variants.push_back(int(v));
      c = *end == ',' ? end + 1 : end;
    }
    Json vj = Json::Arr();
    for (int v : variants) {
      double vworst = 0;
      bool vpass = true;
      for (size_t ci = 0; ci < checks.size(); ++ci) {
        if (checks[ci].d != 128) continue;
        const CheckResult r = CheckCase(checks[ci], false, fc::FlashPrefillPath::kWgmma, 5000 + ci, st, v);
        vworst = std::max(vworst, r.rel_err);
        if (!(r.rel_err < kTol && r.all_finite)) vpass = false;
      }
      Json row = Json::Obj().Set("variant", v).Set("check_max_rel_err", vworst).Set("check_pass", Json::Bool(vpass));
      std::printf("[prefill] variant %3d: float64 checks %s (max rel err %.3g)", v, vpass ? "PASS" : "FAIL", vworst);
      for (int n : {32768, 131072}) {
        if (n > maxn) continue;
        fc::FlashPrefillParams p;
        p.q = q, p.pages = pages, p.out_f32 = of;
        p.n = n, p.start = 0, p.q_heads = 32, p.kv_heads = 8, p.head_dim = 128, p.page_size = 32;
        p.path = fc::FlashPrefillPath::kWgmma;
        p.variant = v;
        const double ms = MedianMs(st, 1, n >= 131072 ? 3 : 7, [&] { fc::LaunchFlashPrefillAttention(p, st); });
        const double tf = CausalFlops({"", 128, 32, 8, n, 0, 32, 2.f}) / ms / 1e9;
        std::printf("  n %d: %.3f ms %.1f TFLOP/s", n, ms, tf);
        row.Set(n == 32768 ? "TFLOPs_32K" : "TFLOPs_128K", tf).Set(n == 32768 ? "ms_32K" : "ms_128K", ms);
        B.AddRow({"prefill", "wgmma variant " + std::to_string(v) + " n " + std::to_string(n), "TFLOP/s", tf,
                  B.gemm_tflops, std::to_string(ms).substr(0, 7) + " ms"});
      }
      std::printf("\n");
      std::fflush(stdout);
      vj.Push(row);
    }
    sec.Set("wgmma_variants", vj);
  }

  // the existing per-query-row kernel at 8K (fp32 q converted from the same bf16 values)
  {
    const int n = 8192;
    const size_t qn = size_t(n) * 32 * 128;
    float *q32 = nullptr, *o32 = nullptr;
    CK(cudaMalloc(&q32, qn * 4));
    CK(cudaMalloc(&o32, qn * 4));
    Bf16ToF32Kernel<<<1056, 256, 0, st>>>(q, q32, qn);
    CK_LAUNCH();
    fc::PrefillAttentionParams lp;
    lp.q = q32, lp.out = o32, lp.pages = pages, lp.n = n, lp.start = 0;
    lp.q_heads = 32, lp.kv_heads = 8, lp.head_dim = 128, lp.page_size = 32, lp.scale = 1.0f / std::sqrt(128.f);
    const double ms = MedianMs(st, 1, 3, [&] { fc::LaunchPrefillAttention(lp, st); });
    // both kernels' outputs on the same inputs
    fc::FlashPrefillParams p;
    p.q = q, p.pages = pages, p.out_f32 = of, p.n = n, p.q_heads = 32, p.kv_heads = 8, p.head_dim = 128;
    p.page_size = 32;
    p.path = fc::FlashPrefillPath::kMmaSync;
    fc::LaunchFlashPrefillAttention(p, st);
    CK(cudaStreamSynchronize(st));
    std::vector<float> a(qn), b(qn);
    CK(cudaMemcpy(a.data(), o32, qn * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(b.data(), of, qn * 4, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (size_t i = 0; i < qn; ++i) num = std::max(num, double(std::fabs(a[i] - b[i]))), den = std::max(den, double(std::fabs(a[i])));
    if (has_wgmma) {  // the two tensor-core kernels on the same 8K inputs, every element
      p.path = fc::FlashPrefillPath::kWgmma;
      CK(cudaMemsetAsync(of, 0xFF, qn * 4, st));
      fc::LaunchFlashPrefillAttention(p, st);
      CK(cudaStreamSynchronize(st));
      CK(cudaMemcpy(a.data(), of, qn * 4, cudaMemcpyDeviceToHost));
      double wn = 0, wd = 0;
      for (size_t i = 0; i < qn; ++i) {
        const double e = std::isfinite(a[i]) ? std::fabs(double(a[i]) - double(b[i])) : INFINITY;
        wn = std::max(wn, e), wd = std::max(wd, double(std::fabs(b[i])));
      }
      const bool ok = wn / wd < kTol;
      std::printf("[prefill] wgmma vs mma.sync at n 8192, all %zu outputs: max rel diff %.3g %s\n", qn, wn / wd,
                  ok ? "PASS" : "FAIL");
      sec.Set("wgmma_vs_mma_sync_8K_max_rel_diff", wn / wd);
      if (!ok) throw std::runtime_error("prefill: the wgmma and mma.sync kernels disagree at 8K");
    }
    const double flops = CausalFlops({"", 128, 32, 8, n, 0, 32, 2.f}), tf = flops / ms / 1e9;
    std::printf("[prefill] %-36s %10.3f %10.1f %7.1f%%  (flash is %.1fx faster; outputs differ by %.3g rel)\n",
                "existing per-row kernel n 8192", ms, tf, 100 * tf / B.gemm_tflops, ms / flash8k_ms, num / den);
    sec.Set("existing_kernel_8K", Json::Obj().Set("ms", ms).Set("TFLOPs", tf).Set("flash_ms", flash8k_ms)
                                      .Set("speedup", flash8k_ms > 0 ? ms / flash8k_ms : 0.0)
                                      .Set("max_rel_diff_vs_flash", num / den));
    B.AddRow({"prefill", "existing per-row prefill kernel n 8192", "TFLOP/s", tf, B.gemm_tflops,
              std::to_string(ms).substr(0, 7) + " ms"});
    cudaFree(q32), cudaFree(o32);
  }
  cudaFree(q), cudaFree(pages), cudaFree(of), cudaFree(ob);
  B.json.Set("prefill", sec);
}

}  // namespace fkbench
