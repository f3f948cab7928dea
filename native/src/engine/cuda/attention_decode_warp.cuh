// Paged decode attention, warp-independent tiles (flash-decoding inside the block).
//
// Why (native/src/engine/cuda/PERF.md section 1): a block-tiled kernel's limit is each block's serial chain per
// 32-token tile, two block-wide barriers around a one-warp-per-head softmax: while one warp does
// the softmax the others wait, and their next loads cannot be consumed. Here no barrier is in the
// token loop at all: each warp walks its own tiles (tile n of the split goes to warp n % NW) and
// keeps its own online-softmax state for the G query heads; the block's warps are merged once,
// at the end, like the splits are merged by the combine pass.
//
// A warp tile is T = TPW * U tokens (TPW token groups of TPT = D/8 lanes, U tokens each). Per
// tile, with the next tile's K and V already in flight in the other register buffer:
//   scores  partial q.k of U tokens x G heads per lane, reduced over the TPT lanes by the
//           transposing butterfly, written (invalid tokens as kNegBig) to the warp's own slice
//           of shared memory;
//   softmax the warp's T x G scores spread over its lanes (lane = (head, token), T lanes per
//           head): tile max and sum by shuffles over the T lanes, one exp2 per (head, token),
//           probabilities back to the slice, rescale factor of each head broadcast by shuffle;
//   p.v     acc = acc * c + sum_u p * v for the lane's 8 channels.
// Only __syncwarp orders the slice (two per tile, the slice alternates by tile parity), so a warp
// waiting for its loads never holds up the other warps of the block.
#pragma once
#include "attention_core.cuh"
#include "butterfly.cuh"
#include "attention_decode.cuh"

namespace freekv::cuda {
namespace decode_warp {

// 16-byte streaming load (no L1 allocation: every K/V byte is read once). volatile keeps the
// prefetch of the next tile where it is written instead of letting it sink to its first use.
__device__ __forceinline__ uint4 LoadStreamingPinned(const __nv_bfloat16* ptr) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr));
  return r;
}

template <int D, int MAXG, int NW, int U_>
struct Shape {
  static constexpr int TPT = D / kVec;         // lanes per token
  static constexpr int TPW = 32 / TPT;         // token groups per warp
  static constexpr int U = U_;                 // tokens per token group per tile
  static constexpr int T = TPW * U;            // tokens per warp tile
  static constexpr int NV = U * MAXG;          // partial sums per lane before the butterfly
  static constexpr int NKEEP = NV > TPT ? NV / TPT : 1;
  static constexpr int DUP = NV >= TPT ? 1 : TPT / NV;  // lanes holding the same sum
  static constexpr int PAIRS = T * MAXG;       // (head, token) pairs of a tile
  static constexpr int R = (PAIRS + 31) / 32;  // softmax rounds per tile (pairs per lane)
  static_assert(T <= 32 && (T & (T - 1)) == 0, "a head's tokens must fit in one aligned group of lanes");
  static_assert(32 % T == 0 || PAIRS % 32 == 0, "pairs must tile the warp");
};

// grid (splits, kv_heads, batch), NW warps. With one split the normalised output, otherwise
// (m, l, O) partials for the combine pass.
template <int D, int MAXG, int NW, int U, int MINB>
__global__ void __launch_bounds__(NW * 32, MINB)
    DecodeAttentionWarpKernel(DecodeAttentionParams p, int pps, int splits, float* ws_o, float* ws_ml) {
  using S = Shape<D, MAXG, NW, U>;
  constexpr int T = S::T, TPW = S::TPW, TPT = S::TPT;
  __shared__ float sc[NW][2][MAXG][T];  // scores -> probabilities, per warp, by tile parity
  __shared__ float red_o[NW][MAXG][D];
  __shared__ float red_m[NW][MAXG], red_l[NW][MAXG];

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int G = p.q_heads / p.kv_heads;
  const int row = b * p.kv_heads + h;
  const int npages = min(p.num_pages[row], p.max_pages);
  const int first = split * pps;
  const int last = min(npages, first + pps);
  const int P = p.page_size;
  const int len = last > first ? (last - first) * P : 0;
  const int* slots = p.page_slot + (size_t)row * p.max_pages + first;
  const int* toks = p.page_tokens + (size_t)row * p.max_pages + first;
  const __nv_bfloat16* pool = p.pools[b] + (size_t)h * D;
  const size_t kv_stride = (size_t)P * p.kv_heads * D;  // K -> V within a page
  const size_t tok_stride = (size_t)p.kv_heads * D;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % TPT, tg = lane / TPT;

  float qr[MAXG][kVec];
  {
    const float* q = p.q + ((size_t)b * p.q_heads + (size_t)h * G) * D;
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
#pragma unroll
      for (int e = 0; e < kVec; ++e) qr[g][e] = g < G ? q[g * D + sub * kVec + e] * p.scale * kLog2e : 0.f;
  }
  float acc[MAXG][kVec];
#pragma unroll
  for (int g = 0; g < MAXG; ++g)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[g][e] = 0.f;
  // Running max / sum of the head of each softmax round's pair (same in the T lanes of a head).
  float m_r[S::R], l_r[S::R];
#pragma unroll
  for (int r = 0; r < S::R; ++r) m_r[r] = kNegBig, l_r[r] = 0.f;

  // K and V of the lane's U tokens of warp tile n (zeros for invalid tokens, so that p = 0 never
  // meets a NaN); returns the token group's validity mask (bit u: token u).
  auto load_tile = [&](int n, uint4 (&kk)[U], uint4 (&vv)[U]) -> unsigned {
    unsigned mask = 0;
    const int i0 = n * T + tg;
    int pg = i0 / P, t = i0 - pg * P;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      kk[u] = make_uint4(0, 0, 0, 0);
      vv[u] = kk[u];
      if (i0 + TPW * u < len && t < __ldg(toks + pg)) {
        const __nv_bfloat16* kp = pool + (size_t)__ldg(slots + pg) * 2 * kv_stride + (size_t)t * tok_stride + sub * kVec;
        kk[u] = LoadStreamingPinned(kp);
        vv[u] = LoadStreamingPinned(kp + kv_stride);
        mask |= 1u << u;
      }
      t += TPW;
      while (t >= P) t -= P, ++pg;
    }
    return mask;
  };

  auto process = [&](int parity, const uint4 (&kk)[U], const uint4 (&vv)[U], unsigned mask) {
    float(*s)[T] = sc[warp][parity];
    // Scores.
    float v[S::NV];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[kVec];
      Bf16x8ToFloat(kk[u], kf);
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        float a = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) a = fmaf(qr[g][e], kf[e], a);
        v[u * MAXG + g] = a;
      }
    }
    int base = 0;
    Butterfly<S::NV, TPT / 2>(v, sub, base);
    if ((sub & (S::DUP - 1)) == 0) {
#pragma unroll
      for (int c = 0; c < S::NKEEP; ++c) {
        const int j = base + c, u = j / MAXG, g = j % MAXG;
        s[g][tg + TPW * u] = (mask >> u) & 1u ? v[c] : kNegBig;
      }
    }
    __syncwarp();
    // Softmax: pair x = lane + 32 r is (head x / T, token x % T).
    float c_r[S::R];
