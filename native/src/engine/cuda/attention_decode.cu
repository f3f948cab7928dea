// Paged decode attention: tiles of 32 tokens, softmax shared by the block, next tile in flight.
//
// Why this shape (native/src/engine/cuda/PERF.md has the measurements): decode attention reads every K/V
// byte once and does ~4 FLOP per byte (G = 4), so it must stream HBM. The block is NW warps; a
// token's K (or V) row of one head is read by TPT = D/8 lanes with 16-byte loads (a "token
// group"), and each token group holds U tokens of the current TILE-token tile. Per tile:
//   phase 1  partial q.k of the U tokens x G query heads in each lane, reduced over the TPT lanes
//            by a transposing butterfly (U*G values over TPT lanes: log2 steps that each halve
//            the values a lane keeps, so 15 shuffles for 16 sums instead of 64), scores -> smem;
//            then the NEXT tile's K and V loads are issued (they stay in flight through the
//            barriers and the softmax below);
//   phase 2  one warp per query head: tile max, running max/sum, p = exp2(s - m) once per
//            (head, token) (not once per lane holding the token), rescale factor c;
//   phase 3  acc = acc * c + sum_u p * v for the lane's 8 channels.
// At the end the token groups' accumulators are summed (they share the block's running max).
// Long tables are split along the sequence (grid = splits x kv_heads x batch, one wave of
// resident blocks on an H200) and merged by the combine pass, as before.
//
// Variants (DecodeAttentionParams::variant, or FREEKV_ATTN_VARIANT for every launch), same
// inputs, outputs and workspace contract; a shape a variant does not cover runs variant 0:
//   0  the tiled kernel above: 4 warps, 32-token tiles (the fallback for uncovered shapes)
//   1  the tiled kernel with 8 warps and 64-token tiles: half the barrier pairs per byte
//      (D 256 with G > 4 needs 64 KB of merge space: variant 0)
//   2  warp-independent tiles, no block barrier in the token loop (attention_decode_warp.cuh):
//      4 warps, U = 4 tokens per token group at G <= 4 (8-token warp tiles at D 128), 3 blocks/SM
//      (the default: kDefaultDecodeAttentionVariant)
//   3  as 2 with U = 2 (4-token warp tiles at D 128): fewer registers, 4 blocks/SM
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "attention_core.cuh"
#include "butterfly.cuh"
#include "attention_decode.cuh"
#include "attention_decode_warp.cuh"
#include "cuda/cuda_check.cuh"

namespace freekv::cuda {
namespace {

constexpr int kSms = 132;           // H200
constexpr int kVariants = 4;

// Resident blocks per SM of an instantiation (registers: 128 x 128 threads for D <= 128 and
// G <= 4, forced by the launch bounds; 162-255 registers otherwise). The split heuristic sizes
// the grid to one wave of these.
constexpr int BlocksPerSm(int D, int G) { return D <= 128 && G <= 4 ? 4 : (D <= 256 && G <= 2 ? 3 : 2); }

// Variant 1 (8 warps of 128 registers at D <= 128 and G <= 4; up to 255 otherwise).
constexpr int BlocksPerSmWide(int D, int G) { return D <= 128 && G <= 4 ? 2 : 1; }
// Variant 1's merge buffer [8][G][D] fp32 plus the score tiles must fit the 48 KB of static smem.
constexpr bool WideFits(int D, int G) { return 8 * G * D * 4 + 2 * G * 64 * 4 <= 48 * 1024; }
// Variants 2 and 3: tokens per token group per warp tile, and resident blocks per SM (registers:
// q and the accumulators are 16 x G, the two K/V buffers 16 x U per lane). D 64 at G 3-4 with
// U = 4 has two softmax rounds (16-token warp tiles) and spills at 168 registers: U = 2 there.
constexpr int WarpU(int variant, int D, int G) {
  return variant == 2 ? (G <= 2 || (G <= 4 && D > 64) ? 4 : 2) : (G <= 4 ? 2 : 1);
}
constexpr int WarpBlocksPerSm(int variant, int G) { return variant == 2 ? (G <= 4 ? 3 : 2) : (G <= 4 ? 4 : 2); }

template <int D, int NW, int TILE>
struct DecShape {
  static constexpr int TPT = D / kVec;            // lanes per token
  static constexpr int TPW = 32 / TPT;            // token groups per warp
  static constexpr int NG = NW * TPW;             // token groups per block
  static constexpr int U = TILE / NG;             // tokens per token group per tile
  static_assert(U >= 1 && U * NG == TILE, "tile must split evenly over the token groups");
  static_assert(TILE % 32 == 0, "the softmax gives each lane TILE / 32 tokens");
};

__device__ __forceinline__ uint4 LoadStreaming(const __nv_bfloat16* ptr) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(ptr));
  return r;
}

