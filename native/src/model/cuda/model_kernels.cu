// See model_kernels.cuh.
#include <cuda_bf16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.cuh"
#include "model_kernels.cuh"

namespace freekv::cuda {
namespace {

using bf16 = __nv_bfloat16;

template <bool B>
__device__ __forceinline__ void Store(void* y, size_t i, float v) {
  if constexpr (B)
    static_cast<bf16*>(y)[i] = __float2bfloat16(v);
  else
    static_cast<float*>(y)[i] = v;
}

template <bool B>
__global__ void EmbedKernel(const void* table, const int* tokens, int H, float* x) {
  const int m = blockIdx.y;
  const size_t row = (size_t)tokens[m] * H;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < H; i += gridDim.x * blockDim.x) {
    float v;
    if constexpr (B)
      v = __bfloat162float(static_cast<const bf16*>(table)[row + i]);
    else
      v = static_cast<const float*>(table)[row + i];
    x[(size_t)m * H + i] = v;
  }
}

// One block per row.
template <bool B>
__global__ void RmsNormKernel(const float* x, const float* w, int H, float eps, void* y) {
  __shared__ float red[32];
  const float* xr = x + (size_t)blockIdx.x * H;
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) ss += xr[i] * xr[i];
  for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0.f;
    for (int o = 16; o; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (threadIdx.x == 0) red[0] = t;
  }
  __syncthreads();
  const float inv = 1.f / sqrtf(red[0] / (float)H + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) Store<B>(y, (size_t)blockIdx.x * H + i, w[i] * (xr[i] * inv));
}

// grid (M, Hq + 2 Hkv), block D/2: thread i handles the rotary pair (i, i + D/2) of one head.
// Q16: the queries go to q16 in bf16 (round to nearest even) for every row, and to q in fp32 for
// the last row only (last_row).
template <bool Q16>
__global__ void BiasRopeSplitKernel(const float* qkv, const float* bias, const int* positions, const float* inv_freq,
                                    int Hq, int Hkv, int D, float* q, float* k, float* v, bf16* q16, int last_row) {
  const int m = blockIdx.x, head = blockIdx.y, i = threadIdx.x, half = D / 2;
  const int W = (Hq + 2 * Hkv) * D;
  const float* src = qkv + (size_t)m * W + (size_t)head * D;
  float a = src[i], b = src[i + half];
  if (bias) {
    a += bias[head * D + i];
    b += bias[head * D + i + half];
  }
  float* dst;
  if (head < Hq + Hkv) {
    const float angle = inv_freq[i] * (float)positions[m];
    double sd, cd;
    sincos((double)angle, &sd, &cd);
    const float c = (float)cd, s = (float)sd;
    const float r0 = a * c - b * s, r1 = b * c + a * s;
    a = r0;
    b = r1;
    if (Q16 && head < Hq) {
      bf16* d16 = q16 + ((size_t)m * Hq + head) * D;
      d16[i] = __float2bfloat16_rn(a);
      d16[i + half] = __float2bfloat16_rn(b);
      if (m != last_row) return;
    }
    dst = head < Hq ? q + ((size_t)m * Hq + head) * D : k + ((size_t)m * Hkv + (head - Hq)) * D;
  } else {
    dst = v + ((size_t)m * Hkv + (head - Hq - Hkv)) * D;
  }
  dst[i] = a;
  dst[i + half] = b;
}

template <bool B>
__global__ void SwiGluKernel(const float* gu, int I, void* act) {
  const int m = blockIdx.y;
  for (int f = blockIdx.x * blockDim.x + threadIdx.x; f < I; f += gridDim.x * blockDim.x) {
    const float g = gu[(size_t)m * 2 * I + f], u = gu[(size_t)m * 2 * I + I + f];
    Store<B>(act, (size_t)m * I + f, g / (1.f + expf(-g)) * u);
  }
}

// gu [M][gate I | up I] in bf16 (the GEMM's rounded output), 8 features a thread (I % 8 == 0).
template <bool B>
__global__ void SwiGluBf16Kernel(const bf16* gu, int I, void* act) {
  const int m = blockIdx.y;
  const bf16* g = gu + (size_t)m * 2 * I;
  for (int f = (blockIdx.x * blockDim.x + threadIdx.x) * 8; f < I; f += gridDim.x * blockDim.x * 8) {
    const uint4 gv = *reinterpret_cast<const uint4*>(g + f), uv = *reinterpret_cast<const uint4*>(g + I + f);
    const bf16* gh = reinterpret_cast<const bf16*>(&gv);
    const bf16* uh = reinterpret_cast<const bf16*>(&uv);
    float r[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float x = __bfloat162float(gh[j]), u = __bfloat162float(uh[j]);
      r[j] = x / (1.f + expf(-x)) * u;
    }
    if constexpr (B) {
      uint4 o;
      bf16* oh = reinterpret_cast<bf16*>(&o);
#pragma unroll
      for (int j = 0; j < 8; ++j) oh[j] = __float2bfloat16(r[j]);
      *reinterpret_cast<uint4*>(static_cast<bf16*>(act) + (size_t)m * I + f) = o;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) static_cast<float*>(act)[(size_t)m * I + f + j] = r[j];
    }
  }
}

