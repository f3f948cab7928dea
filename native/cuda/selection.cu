#include <string>

#include "cuda_check.cuh"
#include "selection.cuh"

namespace freekv::cuda {
namespace {

constexpr int kSelThreads = 512;

__device__ __forceinline__ float BlockReduce(float v, bool is_max, float* red) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = is_max ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (int)(blockDim.x >> 5) ? red[lane] : (is_max ? -3.4e38f : 0.f);
    for (int off = 16; off > 0; off >>= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, v, off);
      v = is_max ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) red[32] = v;
  }
  __syncthreads();
  return red[32];
}

// Dynamic shared memory: keys[np] float, idx[np] int, q[G * D] float.
__global__ void __launch_bounds__(kSelThreads) SelectionKernel(SelectionParams p, int np) {
  const int h = blockIdx.x;
  if (p.head_mask && p.head_mask[h] == 0) return;
  extern __shared__ float smem[];
  __shared__ float red[33];
  float* keys = smem;
  int* idx = reinterpret_cast<int*>(smem + np);
  float* qs = smem + 2 * np;
  const int G = p.q_heads / p.kv_heads, D = p.head_dim, M = p.num_candidates;
  for (int x = threadIdx.x; x < G * D; x += blockDim.x) qs[x] = p.q[(size_t)h * G * D + x];
  __syncthreads();

  // 1. raw scores: a warp per candidate page, all G heads at once; scratch [h][g][M]
  float* raw = p.scratch + (size_t)h * G * M;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int m = warp; m < M; m += nwarps) {
    const float* s = p.summaries + ((size_t)(p.first_page + m) * p.kv_heads + h) * 2 * D;
    for (int g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int d = lane; d < D; d += 32) {
        const float qv = qs[g * D + d];
        acc += fmaxf(qv * s[d], qv * s[D + d]);
      }
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) raw[(size_t)g * M + m] = acc;
    }
  }
  __syncthreads();

  // 2. combine into keys[m]
  for (int m = threadIdx.x; m < np; m += blockDim.x) {
    keys[m] = p.combine == kCombineMax ? -3.4e38f : 0.f;
    idx[m] = m;
  }
  __syncthreads();
  for (int g = 0; g < G; ++g) {
    const float* r = raw + (size_t)g * M;
    if (p.combine == kCombineSoftmaxMean) {
      float mx = -3.4e38f;
      for (int m = threadIdx.x; m < M; m += blockDim.x) mx = fmaxf(mx, r[m]);
      mx = BlockReduce(mx, true, red);
      float sum = 0.f;
      for (int m = threadIdx.x; m < M; m += blockDim.x) sum += expf(r[m] - mx);
      sum = BlockReduce(sum, false, red);
      for (int m = threadIdx.x; m < M; m += blockDim.x) keys[m] += expf(r[m] - mx) / sum / G;
    } else if (p.combine == kCombineMean) {
      for (int m = threadIdx.x; m < M; m += blockDim.x) keys[m] += r[m] / G;
    } else {
      for (int m = threadIdx.x; m < M; m += blockDim.x) keys[m] = fmaxf(keys[m], r[m]);
    }
    __syncthreads();
  }
  for (int m = M + threadIdx.x; m < np; m += blockDim.x) keys[m] = -3.4e38f;  // padding sorts last
  __syncthreads();

  // 3. bitonic sort, descending by key, ascending by page on ties
  for (int size = 2; size <= np; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < np; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const bool desc = (i & size) == 0;
          const float ki = keys[i], kj = keys[j];
          const int ii = idx[i], ij = idx[j];
          // "i before j" in the final order
          const bool i_first = ki > kj || (ki == kj && ii < ij);
          if (desc ? !i_first : i_first) {
            keys[i] = kj;
            keys[j] = ki;
            idx[i] = ij;
            idx[j] = ii;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < p.k; i += blockDim.x)
    p.selected[(size_t)h * p.k + i] = i < M ? p.first_page + idx[i] : -1;
}

int NextPow2(int x) {
  int n = 1;
  while (n < x) n <<= 1;
  return n;
}

}  // namespace

size_t SelectionScratchBytes(const SelectionParams& p) {
  return (size_t)p.q_heads * (size_t)std::max(p.num_candidates, 1) * sizeof(float);
}

void LaunchSelection(const SelectionParams& p, cudaStream_t stream) {
  Require(p.kv_heads > 0 && p.q_heads > 0 && p.q_heads % p.kv_heads == 0,
          "selection: q_heads must be a positive multiple of kv_heads");
  Require(p.k > 0, "selection: k must be > 0");
  Require(p.num_candidates >= 0 && p.num_candidates <= kMaxSelectionCandidates,
          "selection: num_candidates must be in [0, " + std::to_string(kMaxSelectionCandidates) + "], got " +
              std::to_string(p.num_candidates));
  Require(p.combine >= kCombineSoftmaxMean && p.combine <= kCombineMax, "selection: unknown combine");
  Require(p.q && p.summaries && p.scratch && p.selected, "selection: a device pointer is null");
  const int np = NextPow2(std::max(p.num_candidates, 1));
  const int G = p.q_heads / p.kv_heads;
  const size_t smem = (size_t)np * 8 + (size_t)G * p.head_dim * 4;
  FKV_CUDA_CHECK(cudaFuncSetAttribute(SelectionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  SelectionKernel<<<p.kv_heads, kSelThreads, smem, stream>>>(p, np);
  FKV_CUDA_CHECK_LAUNCH("SelectionKernel");
}

}  // namespace freekv::cuda
