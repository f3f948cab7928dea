// Section 1: the physical ceilings, measured in the same run as everything they bound.
//   pinned host-to-device bandwidth (one 1 GiB copy), device-to-device copy bandwidth (bytes
//   read + written), and the bf16 GEMM rate through our cuBLASLt wrapper (checked first against
//   a float64 CPU product on a small random case, including the beta = 1 residual form).
#include <cmath>

#include "bench.cuh"
#include "gemm_cublaslt.cuh"

namespace fkbench {

static double GemmCheck(cudaStream_t s) {
  const int M = 48, N = 264, K = 520;  // not powers of two on purpose
  std::vector<bf16> hx(size_t(M) * K), hw(size_t(N) * K), hy(size_t(M) * N), out(size_t(M) * N);
  for (size_t i = 0; i < hx.size(); ++i) hx[i] = __float2bfloat16(float(int(HashWord(1, i) % 2001) - 1000) / 1000.f);
  for (size_t i = 0; i < hw.size(); ++i) hw[i] = __float2bfloat16(float(int(HashWord(2, i) % 2001) - 1000) / 1000.f);
  for (size_t i = 0; i < hy.size(); ++i) hy[i] = __float2bfloat16(float(int(HashWord(3, i) % 2001) - 1000) / 100.f);
  bf16 *dx, *dw, *dy;
  CK(cudaMalloc(&dx, hx.size() * 2));
  CK(cudaMalloc(&dw, hw.size() * 2));
  CK(cudaMalloc(&dy, hy.size() * 2));
  CK(cudaMemcpy(dx, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dw, hw.data(), hw.size() * 2, cudaMemcpyHostToDevice));
  double worst = 0;
  for (float beta : {0.0f, 1.0f}) {
    CK(cudaMemcpy(dy, hy.data(), hy.size() * 2, cudaMemcpyHostToDevice));
    freekv::cuda::GemmBf16(dx, dw, dy, M, N, K, s, 1.0f, beta);
    CK(cudaStreamSynchronize(s));
    CK(cudaMemcpy(out.data(), dy, out.size() * 2, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        double r = beta ? double(__bfloat162float(hy[size_t(m) * N + n])) : 0.0;
        for (int k = 0; k < K; ++k)
          r += double(__bfloat162float(hx[size_t(m) * K + k])) * double(__bfloat162float(hw[size_t(n) * K + k]));
        double d = double(__bfloat162float(out[size_t(m) * N + n])) - r;
        num += d * d;
        den += r * r;
      }
    double rel = std::sqrt(num / den);
    if (!(rel < 1e-2)) throw std::runtime_error("GEMM check failed: relative error " + std::to_string(rel) + " (beta " + std::to_string(beta) + ")");
    worst = std::max(worst, rel);
  }
  CK(cudaFree(dx));
  CK(cudaFree(dw));
  CK(cudaFree(dy));
  return worst;
}

void RunCeilings(Bench& B) {
  cudaStream_t s = B.stream;
  Json sec = Json::Obj();
  // --- pinned H2D / D2H, one 1 GiB copy each
  const size_t gib = size_t(1) << 30;
  void *host, *dev;
  CK(cudaHostAlloc(&host, gib, cudaHostAllocDefault));
  CK(cudaMalloc(&dev, gib));
  FillHostBytes(host, gib, 11);
  double h2d = MedianMs(s, 1, 5, [&] { CK(cudaMemcpyAsync(dev, host, gib, cudaMemcpyHostToDevice, s)); });
  double d2h = MedianMs(s, 1, 3, [&] { CK(cudaMemcpyAsync(host, dev, gib, cudaMemcpyDeviceToHost, s)); });
  CK(cudaFreeHost(host));
  CK(cudaFree(dev));
  B.pcie_gbs = gib / h2d / 1e6;
  sec.Set("h2d_pinned_GBps", B.pcie_gbs).Set("d2h_pinned_GBps", gib / d2h / 1e6).Set("copy_bytes", double(gib));
  B.AddRow({"ceiling", "H2D pinned, one 1 GiB copy", "GB/s", B.pcie_gbs, 55.4, "README: 55.4 measured earlier"});

  // --- D2D copy, 4 GiB, counting bytes read + written
  const size_t n = size_t(4) << 30;
  void *a, *b;
  CK(cudaMalloc(&a, n));
  CK(cudaMalloc(&b, n));
  FillBytes(a, n, 12, s);
  double d2d = MedianMs(s, 2, 10, [&] { CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, s)); });
  CK(cudaFree(a));
  CK(cudaFree(b));
  B.hbm_gbs = 2.0 * n / d2d / 1e6;
  sec.Set("d2d_copy_GBps_read_plus_write", B.hbm_gbs).Set("d2d_bytes_each_way", double(n));
  B.AddRow({"ceiling", "D2D copy 4 GiB (read+write)", "GB/s", B.hbm_gbs, 4300, "README: ~4.3 TB/s"});

  // --- bf16 GEMM through the cuBLASLt wrapper
  std::string why;
  if (!freekv::cuda::CublasLtAvailable(&why)) throw std::runtime_error(why);
  double rel = GemmCheck(s);
  sec.Set("gemm_check_rel_err", rel);
  const int D = 8192;
  bf16 *x, *w, *y;
  CK(cudaMalloc(&x, size_t(D) * D * 2));
  CK(cudaMalloc(&w, size_t(D) * D * 2));
  CK(cudaMalloc(&y, size_t(D) * D * 2));
  FillBf16(x, size_t(D) * D, 13, 1.0f, s);
  FillBf16(w, size_t(D) * D, 14, 1.0f, s);
  double gm = MedianMs(s, 3, 10, [&] { freekv::cuda::GemmBf16(x, w, y, D, D, D, s); });
  CK(cudaFree(x));
  CK(cudaFree(w));
  CK(cudaFree(y));
  B.gemm_tflops = 2.0 * D * double(D) * D / gm / 1e9;
  sec.Set("gemm_bf16_8192_TFLOPs", B.gemm_tflops);
  B.AddRow({"ceiling", "bf16 GEMM 8192^3 (cuBLASLt)", "TFLOP/s", B.gemm_tflops, 790, "README: ~790 (PyTorch)"});
  B.json.Set("ceilings", sec);
}

}  // namespace fkbench
