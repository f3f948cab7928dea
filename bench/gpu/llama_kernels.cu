// Embedding, RMSNorm, RoPE + append, SwiGLU for the decode step (see llama_kernels.cuh).
#include <cmath>

#include "llama_kernels.cuh"

namespace fkbench {

__global__ void EmbeddingKernel(const uint4* table, const int* token, uint4* x, int words) {
  int b = blockIdx.x;
  const uint4* row = table + size_t(token[b]) * words;
  for (int i = threadIdx.x; i < words; i += blockDim.x) x[size_t(b) * words + i] = row[i];
}

void EmbeddingLookup(const bf16* table, const int* token, bf16* x, int batch, int hidden, cudaStream_t s) {
  EmbeddingKernel<<<batch, 256, 0, s>>>(reinterpret_cast<const uint4*>(table), token, reinterpret_cast<uint4*>(x),
                                        hidden / 8);
  CK_LAUNCH();
}

// One block per row; each thread holds 8 consecutive values (one 16-byte load).
__global__ void RmsNormKernel(const uint4* x, const uint4* w, uint4* y, int words, float eps) {
  int b = blockIdx.x;
  __shared__ float red[32];
  float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float ss = 0;
  int i = threadIdx.x;
  if (i < words) {
    uint4 u = x[size_t(b) * words + i];
    const bf16* h = reinterpret_cast<const bf16*>(&u);
#pragma unroll
    for (int j = 0; j < 8; ++j) { v[j] = __bfloat162float(h[j]); ss += v[j] * v[j]; }
  }
  for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0.f;
    for (int o = 16; o; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (threadIdx.x == 0) red[0] = t;
  }
  __syncthreads();
  float inv = rsqrtf(red[0] / float(words * 8) + eps);
  if (i < words) {
    uint4 wu = w[i], out;
    const bf16* wh = reinterpret_cast<const bf16*>(&wu);
    bf16* oh = reinterpret_cast<bf16*>(&out);
#pragma unroll
    for (int j = 0; j < 8; ++j) oh[j] = __float2bfloat16(v[j] * inv * __bfloat162float(wh[j]));
    y[size_t(b) * words + i] = out;
  }
}

void RmsNorm(const bf16* x, const bf16* w, bf16* y, int batch, int n, float eps, cudaStream_t s) {
  if (n % 8 || n > 8192) throw std::invalid_argument("RmsNorm: n must be a multiple of 8 and <= 8192");
  int words = n / 8, threads = ((words + 31) / 32) * 32;
  RmsNormKernel<<<batch, threads, 0, s>>>(reinterpret_cast<const uint4*>(x), reinterpret_cast<const uint4*>(w),
                                          reinterpret_cast<uint4*>(y), words, eps);
  CK_LAUNCH();
}

// grid (batch, hq + hkv + hkv), block D/2 threads: each thread rotates the pair (i, i + D/2).
__global__ void RopeAppendKernel(bf16* qkv, const int* pos, bf16* const* page, const int* slot, int hq, int hkv,
                                 int D, int P, float log_theta) {
  int b = blockIdx.x, head = blockIdx.y, i = threadIdx.x, half = D / 2;
  size_t row = size_t(b) * (hq + 2 * hkv) * D;
  bf16* h = qkv + row + size_t(head) * D;
  bool is_v = head >= hq + hkv;
  float x0 = __bfloat162float(h[i]), x1 = __bfloat162float(h[i + half]);
  if (!is_v) {
    float inv_freq = expf(-log_theta * float(2 * i) / float(D));
    float sn, cs;
    sincosf(float(pos[b]) * inv_freq, &sn, &cs);
    float r0 = x0 * cs - x1 * sn, r1 = x1 * cs + x0 * sn;
    x0 = r0;
    x1 = r1;
    h[i] = __float2bfloat16(x0);
    h[i + half] = __float2bfloat16(x1);
  }
  if (head >= hq) {  // k or v: append to the NHD page, row slot[b]
    int kh = is_v ? head - hq - hkv : head - hq;
    bf16* dst = page[b] + (size_t(is_v ? P : 0) + slot[b]) * hkv * D + size_t(kh) * D;
    dst[i] = __float2bfloat16(x0);
    dst[i + half] = __float2bfloat16(x1);
  }
}

void RopeAppend(bf16* qkv, const int* pos, bf16* const* page, const int* slot, int batch, int hq, int hkv, int D,
                int P, float theta, cudaStream_t s) {
  if (D % 2 || D > 1024) throw std::invalid_argument("RopeAppend: head dim must be even and <= 1024");
  RopeAppendKernel<<<dim3(batch, hq + 2 * hkv), D / 2, 0, s>>>(qkv, pos, page, slot, hq, hkv, D, P, logf(theta));
  CK_LAUNCH();
}

__global__ void SwiGLUKernel(const uint4* gu, uint4* act, int words) {
  int b = blockIdx.y;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x) {
    uint4 g = gu[size_t(b) * 2 * words + i], u = gu[size_t(b) * 2 * words + words + i], o;
    const bf16* gh = reinterpret_cast<const bf16*>(&g);
    const bf16* uh = reinterpret_cast<const bf16*>(&u);
    bf16* oh = reinterpret_cast<bf16*>(&o);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float a = __bfloat162float(gh[j]);
      oh[j] = __float2bfloat16(a / (1.f + __expf(-a)) * __bfloat162float(uh[j]));
    }
    act[size_t(b) * words + i] = o;
  }
}

void SwiGLU(const bf16* gu, bf16* act, int batch, int F, cudaStream_t s) {
  if (F % 8) throw std::invalid_argument("SwiGLU: F must be a multiple of 8");
  int words = F / 8;
  SwiGLUKernel<<<dim3((words + 255) / 256, batch), 256, 0, s>>>(reinterpret_cast<const uint4*>(gu),
                                                                reinterpret_cast<uint4*>(act), words);
  CK_LAUNCH();
}

}  // namespace fkbench
