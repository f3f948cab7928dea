#include <algorithm>

#include "cuda/bf16_vec.cuh"
#include "cuda/cuda_check.cuh"
#include "offload.cuh"

namespace freekv::cuda {
namespace {

// One thread per destination 16-byte vector (consecutive threads write consecutive bytes).
// Batched: one page per item, items[blockIdx.y] (count is 1 there).
template <bool kBatch>
__global__ void OffloadHndKernel(const __nv_bfloat16* pages, int count, uint8_t* dst, size_t dst_page_stride,
                                 int kv_heads, int head_dim, int page_size, const OffloadItem* items) {
  if (kBatch) {
    const OffloadItem it = items[blockIdx.y];
    if (!it.page) return;  // no page this step (a graphed step keeps one item per session)
    pages = it.page;
    dst = it.dst;
  }
  const int vpr = head_dim / kVec;
  const long long per_page = 2LL * page_size * kv_heads * vpr;
  const long long total = per_page * count;
  for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < total;
       x += (long long)gridDim.x * blockDim.x) {
    const int page = x / per_page;
    long long r = x % per_page;  // HND order: [h][kv][t][c]
    const int c = r % vpr;
    r /= vpr;
    const int t = r % page_size;
    r /= page_size;
    const int kv = r % 2;
    const int h = r / 2;
    const __nv_bfloat16* src = pages + (size_t)page * 2 * page_size * kv_heads * head_dim +
                               (((size_t)kv * page_size + t) * kv_heads + h) * head_dim + c * kVec;
    uint4* d = reinterpret_cast<uint4*>(dst + (size_t)page * dst_page_stride) + (x % per_page);
    *d = *reinterpret_cast<const uint4*>(src);
  }
}

}  // namespace

void LaunchOffloadHnd(const __nv_bfloat16* pages, int count, uint8_t* dst, size_t dst_page_stride, int kv_heads,
                      int head_dim, int page_size, cudaStream_t stream) {
  if (count == 0) return;
  Require(count > 0 && pages && dst, "offload: count must be > 0 and pointers set");
  Require(head_dim % kVec == 0, "offload: head_dim must be a multiple of 8");
  const long long total = 2LL * page_size * kv_heads * (head_dim / kVec) * count;
  const int blocks = (int)std::min<long long>((total + 255) / 256, 1024);
  OffloadHndKernel<false>
      <<<blocks, 256, 0, stream>>>(pages, count, dst, dst_page_stride, kv_heads, head_dim, page_size, nullptr);
  FKV_CUDA_CHECK_LAUNCH("OffloadHndKernel");
}

void LaunchOffloadHndBatch(const OffloadItem* items, int count, int kv_heads, int head_dim, int page_size,
                           cudaStream_t stream) {
  if (count == 0) return;
  Require(count > 0 && count <= 65535 && items, "offload batch: count must be in [1, 65535], items set");
  Require(head_dim % kVec == 0, "offload batch: head_dim must be a multiple of 8");
  const long long total = 2LL * page_size * kv_heads * (head_dim / kVec);
  const int blocks = (int)std::min<long long>((total + 255) / 256, 1024);
  OffloadHndKernel<true>
      <<<dim3(blocks, count), 256, 0, stream>>>(nullptr, 1, nullptr, 0, kv_heads, head_dim, page_size, items);
  FKV_CUDA_CHECK_LAUNCH("OffloadHndKernel(batch)");
}

}  // namespace freekv::cuda
