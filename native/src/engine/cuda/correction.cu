#include "correction.cuh"
#include "cuda/cuda_check.cuh"
#include "layer_counters.cuh"

namespace freekv::cuda {
namespace {

// One block (a warp per query head, up to 32 warps) per KV head. Batched: item blockIdx.y.
template <bool kBatch>
__global__ void CorrectionKernel(const float* q_now, const float* q_prev, int G, int head_dim, float tau, int* flags,
                                 unsigned long long* corrections, const CorrectionItem* items) {
  unsigned long long* stats = nullptr;
  if (kBatch) {
    const CorrectionItem it = items[blockIdx.y];
    q_now = it.q_now;
    q_prev = it.q_prev;
    tau = it.tau;
    flags = it.flags;
    corrections = it.corrections;
    stats = it.stats;
  }
  __shared__ float cosines[32];
  const int h = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int g = warp; g < G; g += blockDim.x >> 5) {
    const float* a = q_now + ((size_t)h * G + g) * head_dim;
    const float* b = q_prev + ((size_t)h * G + g) * head_dim;
    float dot = 0.f, na = 0.f, nb = 0.f;
    for (int d = lane; d < head_dim; d += 32) {
      dot += a[d] * b[d];
      na += a[d] * a[d];
      nb += b[d] * b[d];
    }
    for (int off = 16; off > 0; off >>= 1) {
      dot += __shfl_xor_sync(0xffffffffu, dot, off);
      na += __shfl_xor_sync(0xffffffffu, na, off);
      nb += __shfl_xor_sync(0xffffffffu, nb, off);
    }
    if (lane == 0) cosines[g] = (na > 0.f && nb > 0.f) ? dot / (sqrtf(na) * sqrtf(nb)) : 0.f;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float mean = 0.f;
    for (int g = 0; g < G; ++g) mean += cosines[g];
    mean /= G;
    if (flags) {
      const int flag = mean < tau ? 1 : 0;
      flags[h] = flag;
      if (flag && corrections) atomicAdd(corrections, 1ull);
    }
    if (stats) AddCosineSample(stats, mean, tau);
  }
}

}  // namespace

void LaunchCorrectionCheck(const float* q_now, const float* q_prev, int q_heads, int kv_heads, int head_dim, float tau,
                           int* flags, unsigned long long* corrections, cudaStream_t stream) {
  Require(kv_heads > 0 && q_heads > 0 && q_heads % kv_heads == 0,
          "correction: q_heads must be a positive multiple of kv_heads");
  const int G = q_heads / kv_heads;
  Require(G <= 32, "correction: at most 32 query heads per KV head");
  Require(q_now && q_prev && flags, "correction: a device pointer is null");
  CorrectionKernel<false><<<kv_heads, 32 * G, 0, stream>>>(q_now, q_prev, G, head_dim, tau, flags, corrections,
                                                            nullptr);
  FKV_CUDA_CHECK_LAUNCH("CorrectionKernel");
}

void LaunchCorrectionCheckBatch(const CorrectionItem* items, int count, int q_heads, int kv_heads, int head_dim,
                                cudaStream_t stream) {
  if (count == 0) return;
  Require(kv_heads > 0 && q_heads > 0 && q_heads % kv_heads == 0,
          "correction batch: q_heads must be a positive multiple of kv_heads");
  const int G = q_heads / kv_heads;
  Require(G <= 32, "correction batch: at most 32 query heads per KV head");
  Require(count > 0 && count <= 65535 && items, "correction batch: count must be in [1, 65535], items set");
  CorrectionKernel<true><<<dim3(kv_heads, count), 32 * G, 0, stream>>>(nullptr, nullptr, G, head_dim, 0.f, nullptr,
                                                                       nullptr, items);
  FKV_CUDA_CHECK_LAUNCH("CorrectionKernel(batch)");
}

}  // namespace freekv::cuda
