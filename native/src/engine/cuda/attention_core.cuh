// The prefill attention's inner loop (decode has its own warp-tiled loop in
// attention_decode_warp.cuh, see PERF.md) and what both share (constants, the head_dim x group dispatch): one thread block
// attends the G query heads of one KV head (GQA group) over a range of tokens, with an online
// softmax in fp32.
//
// Work split: a token's K (or V) row of one head is D bf16 = D/8 16-byte vectors, read by
// TPT = D/8 consecutive lanes (a "token group"); a warp holds 32/TPT token groups, the block
// NG = 4 * 32/TPT of them, each walking the range with stride NG, two tokens at a time: the K and
// V vectors of both are loaded before the first use (four 16-byte loads in flight per lane). Each token group keeps its
// own (max, sum, accumulator) per query head; the groups are merged through shared memory at the
// end. Scores are kept in the log2 domain (q is pre-scaled by scale * log2(e)).
#pragma once
#include <cuda_bf16.h>

#include "cuda/bf16_vec.cuh"

namespace freekv::cuda {

constexpr int kAttnThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegBig = -1e30f;  // finite "minus infinity": exp2(kNegBig - x) == 0, never NaN

template <int D>
struct AttnShape {
  static constexpr int TPT = D / kVec;            // lanes per token
  static constexpr int TPW = 32 / TPT;            // tokens per warp
  static constexpr int NG = (kAttnThreads / 32) * TPW;  // token groups per block
};

template <int D, int MAXG>
struct AttnSmem {
  float m[AttnShape<D>::NG][MAXG];
  float l[AttnShape<D>::NG][MAXG];
  float o[AttnShape<D>::NG][MAXG][D];
};

// One token of a token group: scores for the group's query heads (reduced over the TPT lanes
// that hold the token's channels), then the online-softmax update of (m, l, acc). Every lane of
// the warp calls it (the shuffles need them all); `valid` = false leaves the state unchanged.
template <int D, int MAXG>
__device__ __forceinline__ void OnlineSoftmaxStep(const float (&qr)[MAXG][kVec], float (&m)[MAXG], float (&l)[MAXG],
                                                  float (&acc)[MAXG][kVec], const uint4& ku, const uint4& vu,
                                                  bool valid, int G) {
  using S = AttnShape<D>;
  float kf[kVec], vf[kVec];
  Bf16x8ToFloat(ku, kf);
  Bf16x8ToFloat(vu, vf);
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g >= G) break;
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) s += qr[g][e] * kf[e];
#pragma unroll
    for (int off = S::TPT / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (valid) {
      const float mn = fmaxf(m[g], s);
      const float c = exp2f(m[g] - mn);
      const float p = exp2f(s - mn);
      l[g] = l[g] * c + p;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[g][e] = acc[g][e] * c + p * vf[e];
      m[g] = mn;
    }
  }
}

// Attends tokens i = 0..len-1 given by `token(i, &k, &v) -> bool` (false: skip the token).
// q: [G][D] fp32 of this group. On return (after a __syncthreads), for g < G and d < D:
//   merged max  M[g]   = out_m[g],  sum L[g] = out_l[g] (relative to M, log2 domain),
//   unnormalised out O[g][d] = out_o[g * D + d]   (out_* in shared memory, written by the block).
template <int D, int MAXG, class TokenFn>
__device__ __forceinline__ void AttendRange(const float* __restrict__ q, int G, float scale, int len, TokenFn token,
                                            AttnSmem<D, MAXG>& sm, float* out_m, float* out_l, float* out_o) {
  using S = AttnShape<D>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % S::TPT;
  const int gi = warp * S::TPW + lane / S::TPT;

  float qr[MAXG][kVec];
#pragma unroll
  for (int g = 0; g < MAXG; ++g)
#pragma unroll
    for (int e = 0; e < kVec; ++e) qr[g][e] = g < G ? q[g * D + sub * kVec + e] * scale * kLog2e : 0.f;

  float m[MAXG], l[MAXG], acc[MAXG][kVec];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    m[g] = kNegBig;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[g][e] = 0.f;
  }

  // Two tokens per token group per iteration: four 16-byte loads in flight before the first use.
  for (int base = 0; base < len; base += 2 * S::NG) {  // uniform across the block: shuffles are safe
    const int i0 = base + gi, i1 = i0 + S::NG;
    const __nv_bfloat16 *k0 = nullptr, *v0 = nullptr, *k1 = nullptr, *v1 = nullptr;
    const bool ok0 = i0 < len && token(i0, k0, v0);
    const bool ok1 = i1 < len && token(i1, k1, v1);
    uint4 ku0 = make_uint4(0, 0, 0, 0), vu0 = ku0, ku1 = ku0, vu1 = ku0;
    if (ok0) {
      ku0 = *reinterpret_cast<const uint4*>(k0 + sub * kVec);
      vu0 = *reinterpret_cast<const uint4*>(v0 + sub * kVec);
    }
    if (ok1) {
      ku1 = *reinterpret_cast<const uint4*>(k1 + sub * kVec);
      vu1 = *reinterpret_cast<const uint4*>(v1 + sub * kVec);
    }
    OnlineSoftmaxStep<D, MAXG>(qr, m, l, acc, ku0, vu0, ok0, G);
    OnlineSoftmaxStep<D, MAXG>(qr, m, l, acc, ku1, vu1, ok1, G);
  }

#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g >= G) break;
    if (sub == 0) {
      sm.m[gi][g] = m[g];
      sm.l[gi][g] = l[g];
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) sm.o[gi][g][sub * kVec + e] = acc[g][e];
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    float M = kNegBig;
    for (int j = 0; j < S::NG; ++j) M = fmaxf(M, sm.m[j][g]);
    float L = 0.f;
    for (int j = 0; j < S::NG; ++j) L += sm.l[j][g] * exp2f(sm.m[j][g] - M);
    out_m[g] = M;
    out_l[g] = L;
  }
  for (int x = threadIdx.x; x < G * D; x += blockDim.x) {
    const int g = x / D, d = x % D;
    float M = kNegBig;
    for (int j = 0; j < S::NG; ++j) M = fmaxf(M, sm.m[j][g]);
    float O = 0.f;
    for (int j = 0; j < S::NG; ++j) O += sm.o[j][g][d] * exp2f(sm.m[j][g] - M);
    out_o[x] = O;
  }
  __syncthreads();
}

// Calls f.template operator()<D, MAXG>() for the supported head_dim (64, 128, 256) and the
// smallest supported group bound (1, 2, 4, 8) >= G. Returns false when unsupported.
template <class F>
bool DispatchAttention(int head_dim, int G, F&& f) {
  auto byg = [&](auto dtag) -> bool {
    constexpr int D = decltype(dtag)::value;
    if (G <= 1) return f.template operator()<D, 1>(), true;
    if (G <= 2) return f.template operator()<D, 2>(), true;
    if (G <= 4) return f.template operator()<D, 4>(), true;
    if (G <= 8) return f.template operator()<D, 8>(), true;
    return false;
  };
  switch (head_dim) {
    case 64: return byg(std::integral_constant<int, 64>{});
    case 128: return byg(std::integral_constant<int, 128>{});
    case 256: return byg(std::integral_constant<int, 256>{});
    default: return false;
  }
}

}  // namespace freekv::cuda