// grid (splits, kv_heads, batch). With one split the block writes the normalised output;
// otherwise it writes (m, l, O) partials into the workspace for the combine pass.
template <int D, int MAXG, int NW, int TILE, int MINB>
__global__ void __launch_bounds__(NW * 32, MINB) DecodeAttentionKernel(DecodeAttentionParams p, int pps, int splits,
                                                                       float* ws_o, float* ws_ml) {
  constexpr int kDecWarps = NW, kTile = TILE, TL = TILE / 32;
  using S = DecShape<D, NW, TILE>;
  constexpr int U = S::U;
  constexpr int NV = U * MAXG;                         // partial sums per lane in phase 1
  constexpr int NKEEP = NV > S::TPT ? NV / S::TPT : 1;  // full sums a lane holds after the butterfly
  constexpr int GPW = (MAXG + kDecWarps - 1) / kDecWarps;  // query heads per warp in phase 2
  __shared__ float s_buf[2][MAXG][kTile];  // scores -> probabilities, by tile parity
  __shared__ float c_buf[MAXG];
  __shared__ float red_o[kDecWarps][MAXG][D];
  __shared__ float fin_m[MAXG], fin_l[MAXG];

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int G = p.q_heads / p.kv_heads;
  const int row = b * p.kv_heads + h;
  const int npages = min(p.num_pages[row], p.max_pages);
  const int first = split * pps;
  const int last = min(npages, first + pps);
  const int P = p.page_size;
  const int len = last > first ? (last - first) * P : 0;
  const int* slots = p.page_slot + (size_t)row * p.max_pages;
  const int* toks = p.page_tokens + (size_t)row * p.max_pages;
  const __nv_bfloat16* pool = p.pools[b];
  const size_t kv_stride = (size_t)P * p.kv_heads * D;  // K -> V within a page
  const size_t tok_stride = (size_t)p.kv_heads * D;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % S::TPT;
  const int tg = warp * S::TPW + lane / S::TPT;

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
  float m_r[GPW], l_r[GPW];
#pragma unroll
  for (int j = 0; j < GPW; ++j) m_r[j] = kNegBig, l_r[j] = 0.f;

  // Token i of the split is valid when inside the split and inside its page's filled rows.
  auto valid_token = [&](int i) -> bool { return i < len && (i % P) < toks[first + i / P]; };
  auto load_tile = [&](int n, uint4 (&kk)[U], uint4 (&vv)[U]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = n * kTile + tg + S::NG * u;
      kk[u] = make_uint4(0, 0, 0, 0);
      vv[u] = kk[u];
      if (i < len) {
        const int pg = first + i / P, t = i % P;
        if (t < toks[pg]) {
          const __nv_bfloat16* kp = pool + (size_t)slots[pg] * 2 * kv_stride + t * tok_stride + (size_t)h * D + sub * kVec;
          kk[u] = LoadStreaming(kp);
          vv[u] = LoadStreaming(kp + kv_stride);
        }
      }
    }
  };

  const int ntiles = (len + kTile - 1) / kTile;
  uint4 kr[U], vc[U], vn[U];
  load_tile(0, kr, vc);
  for (int n = 0; n < ntiles; ++n) {  // uniform across the block: barriers and shuffles are safe
    float(*sb)[kTile] = s_buf[n & 1];
    // Phase 1: scores of the tile.
    float v[NV];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[kVec];
      Bf16x8ToFloat(kr[u], kf);
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < kVec; ++e) s = fmaf(qr[g][e], kf[e], s);
        v[u * MAXG + g] = s;
      }
    }
    int base = 0;
    Butterfly<NV, S::TPT / 2>(v, sub, base);
    // Lanes holding the same sums: only those with the non-halving low bits clear write.
    constexpr int kDup = NV >= S::TPT ? 1 : S::TPT / NV;
    if ((sub & (kDup - 1)) == 0) {
#pragma unroll
      for (int c = 0; c < NKEEP; ++c) {
        const int j = base + c, u = j / MAXG, g = j % MAXG;
        if (g < G) sb[g][tg + S::NG * u] = v[c];
      }
    }
    // The next tile's K and V stay in flight through the barriers and the softmax below.
    if (n + 1 < ntiles) load_tile(n + 1, kr, vn);
    __syncthreads();
    // Phase 2: online softmax over the tile, one warp per query head (TL tokens per lane).
