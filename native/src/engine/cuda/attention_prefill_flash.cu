// Tensor-core causal prefill attention; see attention_prefill_flash.cuh for layouts and design.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "attention_prefill_flash.cuh"
#include "attention_prefill_flash_sm90.cuh"
#include "cuda/cuda_check.cuh"

namespace freekv::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int BM = kFlashPrefillBlockM;  // (query, head) rows per CTA
constexpr int BN = kFlashPrefillBlockN;  // tokens per K/V tile
constexpr int kWarps = 4;                // each warp: 32 rows = two m16 tiles
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 2;               // K/V tiles in flight
static_assert(BM == kWarps * 32, "each warp owns 32 rows");

template <int D>
constexpr size_t SmemBytes() {
  return (size_t(BM) * D + size_t(2) * kStages * BN * D) * sizeof(bf16);
}

// Element offset of 16-byte chunk `c` of row `r` in a [rows][D] bf16 tile whose chunks are
// XOR-swizzled by the row's low 3 bits: the 8 rows an ldmatrix phase reads at one logical
// chunk land in 8 different bank groups.
template <int D>
__device__ __forceinline__ int Swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

__device__ __forceinline__ uint32_t SmemU32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; an invalid source writes 16 zero bytes (no read).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void Ldsm4T(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// c[16x8] += a[16x16] * b[16x8], bf16 in, fp32 accumulate.
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float Exp2(float x) {  // ex2.approx: exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}

template <int D>
__global__ void __launch_bounds__(kThreads, 2) FlashPrefillKernel(FlashPrefillParams p, int m_tiles) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [BM][D]
  bf16* sK = sQ + BM * D;                         // [kStages][BN][D]
  bf16* sV = sK + kStages * BN * D;               // [kStages][BN][D]

  // Heaviest CTAs (last query tiles) first; the KV heads of one tile are neighbours.
  const int kvh = blockIdx.x % p.kv_heads;
  const int mt = m_tiles - 1 - blockIdx.x / p.kv_heads;
  const int G = p.q_heads / p.kv_heads;
  const int rows = p.n * G;
  const int m0 = mt * BM;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  const int q_first = m0 / G;
  const int q_last = min(m0 + BM - 1, rows - 1) / G;
  const int kv_end = p.start + q_last + 1;                  // tokens the CTA's last query attends
  const int n_tiles = (kv_end + BN - 1) / BN;               // later tiles are fully masked: skipped
  const int unmasked_tiles = (p.start + q_first + 1) / BN;  // tiles every row attends in full

  // Q tile: row r is (query (m0 + r) / G, head kvh * G + (m0 + r) % G); rows past the chunk are 0.
  for (int i = tid; i < BM * CH; i += kThreads) {
    const int r = i / CH, c = i % CH, R = m0 + r;
    const bool ok = R < rows;
    const bf16* src = ok ? p.q + ((size_t)(R / G) * p.q_heads + (size_t)kvh * G + R % G) * D + c * 8 : p.q;
    CpAsync16(SmemU32(sQ + Swz<D>(r, c)), src, ok);
  }

  const size_t tok_stride = (size_t)p.kv_heads * D;
  const size_t kv_stride = (size_t)p.page_size * tok_stride;  // K half -> V half of a page
  const bf16* head_base = p.pages + (size_t)kvh * D;
  auto load_kv = [&](int tile, int stage) {
    const int k0 = tile * BN;
    bf16* dk = sK + stage * BN * D;
    bf16* dv = sV + stage * BN * D;
#pragma unroll 2
    for (int it = 0; it < BN * CH / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int r = i / CH, c = i % CH, j = k0 + r;
      const bool ok = j < kv_end;
      const bf16* src = ok ? head_base + (size_t)(j / p.page_size) * 2 * kv_stride +
                                 (size_t)(j % p.page_size) * tok_stride + c * 8
                           : p.pages;
      CpAsync16(SmemU32(dk + Swz<D>(r, c)), src, ok);
      CpAsync16(SmemU32(dv + Swz<D>(r, c)), ok ? src + kv_stride : p.pages, ok);
    }
  };
  load_kv(0, 0);
  CpAsyncCommit();  // group: Q + tile 0

  // This thread's four rows: (m tile mi, half h) -> local row warp*32 + mi*16 + h*8 + lane/4.
  int pos[4];
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    const int R = m0 + warp * 32 + (rr >> 1) * 16 + (rr & 1) * 8 + (lane >> 2);
    pos[rr] = p.start + min(R, rows - 1) / G;  // padded rows copy the last query (never stored)
  }
  float m_r[4], l_r[4];
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) m_r[rr] = -INFINITY, l_r[rr] = 0.f;
  float o[2][D / 8][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][dt][e] = 0.f;
  const float sl = p.scale * 1.4426950408889634f;  // softmax in the exp2 domain

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) load_kv(t + 1, (t + 1) & 1);
    CpAsyncCommit();
    CpAsyncWait<1>();  // everything but the tile just issued has landed
    __syncthreads();
    const bf16* k_s = sK + (t & 1) * BN * D;
    const bf16* v_s = sV + (t & 1) * BN * D;

    // S = Q K^T for the warp's 32 rows x BN keys
    float s[2][BN / 8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mi][nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        Ldsm4(qa[mi], SmemU32(sQ + Swz<D>(warp * 32 + mi * 16 + (lane & 15), kk * 2 + (lane >> 4))));
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        uint32_t b[4];
        Ldsm4(b, SmemU32(k_s + Swz<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1))));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          Mma(s[mi][2 * np], qa[mi], b[0], b[1]);
          Mma(s[mi][2 * np + 1], qa[mi], b[2], b[3]);
        }
      }
    }

    if (t >= unmasked_tiles) {  // the diagonal: key k0 + col is masked for rows with pos < key
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = t * BN + nt * 8 + 2 * (lane & 3) + (e & 1);
            if (key > pos[mi * 2 + (e >> 1)]) s[mi][nt][e] = -INFINITY;
          }
    }

    // Online softmax. Tile 0 holds key 0, which every row attends, so m_r is finite from then on.
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
      const int mi = rr >> 1, h = rr & 1;
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * h], s[mi][nt][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_r[rr], mx * sl);
      const float corr = Exp2(m_r[rr] - m_new);
      m_r[rr] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float v = Exp2(fmaf(s[mi][nt][2 * h + e], sl, -m_new));
          s[mi][nt][2 * h + e] = v;
          sum += v;
        }
      l_r[rr] = l_r[rr] * corr + sum;  // per-thread partial; the quad is summed at the end
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[mi][dt][2 * h] *= corr;
        o[mi][dt][2 * h + 1] *= corr;
      }
    }

    // O += P V: the S accumulators of two n8 tiles are the A fragment of one k16 step. P is
    // packed to bf16 first, which frees half of S's registers before the PV products.
    uint32_t pk[BN / 16][2][4];
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc)
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        pk[kc][mi][0] = PackBf16(s[mi][2 * kc][0], s[mi][2 * kc][1]);
        pk[kc][mi][1] = PackBf16(s[mi][2 * kc][2], s[mi][2 * kc][3]);
        pk[kc][mi][2] = PackBf16(s[mi][2 * kc + 1][0], s[mi][2 * kc + 1][1]);
        pk[kc][mi][3] = PackBf16(s[mi][2 * kc + 1][2], s[mi][2 * kc + 1][3]);
      }
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      const uint32_t(&pa)[2][4] = pk[kc];
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        Ldsm4T(b, SmemU32(v_s + Swz<D>(kc * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dp * 2 + (lane >> 4))));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          Mma(o[mi][2 * dp], pa[mi], b[0], b[1]);
          Mma(o[mi][2 * dp + 1], pa[mi], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the stage read here is the next iteration's load target
  }
  CpAsyncWait<0>();

  // Epilogue: O / l straight from the accumulators (each thread: 2 adjacent columns per row).
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    const int mi = rr >> 1, h = rr & 1;
    float l = l_r[rr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = 1.f / l;
    const int R = m0 + warp * 32 + mi * 16 + h * 8 + (lane >> 2);
    if (R >= rows) continue;
    const size_t base = ((size_t)(R / G) * p.q_heads + (size_t)kvh * G + R % G) * D + 2 * (lane & 3);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const float v0 = o[mi][dt][2 * h] * inv, v1 = o[mi][dt][2 * h + 1] * inv;
      if (p.out_f32)
        *reinterpret_cast<float2*>(p.out_f32 + base + dt * 8) = make_float2(v0, v1);
      else
        *reinterpret_cast<__nv_bfloat162*>(p.out_bf16 + base + dt * 8) = __floats2bfloat162_rn(v0, v1);
    }
  }
}

