#include <string>

#include "attention_core.cuh"
#include "attention_prefill.cuh"
#include "cuda/cuda_check.cuh"

namespace freekv::cuda {
namespace {

template <int D, int MAXG>
__global__ void __launch_bounds__(kAttnThreads) PrefillAttentionKernel(PrefillAttentionParams p) {
  __shared__ AttnSmem<D, MAXG> sm;
  __shared__ float s_m[MAXG], s_l[MAXG];
  __shared__ float s_o[MAXG * D];
  const int i = blockIdx.x, h = blockIdx.y;
  const int G = p.q_heads / p.kv_heads;
  const int P = p.page_size;
  const size_t kv_stride = (size_t)P * p.kv_heads * D;
  const size_t tok_stride = (size_t)p.kv_heads * D;
  auto token = [&](int j, const __nv_bfloat16*& kp, const __nv_bfloat16*& vp) -> bool {
    kp = p.pages + (size_t)(j / P) * 2 * kv_stride + (j % P) * tok_stride + (size_t)h * D;
    vp = kp + kv_stride;
    return true;
  };
  const size_t qoff = ((size_t)i * p.q_heads + (size_t)h * G) * D;
  AttendRange<D, MAXG>(p.q + qoff, G, p.scale, p.start + i + 1, token, sm, s_m, s_l, s_o);
  for (int x = threadIdx.x; x < G * D; x += blockDim.x) {
    const float L = s_l[x / D];
    p.out[qoff + x] = L > 0.f ? s_o[x] / L : 0.f;
  }
}

struct PrefillLaunch {
  const PrefillAttentionParams& p;
  cudaStream_t stream;
  template <int D, int MAXG>
  void operator()() const {
    PrefillAttentionKernel<D, MAXG><<<dim3(p.n, p.kv_heads), kAttnThreads, 0, stream>>>(p);
  }
};

}  // namespace

void LaunchPrefillAttention(const PrefillAttentionParams& p, cudaStream_t stream) {
  Require(p.n > 0 && p.start >= 0, "prefill attention: n must be > 0 and start >= 0");
  Require(p.kv_heads > 0 && p.q_heads > 0 && p.q_heads % p.kv_heads == 0,
          "prefill attention: q_heads must be a positive multiple of kv_heads");
  Require(p.page_size > 0, "prefill attention: page_size must be > 0");
  Require(p.q && p.out && p.pages, "prefill attention: a device pointer is null");
  const int G = p.q_heads / p.kv_heads;
  const bool ok = DispatchAttention(p.head_dim, G, PrefillLaunch{p, stream});
  Require(ok, "prefill attention: unsupported head_dim " + std::to_string(p.head_dim) + " or group size " +
                  std::to_string(G));
  FKV_CUDA_CHECK_LAUNCH("PrefillAttentionKernel");
}

}  // namespace freekv::cuda
