#include <algorithm>

#include "append.cuh"
#include "cuda/bf16_vec.cuh"
#include "cuda/cuda_check.cuh"

namespace freekv::cuda {
namespace {

// One thread per 8 channels of one (token, K|V, head). Batched: item blockIdx.y of `items`.
template <bool kBatch>
__global__ void AppendKernel(const AppendParams p0, const AppendParams* items) {
  const AppendParams p = kBatch ? items[blockIdx.y] : p0;
  const int vpr = p.head_dim / kVec;  // vectors per head row
  const long long total = (long long)p.n * 2 * p.kv_heads * vpr;
  for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < total;
       x += (long long)gridDim.x * blockDim.x) {
    const int c = x % vpr;
    const int h = (x / vpr) % p.kv_heads;
    const int kv = (x / ((long long)vpr * p.kv_heads)) % 2;
    const int i = x / (2LL * vpr * p.kv_heads);
    const float* src = (kv ? p.v : p.k) + ((size_t)i * p.kv_heads + h) * p.head_dim + c * kVec;
    float f[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) f[e] = src[e];
    const uint4 u = FloatToBf16x8(f);
    const int pos = p.offset + i;
    const int pg = pos / p.page_size, row = pos % p.page_size;
    const size_t tok = (size_t)p.kv_heads * p.head_dim;
    __nv_bfloat16* dst =
        p.pages + ((size_t)pg * 2 + kv) * p.page_size * tok + (size_t)row * tok + (size_t)h * p.head_dim + c * kVec;
    *reinterpret_cast<uint4*>(dst) = u;
    if (p.tail && i >= p.tail_from) {
      __nv_bfloat16* t = reinterpret_cast<__nv_bfloat16*>(p.tail) + ((size_t)row * 2 + kv) * tok +
                         (size_t)h * p.head_dim + c * kVec;
      *reinterpret_cast<uint4*>(t) = u;
    }
  }
}

}  // namespace

void LaunchAppend(const AppendParams& p, cudaStream_t stream) {
  Require(p.n > 0 && p.k && p.v && p.pages, "append: n must be > 0 and k, v, pages set");
  Require(p.head_dim % kVec == 0, "append: head_dim must be a multiple of 8");
  Require(p.offset >= 0 && p.page_size > 0 && p.kv_heads > 0, "append: bad offset/page_size/kv_heads");
  const long long total = (long long)p.n * 2 * p.kv_heads * (p.head_dim / kVec);
  const int threads = 256;
  const int blocks = (int)std::min<long long>((total + threads - 1) / threads, 4096);
  AppendKernel<false><<<blocks, threads, 0, stream>>>(p, nullptr);
  FKV_CUDA_CHECK_LAUNCH("AppendKernel");
}

void LaunchAppendBatch(const AppendParams* items, int count, int max_n, int kv_heads, int head_dim,
                       cudaStream_t stream) {
  if (count == 0) return;
  Require(count > 0 && count <= 65535 && items && max_n > 0, "append batch: bad count, items or max_n");
  Require(head_dim % kVec == 0 && kv_heads > 0, "append batch: head_dim must be a multiple of 8");
  const long long total = (long long)max_n * 2 * kv_heads * (head_dim / kVec);
  const int threads = 256;
  const int blocks = (int)std::min<long long>((total + threads - 1) / threads, 4096);
  AppendKernel<true><<<dim3(blocks, count), threads, 0, stream>>>(AppendParams{}, items);
  FKV_CUDA_CHECK_LAUNCH("AppendKernel(batch)");
}

}  // namespace freekv::cuda
