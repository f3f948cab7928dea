// The sm_90a causal prefill attention kernel (FlashAttention-3's structure, written directly in
// PTX: no CUTLASS/CuTe). Same inputs, outputs and numerics as the mma.sync kernel of
// attention_prefill_flash.cu (layouts in attention_prefill_flash.cuh); head_dim 128.
//
// CTA: 3 warpgroups (384 threads) per (tile of 128 (query, head) rows, KV head); the GQA group is
// folded into M exactly as in the mma.sync kernel (row r -> query r / G, head kv_head * G + r % G).
//  - Warpgroup 0 is the producer. It gives registers back (setmaxnreg.dec 40) and streams the Q
//    tile and then the 128-token K/V tiles with cp.async into a 3-stage ring in shared memory, in
//    the 128-byte-swizzled layout wgmma reads through descriptors: each 128 x 128 bf16 tile is two
//    [128 rows][64 columns] halves, 16-byte chunk c of row r at chunk c ^ (r % 8). cp.async (not
//    the TMA copy engine) because the pages are gathered by token: a tile spans several pages, any
//    page size, and keys past the chunk's last token are zero-filled rather than read (a page's
//    tail past the prefix may hold anything; a NaN there would survive a zero probability). Each
//    producer thread waits for its own copies, fences them to the async proxy
//    (fence.proxy.async) and arrives on the stage's `full` mbarrier; consumers arrive on the
//    stage's `empty` mbarrier once their MMAs that read it completed.
//  - Warpgroups 1 and 2 are consumers (setmaxnreg.inc 232), 64 rows each. S = Q K^T is
//    8 x wgmma m64n128k16 with both operands in shared memory (K-major); online softmax in the
//    exp2 domain on the fp32 accumulators in registers (a row lives in one quad of lanes); P is
//    rounded to bf16 in registers and O += P V is 8 x wgmma m64n128k16 with A from registers and
//    V from shared memory read transposed (MN-major). Within a warpgroup the QK^T of tile t and
//    the PV of tile t-1 are in flight together while the softmax of tile t waits only for the
//    former (FlashAttention-3's intra-warpgroup overlap), and O is rescaled while QK^T runs.
//    Between the two consumer warpgroups, named barriers make the MMA issue alternate
//    (ping-pong), so one warpgroup's softmax overlaps the other's MMAs.
//  - Causal masking only on tiles that cross the diagonal; tiles past the CTA's last query are
//    never loaded. CTA order: the KV heads in groups whose K and V fit in about half of the L2
//    (one head at 32K tokens and beyond, six at 8K with D 128), heaviest (last) query tiles first
//    within a group, so the CTAs in flight read the same K/V from L2 (+3% at 32K and 128K over
//    interleaving all heads; PERF.md).
//  - The producer keeps one tile in flight and signals it when it landed (cp.async.wait_group 0,
//    then the proxy fence, then the arrival): with 3 stages that keeps up. Two tiles in flight
//    (wait_group 1) measured 2-6% slower.
//  - The producer's instructions are what limited the kernel at ~490 TFLOP/s: Nsight Compute showed
//    the consumers waiting for full stages (14% of their samples) while the producer warps spent
//    three quarters of theirs issuing address arithmetic (a division by the page size and a page
//    walk per 16-byte copy), on the same schedulers as the consumers' softmax. For pages of a power
//    of two from 8 to 128 tokens (every configuration the service ships) the row offsets inside a
//    128-token tile do not depend on the tile, so each copy is one address add, and only the last
//    tile is predicated: 610-626 TFLOP/s at 32K-128K (PERF.md). Other page sizes keep the page walk
//    (FlashPrefillParams::variant 0 forces it, for the benchmark's comparison).
// Shared memory: Q 32 KB + 3 stages x (K 32 KB + V 32 KB) = 224 KB, one CTA per SM.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "attention_prefill_flash_sm90.cuh"
#include "cuda/cuda_check.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FKV_FLASH_SM90A 1
#endif