template <int D>
void Launch(const FlashPrefillParams& p, int m_tiles, cudaStream_t stream) {
  constexpr size_t smem = SmemBytes<D>();
  FKV_CUDA_CHECK(cudaFuncSetAttribute(FlashPrefillKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  FlashPrefillKernel<D><<<m_tiles * p.kv_heads, kThreads, smem, stream>>>(p, m_tiles);
}

bool Aligned(const void* ptr, size_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; }

}  // namespace

namespace {
__global__ void QueriesToBf16Kernel(const float* __restrict__ x, size_t n, __nv_bfloat16* __restrict__ y) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}
}  // namespace

void LaunchQueriesToBf16(const float* x, size_t n, __nv_bfloat16* y, cudaStream_t stream) {
  if (n == 0) return;
  const unsigned blocks = (unsigned)std::min<size_t>((n + 255) / 256, 4096);
  QueriesToBf16Kernel<<<blocks, 256, 0, stream>>>(x, n, y);
  FKV_CUDA_CHECK(cudaGetLastError());
}

int FlashPrefillWaveTokens(int q_heads, int kv_heads, int head_dim) {
  if (q_heads <= 0 || kv_heads <= 0 || q_heads % kv_heads || !FlashPrefillSupports(head_dim)) return 1;
  int dev = 0, sms = 0, per_sm = 0, rows = 0;
  FKV_CUDA_CHECK(cudaGetDevice(&dev));
  FKV_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (head_dim == 128 && FlashPrefillWgmmaAvailable()) {
    per_sm = FlashPrefillWgmmaCtasPerSm();
    rows = kFlashWgmmaBlockM;
  } else {
    const size_t smem = head_dim == 64 ? SmemBytes<64>() : SmemBytes<128>();
    auto* kernel = head_dim == 64 ? FlashPrefillKernel<64> : FlashPrefillKernel<128>;
    FKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    FKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    rows = BM;
  }
  // Whole row tiles of every KV head: the CTAs of one wave, rounded down to whole tiles per head.
  const long long tiles = (long long)sms * std::max(per_sm, 1) / kv_heads;
  const long long tokens = tiles * rows / (q_heads / kv_heads);
  return (int)std::max<long long>(1, tokens);
}