#pragma unroll
    for (int j = 0; j < GPW; ++j) {
      const int g = warp + j * kDecWarps;
      if (g < G) {
        bool ok[TL];
        float s[TL];
#pragma unroll
        for (int t = 0; t < TL; ++t) {
          ok[t] = valid_token(n * kTile + lane + 32 * t);
          s[t] = ok[t] ? sb[g][lane + 32 * t] : kNegBig;
        }
        float mx = s[0];
#pragma unroll
        for (int t = 1; t < TL; ++t) mx = fmaxf(mx, s[t]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float mn = fmaxf(m_r[j], mx);
        const float c = exp2f(m_r[j] - mn);
        float pr[TL];
#pragma unroll
        for (int t = 0; t < TL; ++t) pr[t] = ok[t] ? exp2f(s[t] - mn) : 0.f;
        float ps = pr[0];
#pragma unroll
        for (int t = 1; t < TL; ++t) ps += pr[t];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, off);
        l_r[j] = l_r[j] * c + ps;
        m_r[j] = mn;
#pragma unroll
        for (int t = 0; t < TL; ++t) sb[g][lane + 32 * t] = pr[t];
        if (lane == 0) c_buf[g] = c;
      }
    }
    __syncthreads();
    // Phase 3: acc = acc * c + sum_u p * v.
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (g >= G) break;
      const float c = c_buf[g];
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[g][e] *= c;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[kVec];
      Bf16x8ToFloat(vc[u], vf);
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        if (g >= G) break;
        const float pr = sb[g][tg + S::NG * u];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(pr, vf[e], acc[g][e]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) vc[u] = vn[u];
  }

  // Sum the token groups' accumulators: within the warp by shuffles, across warps in smem.
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g >= G) break;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
#pragma unroll
      for (int off = S::TPT; off < 32; off <<= 1) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], off);
    }
    if (lane < S::TPT) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) red_o[warp][g][sub * kVec + e] = acc[g][e];
    }
  }
#pragma unroll
  for (int j = 0; j < GPW; ++j) {
    const int g = warp + j * kDecWarps;
    if (g < G && lane == 0) fin_m[g] = m_r[j], fin_l[g] = l_r[j];
  }
  __syncthreads();
  for (int x = threadIdx.x; x < G * D; x += blockDim.x) {
    const int g = x / D, d = x % D;
    float O = 0.f;
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) O += red_o[w][g][d];
    const size_t qh = (size_t)b * p.q_heads + (size_t)h * G + g;
    if (splits == 1) {
      const float L = fin_l[g];
      p.out[qh * D + d] = L > 0.f ? O / L : 0.f;
    } else {
      ws_o[(qh * splits + split) * D + d] = O;
      if (d == 0) {
        ws_ml[(qh * splits + split) * 2] = fin_m[g];
        ws_ml[(qh * splits + split) * 2 + 1] = fin_l[g];
      }
    }
  }
}