namespace freekv::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int D = 128;
constexpr int BM = kFlashWgmmaBlockM;
constexpr int BN = kFlashWgmmaBlockN;
constexpr int kStages = 3;
constexpr int kThreads = 384;
constexpr uint32_t kHalfBytes = 128 * 128;          // one [128 rows][64 bf16] swizzled half
constexpr uint32_t kTileBytes = 2 * kHalfBytes;     // a 128 x 128 bf16 tile (Q, K or V)
constexpr uint32_t kStageBytes = 2 * kTileBytes;    // K then V
constexpr size_t kSmemBytes = 1024 /* alignment slack */ + kTileBytes + kStages * kStageBytes + 64 /* mbarriers */;
static_assert(BM == 128 && BN == 128, "the tile layout assumes 128 rows");
constexpr int kDefaultVariant = 1;  // 1: tile-invariant copy offsets where the page size allows; 0: the page walk;
                                    // 2: as 1 with two tiles in flight

#ifdef FKV_FLASH_SM90A  // the device code exists in the sm_90a pass only

__device__ __forceinline__ uint32_t SmemU32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void BarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void BarArrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void BarWait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void WgFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void WgWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving register reads/writes of wgmma operands across the async
// boundaries (issue ... wait): each register is "touched" here.
template <int N>
__device__ __forceinline__ void FenceRegs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void FenceRegs(uint32_t (&r)[BN / 16][4]) {
#pragma unroll
  for (int i = 0; i < BN / 16; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle. K-major tiles (Q, K): the 8-row groups are
// 1024 bytes apart (stride byte offset), the leading offset is unused. MN-major (V read
// transposed): 8-row groups of keys 1024 bytes apart, the two 64-column halves kHalfBytes apart.
__device__ __forceinline__ uint64_t Desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ float Exp2(float x) {  // ex2.approx: exp2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// d[64] (m64n128 fp32) = (scale_d ? d : 0) + A B; A and B from shared memory (K-major, 128B swizzle).
__device__ __forceinline__ void WgmmaSS(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(scale_d));
}
// d[64] += A B; A (bf16 m64k16 fragments) from registers, B from shared memory MN-major (transposed).
__device__ __forceinline__ void WgmmaRS(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
#endif  // FKV_FLASH_SM90A

template <int kProducer>  // 0 the page walk, 1 tile-invariant offsets, 2 the same with two tiles in flight
__global__ void __launch_bounds__(kThreads, 1) FlashPrefillWgmmaKernel(FlashPrefillParams p, int m_tiles, int heads_per_group) {
#ifdef FKV_FLASH_SM90A
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t base = (SmemU32(smem_raw) + 1023u) & ~1023u;  // the swizzle needs 1024-byte atoms
  const uint32_t sQ = base;
  const uint32_t sKV = base + kTileBytes;                      // stage s: K at + s * kStageBytes, V after it
  const uint32_t bars = sKV + kStages * kStageBytes;           // full[s] at + 8 s, empty[s] at + 8 (kStages + s)

  // CTA order: KV heads in groups of heads_per_group, heaviest query tiles first within a group.
  const int grp = blockIdx.x / (heads_per_group * m_tiles), h0 = grp * heads_per_group;
  const int gsize = min(heads_per_group, p.kv_heads - h0), idx = blockIdx.x - grp * heads_per_group * m_tiles;
  const int kvh = h0 + idx % gsize;
  const int mt = m_tiles - 1 - idx / gsize;
  const int G = p.q_heads / p.kv_heads;
  const int rows = p.n * G;
  const int m0 = mt * BM;
  const int q_first = m0 / G;
  const int q_last = min(m0 + BM - 1, rows - 1) / G;
  const int kv_end = p.start + q_last + 1;
  const int n_tiles = (kv_end + BN - 1) / BN;
  const int unmasked_tiles = (p.start + q_first + 1) / BN;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      BarInit(bars + 8 * s, 128);                // the producer's 128 threads
      BarInit(bars + 8 * (kStages + s), 256);    // the consumers' 256 threads
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  const int wg = threadIdx.x >> 7, t = threadIdx.x & 127;
  if (wg == 0) {
    // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    // Thread t copies 16-byte chunk c of rows r0, r0 + 8, ..., r0 + 120 of each tile: the swizzled
    // position of the chunk is the same in each of its rows (r % 8 == r0), rows 1024 bytes apart.
    const int c = t & 15, r0 = t >> 4;
    const uint32_t soff = (c >> 3) * kHalfBytes + r0 * 128 + (((c & 7) ^ r0) << 4);
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
      const int R = m0 + r0 + 8 * k;
      const bool ok = R < rows;
      const bf16* src = ok ? p.q + ((size_t)(R / G) * p.q_heads + (size_t)kvh * G + R % G) * D + c * 8 : p.q;
      CpAsync16(sQ + soff + k * 1024, src, ok);
    }
    const size_t tok_stride = (size_t)p.kv_heads * D;
    const size_t kv_stride = (size_t)p.page_size * tok_stride;
    const bf16* head_base = p.pages + (size_t)kvh * D + c * 8;
    // log2 of the page size when it is a power of two from 8 to 128 tokens, else -1 (the page walk).
    const int page_lg = (kProducer > 0 && p.page_size >= 8 && p.page_size <= BN && (p.page_size & (p.page_size - 1)) == 0)
                            ? __ffs(p.page_size) - 1 : -1;
    const int lg = kProducer > 0 ? max(page_lg, 0) : 0;  // the shifts below (unused when page_lg < 0)
    const int page_mask = p.page_size - 1;
    const uint32_t tok32 = uint32_t(tok_stride), kvs1 = uint32_t(kv_stride), kvs2 = 2 * kvs1;
    const bf16* row_base = head_base + (size_t)r0 * tok_stride;
    for (int tile = 0; tile < n_tiles; ++tile) {
      const int s = tile % kStages;
      if (tile >= kStages) BarWait(bars + 8 * (kStages + s), ((tile / kStages) + 1) & 1);
      const uint32_t dk = sKV + s * kStageBytes + soff, dv = dk + kTileBytes;
      if (kProducer > 0 && page_lg >= 0) {
        // Row r0 + 8k of the tile lies in page tile * (128 >> lg) + (8k >> lg), row
        // (8k & (ps - 1)) + r0 (ps >= 8 > r0): offsets that do not depend on the tile. The
        // offsets fit 32 bits: at most 16 pages of at most 128 tokens x kv_heads x 128 x 2.
        const bf16* tb = row_base + (size_t)tile * (BN >> lg) * kvs2;
        if ((tile + 1) * BN <= kv_end) {
#pragma unroll
          for (int k = 0; k < 16; ++k) {
            const uint32_t off = uint32_t((8 * k) >> lg) * kvs2 + uint32_t((8 * k) & page_mask) * tok32;
            CpAsync16(dk + k * 1024, tb + off, true);
            CpAsync16(dv + k * 1024, tb + off + kvs1, true);
          }
        } else {
#pragma unroll
          for (int k = 0; k < 16; ++k) {
            const bool ok = tile * BN + 8 * k + r0 < kv_end;
            const uint32_t off = uint32_t((8 * k) >> lg) * kvs2 + uint32_t((8 * k) & page_mask) * tok32;
            CpAsync16(dk + k * 1024, ok ? tb + off : p.pages, ok);
            CpAsync16(dv + k * 1024, ok ? tb + off + kvs1 : p.pages, ok);
          }
        }
        if constexpr (kProducer == 2) {  // signal tile - 1 once it landed, this one stays in flight
          asm volatile("cp.async.commit_group;\n" ::: "memory");
          if (tile > 0) {
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            BarArrive(bars + 8 * ((tile - 1) % kStages));
          }
          if (tile == n_tiles - 1) {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            BarArrive(bars + 8 * s);
          }
        } else {
          asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
          asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
          BarArrive(bars + 8 * s);
        }
        continue;
      }
      int j = tile * BN + r0;
      int page = j / p.page_size, prow = j - page * p.page_size;
#pragma unroll 4
      for (int k = 0; k < 16; ++k) {
        const bool ok = j < kv_end;
        const bf16* src = head_base + (size_t)page * 2 * kv_stride + (size_t)prow * tok_stride;
        CpAsync16(dk + k * 1024, ok ? src : p.pages, ok);
        CpAsync16(dv + k * 1024, ok ? src + kv_stride : p.pages, ok);
        j += 8, prow += 8;
        while (prow >= p.page_size) prow -= p.page_size, ++page;
      }
      asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic-proxy writes -> wgmma reads
      BarArrive(bars + 8 * s);
    }
  } else {
    // ---------------- consumers ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int cw = wg - 1, warp = t >> 5, lane = t & 31;
    // This thread's two rows (h = 0, 1): local row cw * 64 + warp * 16 + lane / 4 + 8 h.
    int pos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int R = m0 + cw * 64 + warp * 16 + (lane >> 2) + 8 * h;
      pos[h] = p.start + min(R, rows - 1) / G;  // padded rows copy the last query (never stored)
    }
    const float sl = p.scale * 1.4426950408889634f;
    float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};
    float o[64], sc[64];
    uint32_t pa[BN / 16][4];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;

    const uint32_t q_base = sQ + cw * 64 * 128;  // this warpgroup's 64 rows of both halves
    auto issue_qk = [&](int s) {
      const uint32_t k_base = sKV + s * kStageBytes;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t off = (kk >> 2) * kHalfBytes + (kk & 3) * 32;
        WgmmaSS(sc, Desc(q_base + off, 16, 1024), Desc(k_base + off, 16, 1024), kk > 0);
      }
    };
    auto issue_pv = [&](int s) {
      const uint32_t v_base = sKV + s * kStageBytes + kTileBytes;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) WgmmaRS(o, pa[kk], Desc(v_base + kk * 2048, kHalfBytes, 1024));
    };
    // Masks the diagonal, updates the row statistics, leaves exp2'd probabilities in sc and
    // returns the factors by which O must be rescaled.
    auto softmax = [&](int tile, float (&corr)[2]) {
      if (tile >= unmasked_tiles) {
#pragma unroll
        for (int i = 0; i < 64; ++i) {
          const int key = tile * BN + (i >> 2) * 8 + 2 * (lane & 3) + (i & 1);
          if (key > pos[(i >> 1) & 1]) sc[i] = -INFINITY;
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 16; ++j) mx = fmaxf(mx, fmaxf(sc[4 * j + 2 * h], sc[4 * j + 2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_r[h], mx * sl);  // finite: tile 0 holds key 0, which every row attends
        corr[h] = Exp2(m_r[h] - m_new);
        m_r[h] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float v = Exp2(fmaf(sc[4 * j + 2 * h + e], sl, -m_new));
            sc[4 * j + 2 * h + e] = v;
            sum += v;
          }
        l_r[h] = l_r[h] * corr[h] + sum;  // per-thread partial; the quad is summed at the end
      }
    };
    auto pack_p = [&]() {  // accumulators of n8 blocks 2kk, 2kk+1 -> the A fragment of k step kk
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = PackBf16(sc[8 * kk + 0], sc[8 * kk + 1]);
        pa[kk][1] = PackBf16(sc[8 * kk + 2], sc[8 * kk + 3]);
        pa[kk][2] = PackBf16(sc[8 * kk + 4], sc[8 * kk + 5]);
        pa[kk][3] = PackBf16(sc[8 * kk + 6], sc[8 * kk + 7]);
      }
    };

    // Ping-pong between the two consumer warpgroups (named barriers 1 and 2, 256 threads): a
    // warpgroup issues its MMAs only after the other one issued its own, so one warpgroup's softmax
    // runs while the other's MMAs occupy the tensor cores. Warpgroup cw waits on barrier 1 + cw
    // and arrives on the other's; the second one arrives once up front so that the first starts,
    // and skips its last arrival so that every arrival is matched by a wait.
    auto sched_sync = [&]() { asm volatile("bar.sync %0, 256;\n" ::"r"(1 + cw) : "memory"); };
    auto sched_arrive = [&]() { asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - cw) : "memory"); };
    if (cw == 1) sched_arrive();

    float corr[2];  // O's rescale factors from the last softmax, applied before the next PV
    BarWait(bars, 0);  // Q and tile 0
    sched_sync();
    WgFence();
    issue_qk(0);
    WgCommit();
    sched_arrive();
    WgWait<0>();
    FenceRegs(sc);
    softmax(0, corr);
    pack_p();
    for (int tile = 1; tile < n_tiles; ++tile) {
      const int s = tile % kStages, prev = (tile - 1) % kStages;
      BarWait(bars + 8 * s, (tile / kStages) & 1);
      sched_sync();
      WgFence();
      issue_qk(s);
      WgCommit();
      FenceRegs(o);  // the rescale below runs while QK^T is in flight
#pragma unroll
      for (int i = 0; i < 64; ++i) o[i] *= corr[(i >> 1) & 1];
      FenceRegs(o);
      FenceRegs(pa);
      WgFence();
      issue_pv(prev);
      WgCommit();
      sched_arrive();
      WgWait<1>();  // S of this tile is ready; the PV of the previous tile may still run
      FenceRegs(sc);
      softmax(tile, corr);
      WgWait<0>();
      FenceRegs(o);
      FenceRegs(pa);
      BarArrive(bars + 8 * (kStages + prev));
      pack_p();
    }
    sched_sync();
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] *= corr[(i >> 1) & 1];
    FenceRegs(o);
    FenceRegs(pa);
    WgFence();
    issue_pv((n_tiles - 1) % kStages);
    WgCommit();
    if (cw == 0) sched_arrive();
    WgWait<0>();
    FenceRegs(o);

    // Epilogue: O / l straight from the accumulators (2 adjacent columns per n8 block and row).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_r[h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = 1.f / l;
      const int R = m0 + cw * 64 + warp * 16 + (lane >> 2) + 8 * h;
      if (R >= rows) continue;
      const size_t out_base = ((size_t)(R / G) * p.q_heads + (size_t)kvh * G + R % G) * D + 2 * (lane & 3);
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const float v0 = o[4 * j + 2 * h] * inv, v1 = o[4 * j + 2 * h + 1] * inv;
        if (p.out_f32)
          *reinterpret_cast<float2*>(p.out_f32 + out_base + j * 8) = make_float2(v0, v1);
        else
          *reinterpret_cast<__nv_bfloat162*>(p.out_bf16 + out_base + j * 8) = __floats2bfloat162_rn(v0, v1);
      }
    }
  }
