// 16-byte vectors of eight bf16 values: every kernel of the backend moves K/V in these units so
// that loads and stores are 16 bytes wide and coalesced across a warp.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace freekv::cuda {

constexpr int kVec = 8;  // bf16 elements per 16-byte vector

__device__ __forceinline__ void Bf16x8ToFloat(const uint4& u, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ uint4 FloatToBf16x8(const float (&f)[8]) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return u;
}

}  // namespace freekv::cuda