// One block per (b, q head); threads over head_dim.
__global__ void DecodeCombineKernel(float* out, const float* ws_o, const float* ws_ml, int splits, int head_dim) {
  const size_t qh = blockIdx.x;
  const float* ml = ws_ml + qh * splits * 2;
  float M = kNegBig;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.f;
  for (int s = 0; s < splits; ++s) L += ml[2 * s + 1] * exp2f(ml[2 * s] - M);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float O = 0.f;
    for (int s = 0; s < splits; ++s) O += ws_o[(qh * splits + s) * head_dim + d] * exp2f(ml[2 * s] - M);
    out[qh * head_dim + d] = L > 0.f ? O / L : 0.f;
  }
}

struct DecodeLaunch {
  const DecodeAttentionParams& p;
  int variant;  // already resolved: supported for this shape
  dim3 grid;
  int pps, splits;
  float* ws_o;
  float* ws_ml;
  cudaStream_t stream;
  template <int D, int MAXG>
  void operator()() const {
    if (variant == 1) {
      if constexpr (WideFits(D, MAXG)) {
        DecodeAttentionKernel<D, MAXG, 8, 64, BlocksPerSmWide(D, MAXG)><<<grid, 256, 0, stream>>>(p, pps, splits, ws_o,
                                                                                               ws_ml);
        return;
      }
    } else if (variant == 2) {
      decode_warp::DecodeAttentionWarpKernel<D, MAXG, 4, WarpU(2, D, MAXG), WarpBlocksPerSm(2, MAXG)>
          <<<grid, 128, 0, stream>>>(p, pps, splits, ws_o, ws_ml);
      return;
    } else if (variant == 3) {
      decode_warp::DecodeAttentionWarpKernel<D, MAXG, 4, WarpU(3, D, MAXG), WarpBlocksPerSm(3, MAXG)>
          <<<grid, 128, 0, stream>>>(p, pps, splits, ws_o, ws_ml);
      return;
    }
    DecodeAttentionKernel<D, MAXG, 4, 32, BlocksPerSm(D, MAXG)><<<grid, 128, 0, stream>>>(p, pps, splits, ws_o, ws_ml);
  }
};

int SplitsFor(const DecodeAttentionParams& p, int pps) { return std::max(1, (p.max_pages + pps - 1) / pps); }

int GroupBound(const DecodeAttentionParams& p) {
  const int G = p.kv_heads > 0 ? p.q_heads / p.kv_heads : 1;
  return G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;  // the instantiation's group bound
}

// FREEKV_ATTN_VARIANT, read once: -1 when unset or not a variant number.
int EnvVariant() {
  static const int v = [] {
    const char* s = std::getenv("FREEKV_ATTN_VARIANT");
    if (!s || !*s) return -1;
    char* end = nullptr;
    const long x = std::strtol(s, &end, 10);
    if (*end || x < 0 || x >= kVariants) {
      std::fprintf(stderr, "FREEKV_ATTN_VARIANT=%s ignored (variants 0..%d)\n", s, kVariants - 1);
      return -1;
    }
    return static_cast<int>(x);
  }();
  return v;
}

// Resident blocks per SM of the variant's instantiation for this shape (sizes the split).
int BlocksPerSmOf(int variant, int D, int gb) {
  switch (variant) {
    case 1: return BlocksPerSmWide(D, gb);
    case 2:
    case 3: return WarpBlocksPerSm(variant, gb);
    default: return BlocksPerSm(D, gb);
  }
}

}  // namespace

int DecodeAttentionVariantCount() { return kVariants; }