#endif
}

}  // namespace

bool FlashPrefillWgmmaAvailable() {
  int dev = 0, major = 0, minor = 0;
  FKV_CUDA_CHECK(cudaGetDevice(&dev));
  FKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  FKV_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major == 9 && minor == 0;
}

int FlashPrefillWgmmaCtasPerSm() {
  auto* kernel = kDefaultVariant == 2 ? FlashPrefillWgmmaKernel<2> : kDefaultVariant == 1 ? FlashPrefillWgmmaKernel<1> : FlashPrefillWgmmaKernel<0>;
  FKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmemBytes)));
  int n = 0;
  FKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, kSmemBytes));
  return n;
}

void LaunchFlashPrefillWgmma(const FlashPrefillParams& p, int m_tiles, cudaStream_t stream) {
  Require(p.head_dim == D, "flash prefill attention (sm_90a): head_dim must be 128");
  const int variant = p.variant < 0 ? kDefaultVariant : p.variant;
  Require(variant >= 0 && variant <= 2, "flash prefill attention (sm_90a): variant must be -1, 0, 1 or 2");
  auto* kernel = variant == 2 ? FlashPrefillWgmmaKernel<2> : variant == 1 ? FlashPrefillWgmmaKernel<1> : FlashPrefillWgmmaKernel<0>;
  FKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmemBytes)));
  // Heads per group of the CTA order: as many KV heads as keep their K and V within ~24 MB, about
  // half of the H100/H200 L2, so that the CTAs in flight share K/V tiles there.
  const double head_bytes = (double(p.start) + p.n) * D * 2 * sizeof(bf16);
  const int heads_per_group = std::max(1, std::min(p.kv_heads, int(24.0 * (1 << 20) / head_bytes)));
  kernel<<<m_tiles * p.kv_heads, kThreads, kSmemBytes, stream>>>(p, m_tiles, heads_per_group);
  FKV_CUDA_CHECK_LAUNCH("FlashPrefillWgmmaKernel");
}

}  // namespace freekv::cuda
