#include <algorithm>

#include "batch_copy.cuh"
#include "cuda/cuda_check.cuh"

namespace freekv::cuda {
namespace {

// grid (blocks, count): item blockIdx.y, grid-stride over its n floats.
__global__ void CopyBatchKernel(const CopyItem* items, int n) {
  const CopyItem it = items[blockIdx.y];
  for (int x = blockIdx.x * blockDim.x + threadIdx.x; x < n; x += gridDim.x * blockDim.x) it.dst[x] = it.src[x];
}

// grid (blocks, rows): row blockIdx.y; consecutive threads write consecutive 16-byte vectors (4-byte
// floats where a row is not 16-byte aligned), so a warp's stores to mapped host memory leave as
// whole 128-byte (512-byte) PCIe writes.
__global__ void ScatterRowsKernel(const float* src, float* const* dst, int n) {
  const float* s = src + (size_t)blockIdx.y * n;
  float* d = dst[blockIdx.y];
  const int first = blockIdx.x * blockDim.x + threadIdx.x, step = gridDim.x * blockDim.x;
  if ((n & 3) == 0 && ((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d)) & 15) == 0) {
    const float4* s4 = reinterpret_cast<const float4*>(s);
    float4* d4 = reinterpret_cast<float4*>(d);
    for (int x = first; x < n / 4; x += step) d4[x] = s4[x];
    return;
  }
  for (int x = first; x < n; x += step) d[x] = s[x];
}

}  // namespace

void LaunchScatterRows(const float* src, float* const* dst, int rows, int n, cudaStream_t stream) {
  if (rows == 0 || n == 0) return;
  Require(src && dst && rows > 0 && rows <= 65535 && n > 0, "scatter rows: bad src, dst, rows or n");
  const int threads = 256;
  const int blocks = std::max(1, std::min((n / 4 + threads - 1) / threads, 16));
  ScatterRowsKernel<<<dim3(blocks, rows), threads, 0, stream>>>(src, dst, n);
  FKV_CUDA_CHECK_LAUNCH("ScatterRowsKernel");
}

void LaunchCopyBatch(const CopyItem* items, int count, int n, cudaStream_t stream) {
  if (count == 0 || n == 0) return;
  Require(items && count > 0 && count <= 65535 && n > 0, "copy batch: bad items, count or n");
  const int threads = 256;
  const int blocks = std::min((n + threads - 1) / threads, 64);
  CopyBatchKernel<<<dim3(blocks, count), threads, 0, stream>>>(items, n);
  FKV_CUDA_CHECK_LAUNCH("CopyBatchKernel");
}

}  // namespace freekv::cuda