int DecodeAttentionEffectiveVariant(const DecodeAttentionParams& p) {
  int v = EnvVariant() >= 0 ? EnvVariant() : p.variant;
  if (v < 0 || v >= kVariants) return 0;
  if (v == 1 && !WideFits(p.head_dim, GroupBound(p))) return 0;
  return v;
}

int DecodeAttentionPagesPerSplit(const DecodeAttentionParams& p) {
  if (p.pages_per_split > 0) return p.pages_per_split;
  // One full wave of resident blocks: a grid a little over one wave runs a second, nearly empty
  // one (measured on the H200: 544 blocks on 528 slots took 1.3x the time of 520 blocks for the
  // same bytes). At least 2 pages a split so that a block's fixed costs (q, final merge,
  // partials) stay small.
  const int gb = GroupBound(p);
  const int rows = std::max(1, p.batch * p.kv_heads);
  const int per_sm = BlocksPerSmOf(DecodeAttentionEffectiveVariant(p), p.head_dim, gb);
  const int splits = std::max(1, kSms * per_sm / rows);
  const int pps = std::max(2, (p.max_pages + splits - 1) / splits);
  return std::max(1, std::min(pps, std::max(1, p.max_pages)));
}

size_t DecodeAttentionWorkspaceBytes(const DecodeAttentionParams& p) {
  const int splits = SplitsFor(p, DecodeAttentionPagesPerSplit(p));
  if (splits == 1) return 0;
  return (size_t)p.batch * p.q_heads * splits * (p.head_dim + 2) * sizeof(float);
}

void LaunchDecodeAttention(const DecodeAttentionParams& p, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  Require(p.batch > 0, "decode attention: batch must be > 0");
  Require(p.kv_heads > 0 && p.q_heads > 0 && p.q_heads % p.kv_heads == 0,
          "decode attention: q_heads must be a positive multiple of kv_heads");
  Require(p.page_size > 0 && p.max_pages > 0, "decode attention: page_size and max_pages must be > 0");
  Require(p.q && p.out && p.pools && p.page_slot && p.page_tokens && p.num_pages,
          "decode attention: a device pointer is null");
  Require(p.variant >= 0 && p.variant < kVariants,
          "decode attention: variant " + std::to_string(p.variant) + " (0.." + std::to_string(kVariants - 1) + ")");
  const int G = p.q_heads / p.kv_heads;
  const int variant = DecodeAttentionEffectiveVariant(p);
  const int pps = DecodeAttentionPagesPerSplit(p);
  const int splits = SplitsFor(p, pps);
  const size_t need = DecodeAttentionWorkspaceBytes(p);
  Require(workspace_bytes >= need && (need == 0 || workspace),
          "decode attention: workspace of " + std::to_string(workspace_bytes) + " bytes, need " + std::to_string(need));
  float* ws_o = static_cast<float*>(workspace);
  float* ws_ml = ws_o ? ws_o + (size_t)p.batch * p.q_heads * splits * p.head_dim : nullptr;
  const dim3 grid(splits, p.kv_heads, p.batch);
  const bool ok =
      DispatchAttention(p.head_dim, G, DecodeLaunch{p, variant, grid, pps, splits, ws_o, ws_ml, stream});
  Require(ok, "decode attention: unsupported head_dim " + std::to_string(p.head_dim) + " or group size " +
                  std::to_string(G) + " (head_dim 64/128/256, q_heads/kv_heads <= 8)");
  FKV_CUDA_CHECK_LAUNCH("DecodeAttentionKernel");
  if (splits > 1) {
    DecodeCombineKernel<<<p.batch * p.q_heads, std::min(p.head_dim, 256), 0, stream>>>(p.out, ws_o, ws_ml, splits,
                                                                                       p.head_dim);
    FKV_CUDA_CHECK_LAUNCH("DecodeCombineKernel");
  }
}

}  // namespace freekv::cuda