__global__ void ToBf16Kernel(const float* x, size_t n, bf16* y) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16(x[i]);
}

// (value, index) pairs: larger value wins, then the lower index; NaN loses to everything.
__device__ __forceinline__ bool Better(float v, int i, float bv, int bi) {
  if (v != v) return false;
  if (bv != bv) return true;
  return v > bv || (v == bv && i < bi);
}

// Every lane ends with the warp's best (value, index).
__device__ __forceinline__ void WarpBest(float& bv, int& bi) {
  for (int o = 16; o; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (Better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
}

__global__ void ArgmaxRowsKernel(const float* x, int n, int* out) {
  const float* row = x + (size_t)blockIdx.x * n;
  float bv = __int_as_float(0x7fc00000);  // NaN: anything real beats it
  int bi = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = row[i];
    if (Better(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  }
  WarpBest(bv, bi);
  __shared__ float sv[32];
  __shared__ int si[32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = lane < warps ? sv[lane] : __int_as_float(0x7fc00000);
    bi = lane < warps ? si[lane] : 0;
    WarpBest(bv, bi);
    if (lane == 0) out[blockIdx.x] = bi;
  }
}

int Blocks(size_t n, int threads, int cap) { return (int)std::min<size_t>((n + threads - 1) / threads, (size_t)cap); }

}  // namespace

void LaunchEmbed(const void* table, bool table_bf16, const int* tokens, int M, int H, float* x, cudaStream_t s) {
  if (M <= 0) return;
  dim3 grid(Blocks(H, 256, 64), M);
  if (table_bf16)
    EmbedKernel<true><<<grid, 256, 0, s>>>(table, tokens, H, x);
  else
    EmbedKernel<false><<<grid, 256, 0, s>>>(table, tokens, H, x);
  FKV_CUDA_CHECK(cudaGetLastError());
}

void LaunchRmsNorm(const float* x, const float* w, int M, int H, float eps, void* y, bool y_bf16, cudaStream_t s) {
  if (M <= 0) return;
  const int threads = std::min(1024, ((H + 31) / 32) * 32);
  if (y_bf16)
    RmsNormKernel<true><<<M, threads, 0, s>>>(x, w, H, eps, y);
  else
    RmsNormKernel<false><<<M, threads, 0, s>>>(x, w, H, eps, y);
  FKV_CUDA_CHECK(cudaGetLastError());
}

void LaunchBiasRopeSplit(const float* qkv, const float* bias, const int* positions, const float* inv_freq, int M,
                         int Hq, int Hkv, int D, float* q, float* k, float* v, void* q16, cudaStream_t s) {
  if (M <= 0) return;
  if (D % 2 || D > 2048) throw std::invalid_argument("rope: head_dim must be even and <= 2048");
  const dim3 grid(M, Hq + 2 * Hkv);
  if (q16)
    BiasRopeSplitKernel<true><<<grid, D / 2, 0, s>>>(qkv, bias, positions, inv_freq, Hq, Hkv, D, q, k, v,
                                                     static_cast<bf16*>(q16), M - 1);
  else
    BiasRopeSplitKernel<false><<<grid, D / 2, 0, s>>>(qkv, bias, positions, inv_freq, Hq, Hkv, D, q, k, v, nullptr, -1);
  FKV_CUDA_CHECK(cudaGetLastError());
}

void LaunchSwiGluBf16(const void* gu, int M, int I, void* act, bool act_bf16, cudaStream_t s) {
  if (M <= 0) return;
  if (I % 8 || reinterpret_cast<uintptr_t>(gu) % 16 || reinterpret_cast<uintptr_t>(act) % 16)
    throw std::invalid_argument("swiglu (bf16 input): the intermediate size must be a multiple of 8 and the buffers 16-byte aligned");
  dim3 grid(Blocks(I / 8, 256, 128), M);
  if (act_bf16)
    SwiGluBf16Kernel<true><<<grid, 256, 0, s>>>(static_cast<const bf16*>(gu), I, act);
  else
    SwiGluBf16Kernel<false><<<grid, 256, 0, s>>>(static_cast<const bf16*>(gu), I, act);
  FKV_CUDA_CHECK(cudaGetLastError());
}

void LaunchSwiGlu(const float* gu, int M, int I, void* act, bool act_bf16, cudaStream_t s) {
  if (M <= 0) return;
  dim3 grid(Blocks(I, 256, 128), M);
  if (act_bf16)
    SwiGluKernel<true><<<grid, 256, 0, s>>>(gu, I, act);
  else
    SwiGluKernel<false><<<grid, 256, 0, s>>>(gu, I, act);
  FKV_CUDA_CHECK(cudaGetLastError());
}

void LaunchArgmaxRows(const float* x, int M, int n, int* out, cudaStream_t s) {
  if (M <= 0) return;
  ArgmaxRowsKernel<<<M, 1024, 0, s>>>(x, n, out);
  FKV_CUDA_CHECK(cudaGetLastError());
}

void LaunchToBf16(const float* x, size_t n, void* y, cudaStream_t s) {
  if (n == 0) return;
  ToBf16Kernel<<<Blocks(n, 256, 1024), 256, 0, s>>>(x, n, static_cast<bf16*>(y));
  FKV_CUDA_CHECK(cudaGetLastError());
}

}  // namespace freekv::cuda