void LaunchFlashPrefillAttention(const FlashPrefillParams& in, cudaStream_t stream) {
  Require(in.n > 0 && in.start >= 0, "flash prefill attention: n must be > 0 and start >= 0");
  Require(in.kv_heads > 0 && in.q_heads > 0 && in.q_heads % in.kv_heads == 0,
          "flash prefill attention: q_heads must be a positive multiple of kv_heads");
  Require(in.head_dim == 64 || in.head_dim == 128,
          "flash prefill attention: unsupported head_dim " + std::to_string(in.head_dim) + " (64 or 128)");
  Require(in.page_size > 0, "flash prefill attention: page_size must be > 0");
  Require(in.q && in.pages, "flash prefill attention: q or pages is null");
  Require((in.out_f32 != nullptr) != (in.out_bf16 != nullptr),
          "flash prefill attention: set exactly one of out_f32 and out_bf16");
  Require(Aligned(in.q, 16) && Aligned(in.pages, 16), "flash prefill attention: q and pages must be 16-byte aligned");
  Require(in.out_f32 ? Aligned(in.out_f32, 8) : Aligned(in.out_bf16, 4),
          "flash prefill attention: the output must be aligned to two elements");
  Require(std::isfinite(in.scale) && in.scale >= 0.f, "flash prefill attention: scale must be finite and >= 0");
  const long long G = in.q_heads / in.kv_heads;
  const long long rows = (long long)in.n * G;
  const long long m_tiles = (rows + BM - 1) / BM;
  Require((long long)in.start + in.n + 2 * BN < INT_MAX && rows + BM < INT_MAX && m_tiles * in.kv_heads < INT_MAX,
          "flash prefill attention: too many tokens or rows");
  FlashPrefillParams p = in;
  if (p.scale == 0.f) p.scale = 1.f / std::sqrt(float(p.head_dim));
  const bool wgmma_ok = p.head_dim == 128 && p.path != FlashPrefillPath::kMmaSync && FlashPrefillWgmmaAvailable();
  Require(p.path != FlashPrefillPath::kWgmma || wgmma_ok,
          "flash prefill attention: the wgmma kernel needs head_dim 128 and a compute capability 9.0 device");
  if (wgmma_ok) {
    const long long wg_tiles = (rows + kFlashWgmmaBlockM - 1) / kFlashWgmmaBlockM;
    LaunchFlashPrefillWgmma(p, int(wg_tiles), stream);
    return;
  }
  if (p.head_dim == 64) Launch<64>(p, int(m_tiles), stream);
  else Launch<128>(p, int(m_tiles), stream);
  FKV_CUDA_CHECK_LAUNCH("FlashPrefillKernel");
}

}  // namespace freekv::cuda
