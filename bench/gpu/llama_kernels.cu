// Step input, RMSNorm, RoPE + append, SwiGLU, conversions for the decode step (see llama_kernels.cuh).
#include <cmath>

#include "llama_kernels.cuh"

namespace fkbench {

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
__global__ void RopeAppendKernel(const bf16* qkv, float* q_out, int pos, bf16* const* page, int row, int hq, int hkv,
                                 int D, int P, float log_theta) {
  int b = blockIdx.x, head = blockIdx.y, i = threadIdx.x, half = D / 2;
  const bf16* h = qkv + size_t(b) * (hq + 2 * hkv) * D + size_t(head) * D;
  bool is_v = head >= hq + hkv;
  float x0 = __bfloat162float(h[i]), x1 = __bfloat162float(h[i + half]);
  if (!is_v) {
    float inv_freq = expf(-log_theta * float(2 * i) / float(D));
    float sn, cs;
    sincosf(float(pos) * inv_freq, &sn, &cs);
    float r0 = x0 * cs - x1 * sn, r1 = x1 * cs + x0 * sn;
    x0 = r0;
    x1 = r1;
  }
  if (head < hq) {
    float* q = q_out + (size_t(b) * hq + head) * D;
    q[i] = x0;
    q[i + half] = x1;
  } else {  // k or v: append to the NHD page, row `row`
    int kh = is_v ? head - hq - hkv : head - hq;
    bf16* dst = page[b] + (size_t(is_v ? P : 0) + row) * hkv * D + size_t(kh) * D;
    dst[i] = __float2bfloat16(x0);
    dst[i + half] = __float2bfloat16(x1);
  }
}

void RopeAppend(const bf16* qkv, float* q_out, int pos, bf16* const* page, int row, int batch, int hq, int hkv, int D,
                int P, float theta, cudaStream_t s) {
  if (D % 2 || D > 1024) throw std::invalid_argument("RopeAppend: head dim must be even and <= 1024");
  if (row < 0 || row >= P) throw std::invalid_argument("RopeAppend: row must be in [0, P)");
  RopeAppendKernel<<<dim3(batch, hq + 2 * hkv), D / 2, 0, s>>>(qkv, q_out, pos, page, row, hq, hkv, D, P, logf(theta));
  CK_LAUNCH();
}

__global__ void AdvanceStepKernel(int* step) { *step += 1; }
void AdvanceStep(int* step, cudaStream_t s) {
  AdvanceStepKernel<<<1, 1, 0, s>>>(step);
  CK_LAUNCH();
}

__device__ inline float HashUniform(uint64_t x) {  // in (-1, 1), never 0
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return (float((x >> 40) | 1ull) / float(1ull << 24)) * 2.0f - 1.0f;
}

__global__ void StepInputKernel(const bf16* table, const int* token, const int* step, uint64_t seed, float a,
                                float c, bf16* x, int hidden) {
  int b = blockIdx.y;
  uint64_t base = (seed * 0x100000001B3ull) ^ (uint64_t(*step) << 40) ^ (uint64_t(b) << 32);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < hidden; i += gridDim.x * blockDim.x) {
    float e = __bfloat162float(table[size_t(token[b]) * hidden + i]);
    x[size_t(b) * hidden + i] = __float2bfloat16(a * e + c * HashUniform(base + i));
  }
}

void StepInput(const bf16* table, const int* token, const int* step, uint64_t seed, float a, float noise_scale,
               bf16* x, int batch, int hidden, cudaStream_t s) {
  StepInputKernel<<<dim3((hidden + 255) / 256, batch), 256, 0, s>>>(table, token, step, seed, a,
                                                                    sqrtf(1.f - a * a) * noise_scale, x, hidden);
  CK_LAUNCH();
}

__global__ void F32ToBf16Kernel(const float4* x, uint4* y, size_t words) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < words; i += size_t(gridDim.x) * blockDim.x) {
    float4 a = x[2 * i], b = x[2 * i + 1];
    uint4 o;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&o);
    h[0] = __floats2bfloat162_rn(a.x, a.y);
    h[1] = __floats2bfloat162_rn(a.z, a.w);
    h[2] = __floats2bfloat162_rn(b.x, b.y);
    h[3] = __floats2bfloat162_rn(b.z, b.w);
    y[i] = o;
  }
}

void F32ToBf16(const float* x, bf16* y, size_t n, cudaStream_t s) {
  if (n % 8) throw std::invalid_argument("F32ToBf16: n must be a multiple of 8");
  size_t words = n / 8;
  int blocks = int(std::min<size_t>((words + 255) / 256, 1024));
  F32ToBf16Kernel<<<blocks, 256, 0, s>>>(reinterpret_cast<const float4*>(x), reinterpret_cast<uint4*>(y), words);
  CK_LAUNCH();
}

__global__ void FillF32Kernel(float* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = HashUniform((seed * 0x100000001B3ull) ^ i) * scale;
}

void FillF32(float* p, size_t n, uint64_t seed, float scale, cudaStream_t s) {
  FillF32Kernel<<<1056, 256, 0, s>>>(p, n, seed, scale);
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