#pragma unroll
    for (int r = 0; r < S::R; ++r) {
      const int x = lane + 32 * r, g = x / T, t = x % T;
      const bool live = g < G;
      const float sv = live ? s[g][t] : kNegBig;
      float mx = sv;
#pragma unroll
      for (int off = T / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float mn = fmaxf(m_r[r], mx);
      const float c = exp2f(m_r[r] - mn);
      const float pr = sv > 0.5f * kNegBig ? exp2f(sv - mn) : 0.f;
      float ps = pr;
#pragma unroll
      for (int off = T / 2; off > 0; off >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, off);
      l_r[r] = l_r[r] * c + ps;
      m_r[r] = mn;
      c_r[r] = c;
      if (live) s[g][t] = pr;
    }
    // Rescale factor of every head (the head's first lane holds it in its round).
    float cg[MAXG];
#pragma unroll
    for (int g = 0; g < MAXG; ++g) cg[g] = __shfl_sync(0xffffffffu, c_r[(g * T) / 32], (g * T) % 32);
    __syncwarp();
    // p.v
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (g >= G) break;
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[g][e] *= cg[g];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[kVec];
      Bf16x8ToFloat(vv[u], vf);
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        if (g >= G) break;
        const float pr = s[g][tg + TPW * u];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(pr, vf[e], acc[g][e]);
      }
    }
  };

  // This warp's tiles: warp, warp + NW, ... (warp-uniform count: shuffles inside are safe).
  const int ntiles = (len + T - 1) / T;
  const int mine = ntiles > warp ? (ntiles - warp + NW - 1) / NW : 0;
  uint4 ka[U], va[U], kb[U], vb[U];
  unsigned ma = 0, mb = 0;
  if (mine > 0) ma = load_tile(warp, ka, va);
  // Unrolled by two so that the two register buffers alternate without copies.
  for (int k = 0; k < mine; k += 2) {
    if (k + 1 < mine) mb = load_tile(warp + NW * (k + 1), kb, vb);
    process(0, ka, va, ma);
    if (k + 1 >= mine) break;
    if (k + 2 < mine) ma = load_tile(warp + NW * (k + 2), ka, va);
    process(1, kb, vb, mb);
  }

  // Merge: token groups of the warp by shuffles (they share the warp's running max), then the
  // warps of the block through shared memory.
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g >= G) break;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
#pragma unroll
      for (int off = TPT; off < 32; off <<= 1) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], off);
    }
    if (lane < TPT) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) red_o[warp][g][sub * kVec + e] = acc[g][e];
    }
  }
#pragma unroll
  for (int r = 0; r < S::R; ++r) {
    const int x = lane + 32 * r, g = x / T;
    if (g < G && x % T == 0) red_m[warp][g] = m_r[r], red_l[warp][g] = l_r[r];
  }
  __syncthreads();
  for (int x = threadIdx.x; x < G * D; x += NW * 32) {
    const int g = x / D, d = x % D;
    float M = kNegBig;
#pragma unroll
    for (int w = 0; w < NW; ++w) M = fmaxf(M, red_m[w][g]);
    float O = 0.f, L = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      const float f = exp2f(red_m[w][g] - M);
      O += red_o[w][g][d] * f;
      L += red_l[w][g] * f;
    }
    const size_t qh = (size_t)b * p.q_heads + (size_t)h * G + g;
    if (splits == 1) {
      p.out[qh * D + d] = L > 0.f ? O / L : 0.f;
    } else {
      ws_o[(qh * splits + split) * D + d] = O;
      if (d == 0) {
        ws_ml[(qh * splits + split) * 2] = M;
        ws_ml[(qh * splits + split) * 2 + 1] = L;
      }
    }
  }
}

}  // namespace decode_warp
}  // namespace freekv::cuda
