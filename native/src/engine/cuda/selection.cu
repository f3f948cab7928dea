// Selection in two launches, so that the scoring is bandwidth bound over the summaries and only
// the small per-KV-head part runs one block per head (native/src/engine/cuda/PERF.md has the figures):
//
//   1. SelectionScoreKernel, grid (page chunks, kv_heads): a warp scores 4 pages at a time for
//      all query heads of the group (8-byte loads of the bf16 hi/lo rows, q in registers), the
//      lane partial sums reduced by a transposing butterfly; raw scores -> scratch [h][g][m].
//   2. SelectionTopKKernel, one block per KV head: the group combine in double (the CPU engine's
//      precision and order: per head in order, softmax of the raw scores shifted by their float
//      max, then the mean), the combined scores as order-preserving 64-bit keys in shared
//      memory, a radix select (the bits all keys share skipped, then 8 bits a pass) down to at
//      most kCandCap candidates for the k-th place, an exact rank among those (ties: the lower
//      page), and a rank sort of the k winners
//      (best first; ties: the lower page), exactly as the CPU's TopK orders them.
//      For k > kRankSortMax the whole candidate set is bitonic-sorted instead.
//   Long lists (more than two chunks of TopChunk(k) candidates): between 1 and 2, grid (chunks,
//   kv_heads), ChunkMaxKernel and ChunkSumKernel give the softmax-mean its per-head maxima and
//   sums (per chunk, added in chunk order), ChunkTopKKernel combines each chunk's candidates
//   exactly as above and keeps its best k in candidate order; SelectionTopKKernel then ranks only
//   the chunks' winners. At 1M tokens (32736 candidates, 4 KV heads) that is 128 blocks instead
//   of 4: 115 us instead of 429 (softmax-mean), of which the scoring is now the larger part.
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "butterfly.cuh"
#include "cuda/cuda_check.cuh"
#include "selection.cuh"

namespace freekv::cuda {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kScoreWarps = kScoreThreads / 32;
constexpr int kPagesPerWarp = 4;
constexpr int kPagesPerBlock = kScoreWarps * kPagesPerWarp;
constexpr int kTopThreads = 512;
constexpr int kCandCap = 256;       // candidates ranked exactly (n^2 compares) after the radix passes
constexpr int kRankSortMax = 1024;  // k above this: bitonic sort of all candidates

// ---- the top-k of long lists in chunks (selection.cuh) ----
// Chunk size for k places: 1024, or 4 k rounded up to a power of two (4096 at k = kRankSortMax), so
// that the chunks' winners are at most a quarter of the list. A list is ranked in chunks above two
// chunks (2 C is a multiple of kShapeQuantum: a graphed step's rounded shape changes exactly where
// an item starts or stops being chunked).
constexpr int kChunkMin = 1024;
constexpr int kChunkMax = 4096;
constexpr int kChunkMaxG = 32;  // query heads per KV head the chunked combine takes
__host__ __device__ inline int TopChunk(int k) {
  int c = kChunkMin;
  while (c < 4 * k) c <<= 1;
  return c;
}
__host__ __device__ inline bool Chunked(const SelectionParams& p) {
  return !p.topk_single && p.k > 0 && p.k <= kRankSortMax && p.q_heads / p.kv_heads <= kChunkMaxG &&
         p.num_candidates > 2 * TopChunk(p.k);
}
__host__ __device__ inline int NumChunks(int M, int k) { return (M + TopChunk(k) - 1) / TopChunk(k); }

// ---- workspace of the hierarchical selection (and the top-k's keys above kMaxSharedCandidates) ----

struct Workspace {
  unsigned long long* keys = nullptr;  // [Hkv][M] the top-k's keys (global)
  unsigned long long* gkey = nullptr;  // [Hkv][NG] combined group bounds (as OrderedKey)
  float* graw = nullptr;               // [Hq][NG] raw group scores
  float* sraw = nullptr;               // [Hq][S] raw seed page scores
  int* seed = nullptr;                 // [Hkv][S] seed pages
  int* list = nullptr;                 // [Hkv][M] pages of the groups kept, ascending
  int* seed_count = nullptr;           // [Hkv]
  int* list_count = nullptr;           // [Hkv]
  unsigned long long* mkeys = nullptr; // [Hkv][MM] the chunks' winners' keys, chunk c at c * k (candidate order)
  int* midx = nullptr;                 // [Hkv][MM] their candidates (list positions when hierarchical)
  float* pmax = nullptr;               // [Hq][NC] softmax-mean: each chunk's raw maximum per query head
  double* psum = nullptr;              // [Hq][NC] each chunk's sum of exp(raw - the head's maximum)
  int M = 0, NG = 0, S = 0, NC = 0, MM = 0;
  size_t bytes = 0;
};

// Groups a range of M candidates can touch; seed pages for k places (the seeds are whole groups
// taken until they hold k pages: at most k + 31, plus the range's two partial end groups).
__host__ __device__ inline int SpanGroups(int M) { return M / kSelGroupPages + 2; }
__host__ __device__ inline int SeedCap(int k) { return ((k + kSelGroupPages - 1) / kSelGroupPages + 2) * kSelGroupPages; }

__host__ __device__ inline Workspace CarveWorkspace(const SelectionParams& p) {
  Workspace w;
  w.M = p.num_candidates > 1 ? p.num_candidates : 1;
  w.NG = SpanGroups(w.M);
  w.S = SeedCap(p.k);
  w.NC = NumChunks(w.M, p.k);
  w.MM = w.NC * (p.k > 1 ? p.k : 1);
  const int Hq = p.q_heads, Hkv = p.kv_heads;
  constexpr int kBufs = 12;
  size_t off[kBufs + 1];
  const size_t n[kBufs] = {(size_t)Hkv * w.M * 8,  (size_t)Hkv * w.NG * 8, (size_t)Hq * w.NG * 4, (size_t)Hq * w.S * 4,
                           (size_t)Hkv * w.S * 4,  (size_t)Hkv * w.M * 4,  (size_t)Hkv * 4,        (size_t)Hkv * 4,
                           (size_t)Hkv * w.MM * 8, (size_t)Hkv * w.MM * 4, (size_t)Hq * w.NC * 4,  (size_t)Hq * w.NC * 8};
  off[0] = 0;
  for (int i = 0; i < kBufs; ++i) off[i + 1] = off[i] + (n[i] + 255) / 256 * 256;
  w.bytes = off[kBufs];
  if (p.workspace) {
    char* b = static_cast<char*>(p.workspace);
    w.keys = reinterpret_cast<unsigned long long*>(b + off[0]);
    w.gkey = reinterpret_cast<unsigned long long*>(b + off[1]);
    w.graw = reinterpret_cast<float*>(b + off[2]);
    w.sraw = reinterpret_cast<float*>(b + off[3]);
    w.seed = reinterpret_cast<int*>(b + off[4]);
    w.list = reinterpret_cast<int*>(b + off[5]);
    w.seed_count = reinterpret_cast<int*>(b + off[6]);
    w.list_count = reinterpret_cast<int*>(b + off[7]);
    w.mkeys = reinterpret_cast<unsigned long long*>(b + off[8]);
    w.midx = reinterpret_cast<int*>(b + off[9]);
    w.pmax = reinterpret_cast<float*>(b + off[10]);
    w.psum = reinterpret_cast<double*>(b + off[11]);
  }
  return w;
}

// ---- 1. scoring ----

// What one scoring pass reads and writes for KV head h: candidates m < M are page
// (list ? list[m] : first_page + m) of `summaries`; raw scores to raw[g * stride + m].
//   kPassPages: the candidates (flat: the range; hierarchical: the kept groups' pages).
//   kPassGroups: the group bounds of the groups overlapping the range (as "pages" of `groups`).
//   kPassSeeds: the seed pages.
enum ScorePass : int { kPassPages = 0, kPassGroups = 1, kPassSeeds = 2 };
struct ScoreView {
  const __nv_bfloat16* summaries;
  int first_page;
  const int* list;
  int M, stride;
  float* raw;
};

template <int PASS>
__device__ __forceinline__ ScoreView ViewOf(const SelectionParams& p, int h) {
  const int G = SelectionRows(p);
  ScoreView v{p.summaries, p.first_page, nullptr, p.num_candidates, p.num_candidates, nullptr};
  if (PASS == kPassPages) {
    v.raw = p.scratch + (size_t)h * G * v.stride;
    if (p.groups) {
      const Workspace w = CarveWorkspace(p);
      v.list = w.list + (size_t)h * w.M;
      v.M = w.list_count[h];
    }
    return v;
  }
  const Workspace w = CarveWorkspace(p);
  if (!p.groups || p.num_candidates == 0) {
    v.M = 0;
    return v;
  }
  if (PASS == kPassGroups) {
    const int ga = p.first_page / kSelGroupPages, gb = (p.first_page + p.num_candidates - 1) / kSelGroupPages + 1;
    v.summaries = p.groups;
    v.first_page = ga;
    v.M = gb - ga;
    v.stride = w.NG;
    v.raw = w.graw + (size_t)h * G * w.NG;
  } else {
    v.first_page = 0;
    v.list = w.seed + (size_t)h * w.S;
    v.M = w.seed_count[h];
    v.stride = w.S;
    v.raw = w.sraw + (size_t)h * G * w.S;
  }
  return v;
}

// NCH: chunks of 4 channels of a hi (or lo) row per lane (D <= 128 * NCH); MAXG: query heads per pass.
// Batched: item blockIdx.z of `items`. A (page, query head)'s float score does not depend on where
// it sits in the warp or on the pass (same products, maxima and lane order, the butterfly's
// pairing is the same for every value): the passes' scores are comparable bit for bit.
//
// A warp scores groups of kPagesPerWarp pages: group w, w + W, w + 2W, ... (W: the grid's warps per
// KV head), with the next group's summaries loaded before the current one is reduced, so that a
// warp keeps 2 x 2 KB of loads in flight and the per-warp set-up (the head mask, the queries) is
// paid once per warp rather than once per 4 pages. ScoreLaunch sizes the grid to one wave of the
// device (ScoreGridBlocks); SelectionParams::score_grid 1 gives every group a warp of its own (one
// round each: the launch before, kept for the benchmark's comparison).
template <int NCH>
struct PageRows {
  uint2 hi[kPagesPerWarp][NCH], lo[kPagesPerWarp][NCH];  // 4 bf16 channels each
};
// 4 bf16 (little-endian in two words) as floats: exact.
__device__ __forceinline__ float4 Bf16x4(uint2 w) {
  return make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u), __uint_as_float(w.y << 16),
                     __uint_as_float(w.y & 0xffff0000u));
}

template <int NCH>
__device__ __forceinline__ void LoadGroup(const ScoreView& view, int kv_heads, int h, int D4, int lane, int grp,
                                          int groups, PageRows<NCH>& r) {
  const int m0 = grp * kPagesPerWarp;
#pragma unroll
  for (int u = 0; u < kPagesPerWarp; ++u) {
    const int m = m0 + u;
    const bool in = grp < groups && m < view.M;
    const int page = !in ? 0 : view.list ? view.list[m] : view.first_page + m;
    const uint2* s = reinterpret_cast<const uint2*>(view.summaries + ((size_t)page * kv_heads + h) * 2 * (D4 * 4));
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int d4 = lane + 32 * c;
      const bool ok = in && d4 < D4;
      r.hi[u][c] = ok ? __ldg(s + d4) : make_uint2(0u, 0u);
      r.lo[u][c] = ok ? __ldg(s + D4 + d4) : make_uint2(0u, 0u);
    }
  }
}

// fold_mean's rows for 4 channels: the sum over the group's Gq query heads (in head order) of
// max(q, 0) (`positive`) or min(q, 0). A NaN query channel stays NaN, as the unfolded score's would.
__device__ __forceinline__ float FoldPart(float x, bool positive) {
  return (positive ? x >= 0.f : x <= 0.f) || x != x ? x : 0.f;
}
__device__ __forceinline__ float4 FoldedQuery(const float* q, int Gq, int D, int d4, bool positive) {
  float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int g = 0; g < Gq; ++g) {
    const float4 x = reinterpret_cast<const float4*>(q + (size_t)g * D)[d4];
    a.x += FoldPart(x.x, positive);
    a.y += FoldPart(x.y, positive);
    a.z += FoldPart(x.z, positive);
    a.w += FoldPart(x.w, positive);
  }
  return a;
}

template <int NCH, int MAXG, bool kBatch, int PASS>
__global__ void __launch_bounds__(kScoreThreads)
    SelectionScoreKernel(const SelectionParams p0, const SelectionParams* items) {
  const SelectionParams p = kBatch ? items[blockIdx.z] : p0;
  const int h = blockIdx.y;
  if (SkipsHead(p, h)) return;
  if (PASS != kPassPages && !p.groups) return;
  const ScoreView view = ViewOf<PASS>(p, h);
  // G score rows: the query heads, or the two folded rows (fold_mean).
  const int Gq = p.q_heads / p.kv_heads, G = SelectionRows(p), D = p.head_dim, M = view.M, D4 = D / 4;
  const bool fold = G != Gq;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int groups = (M + kPagesPerWarp - 1) / kPagesPerWarp;
  const int first = blockIdx.x * kScoreWarps + warp, step = gridDim.x * kScoreWarps;
  if (first >= groups) return;  // whole warps leave together
  float* raw = view.raw;
  for (int g0 = 0; g0 < G; g0 += MAXG) {
    float4 q[MAXG][NCH];
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        const int d4 = lane + 32 * c;
        q[g][c] = !(g0 + g < G && d4 < D4) ? make_float4(0.f, 0.f, 0.f, 0.f)
                  : fold ? FoldedQuery(p.q + (size_t)h * Gq * D, Gq, D, d4, g0 + g == 0)
                         : reinterpret_cast<const float4*>(p.q + ((size_t)h * G + g0 + g) * D)[d4];
      }
    PageRows<NCH> cur;
    LoadGroup<NCH>(view, p.kv_heads, h, D4, lane, first, groups, cur);
    for (int grp = first; grp < groups; grp += step) {
      PageRows<NCH> next;
      LoadGroup<NCH>(view, p.kv_heads, h, D4, lane, grp + step, groups, next);  // zeros past the end
      const int m0 = grp * kPagesPerWarp;
      float v[kPagesPerWarp * MAXG];
#pragma unroll
      for (int u = 0; u < kPagesPerWarp; ++u)
#pragma unroll
        for (int g = 0; g < MAXG; ++g) {
          float a = 0.f;
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
            const float4 qq = q[g][c], hh = Bf16x4(cur.hi[u][c]), ll = Bf16x4(cur.lo[u][c]);
            a += fmaxf(qq.x * hh.x, qq.x * ll.x);
            a += fmaxf(qq.y * hh.y, qq.y * ll.y);
            a += fmaxf(qq.z * hh.z, qq.z * ll.z);
            a += fmaxf(qq.w * hh.w, qq.w * ll.w);
          }
          v[u * MAXG + g] = a;
        }
      constexpr int NV = kPagesPerWarp * MAXG;
      constexpr int NKEEP = NV > 32 ? NV / 32 : 1;
      constexpr int kDup = NV >= 32 ? 1 : 32 / NV;
      int base = 0;
      Butterfly<NV, 16>(v, lane, base);
      if ((lane & (kDup - 1)) == 0) {
#pragma unroll
        for (int c = 0; c < NKEEP; ++c) {
          const int j = base + c, u = j / MAXG, g = j % MAXG, m = m0 + u;
          if (g0 + g < G && m < M) raw[(size_t)(g0 + g) * view.stride + m] = v[c];
        }
      }
      cur = next;
    }
  }
}

// ---- 2. combine + top-k ----

// Order-preserving 64-bit key of a double (larger double -> larger key); -0 counts as +0, as
// the CPU's comparisons do.
__device__ __forceinline__ unsigned long long OrderedKey(double d) {
  if (d == 0.0) d = 0.0;
  const unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(d));
  return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}

// "a before b" in the selection order: higher key first, then the lower page.
__device__ __forceinline__ bool Before(unsigned long long ka, int ia, unsigned long long kb, int ib) {
  return ka > kb || (ka == kb && ia < ib);
}

template <class T, class Op>
__device__ __forceinline__ T BlockReduce(T v, Op op, T* red) {
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T r = red[0];
  for (int w = 1; w < nw; ++w) r = op(r, red[w]);
  return r;
}

// Block-wide reduction of N values per thread at once (one pair of barriers for all N).
template <int N, class T, class Op>
__device__ __forceinline__ void BlockReduceVec(T (&v)[N], Op op, T* red /* [32 * N] */) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    for (int off = 16; off > 0; off >>= 1) v[i] = op(v[i], __shfl_xor_sync(0xffffffffu, v[i], off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < N; ++i) red[i * 32 + warp] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    T r = red[i * 32];
    for (int w = 1; w < nw; ++w) r = op(r, red[i * 32 + w]);
    v[i] = r;
  }
}

constexpr int kCombineChunk = 4;  // query heads reduced together (G 4: one chunk)

// The combine the selection ranks by: the hierarchical selection's SoftmaxMean (one query head per
// KV head) ranks by the raw score, which the softmax preserves.
__host__ __device__ inline int CombineOf(const SelectionParams& p) {
  return p.groups && p.combine == kCombineSoftmaxMean ? kCombineMax : p.combine;
}

// Combined scores of KV head h in double, as the CPU engine's CombineGroup computes them, into
// keys[m] (as OrderedKey) for m < M. The double accumulators live in `keys` itself (same bytes,
// converted in place at the end); every thread only touches m = threadIdx.x + i * blockDim.x.
// Softmax-mean: the float maxima of up to 4 heads in one block reduction, their sums of
// exp(double(s) - max) in a second; the exponentials are recomputed for the accumulation
// (cheaper than more barriers), and added head by head in order, as on the CPU.
// raw: [G][stride] of the M candidates. `combine`: CombineOf(p).
__device__ void CombineToKeys(const SelectionParams& p, int combine, const float* raw, int M, int stride,
                              unsigned long long* keys, double* red_d, float* red_f) {
  const int G = SelectionRows(p);
  double* acc = reinterpret_cast<double*>(keys);
  for (int m = threadIdx.x; m < M; m += kTopThreads) acc[m] = 0.0;
  if (combine == kCombineMax || combine == kCombineMean) {
    for (int g = 0; g < G; ++g) {
      const float* r = raw + (size_t)g * stride;
      if (combine == kCombineMax) {
        for (int m = threadIdx.x; m < M; m += kTopThreads) acc[m] = g == 0 ? (double)r[m] : fmax(acc[m], (double)r[m]);
      } else {
        for (int m = threadIdx.x; m < M; m += kTopThreads) acc[m] += (double)r[m];
      }
    }
  } else {
    for (int g0 = 0; g0 < G; g0 += kCombineChunk) {
      float mx[kCombineChunk];
      double z[kCombineChunk];
#pragma unroll
      for (int j = 0; j < kCombineChunk; ++j) {
        mx[j] = -3.4e38f;
        if (g0 + j < G) {
          const float* r = raw + (size_t)(g0 + j) * stride;
          for (int m = threadIdx.x; m < M; m += kTopThreads) mx[j] = fmaxf(mx[j], r[m]);
        }
      }
      BlockReduceVec(mx, [](float a, float b) { return fmaxf(a, b); }, red_f);
#pragma unroll
      for (int j = 0; j < kCombineChunk; ++j) {
        z[j] = 0.0;
        if (g0 + j < G) {
          const float* r = raw + (size_t)(g0 + j) * stride;
          for (int m = threadIdx.x; m < M; m += kTopThreads) z[j] += exp((double)r[m] - (double)mx[j]);
        }
      }
      BlockReduceVec(z, [](double a, double b) { return a + b; }, red_d);
      for (int m = threadIdx.x; m < M; m += kTopThreads) {
        double a = acc[m];
#pragma unroll
        for (int j = 0; j < kCombineChunk; ++j)
          if (g0 + j < G) a += exp((double)raw[(size_t)(g0 + j) * stride + m] - (double)mx[j]) / z[j];
        acc[m] = a;
      }
    }
  }
  for (int m = threadIdx.x; m < M; m += kTopThreads)
    keys[m] = OrderedKey(combine == kCombineMax ? acc[m] : acc[m] / G);
}

// The top-k's keys are in the workspace (global memory; the block's barriers make its writes
// visible to it) for hierarchical items and above kMaxSharedCandidates candidates.
__host__ __device__ inline bool GlobalKeys(const SelectionParams& p) {
  return p.groups != nullptr || p.num_candidates > kMaxSharedCandidates;
}
constexpr size_t kTopKFixedSmem = (size_t)(kRankSortMax + kCandCap) * 12;

// The best kk of keys[0, M) into sel_k / sel_i (kk entries, in no order; i: the position in keys),
// by the whole block (every thread calls it; it ends with a barrier). Ties: the lower position.
// A radix select narrows the candidates for the last places: the bits every key shares (from the
// block's min and max key) are skipped, then 8 bits a pass, until at most kCandCap keys remain in
// the race; those are ranked exactly. cand_k / cand_i: kCandCap entries of scratch.
__device__ void RadixTop(const unsigned long long* keys, int M, int kk, unsigned long long* sel_k, int* sel_i,
                         unsigned long long* cand_k, int* cand_i) {
  __shared__ unsigned long long red_u[64];
  __shared__ unsigned hist[256];
  __shared__ int s_digit, s_above, s_count, s_out, s_cand;
  __shared__ int warp_cnt[32];
  unsigned long long kv[2] = {~0ull, 0ull};  // min, max
  for (int m = threadIdx.x; m < M; m += blockDim.x) {
    const unsigned long long u = keys[m];
    kv[0] = u < kv[0] ? u : kv[0];
    kv[1] = u > kv[1] ? u : kv[1];
  }
  {
    unsigned long long mn[1] = {kv[0]}, mxk[1] = {kv[1]};
    BlockReduceVec(mn, [](unsigned long long a, unsigned long long b) { return a < b ? a : b; }, red_u);
    BlockReduceVec(mxk, [](unsigned long long a, unsigned long long b) { return a > b ? a : b; }, red_u + 32);
    kv[0] = mn[0], kv[1] = mxk[0];
  }
  // shift: the low bits still undecided; prefix: the decided high bits of the kk-th key.
  int shift = kv[0] == kv[1] ? 0 : 64 - __clzll((long long)(kv[0] ^ kv[1]));
  unsigned long long prefix = shift == 64 ? 0ull : kv[1] >> shift;
  int krem = kk, ncand = M;
  while (ncand > kCandCap && shift > 0) {
    const int width = shift < 8 ? shift : 8;
    const int hi = shift;  // keys in the race: (u >> hi) == prefix
    shift -= width;
    for (int x = threadIdx.x; x < 256; x += blockDim.x) hist[x] = 0;
    __syncthreads();
    for (int m = threadIdx.x; m < M; m += blockDim.x) {
      const unsigned long long u = keys[m];
      if (hi == 64 || (u >> hi) == prefix) atomicAdd(&hist[(u >> shift) & ((1u << width) - 1u)], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      unsigned t = 0;
      for (int j = 0; j < 8; ++j) t += hist[255 - 8 * lane - j];
      unsigned before = t;  // inclusive prefix over lanes, lane 0 = highest digits
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned o = __shfl_up_sync(0xffffffffu, before, off);
        if (lane >= off) before += o;
      }
      before -= t;
      if (before < (unsigned)krem && (unsigned)krem <= before + t) {
        unsigned cum = before;
        for (int j = 0; j < 8; ++j) {
          const int d = 255 - 8 * lane - j;
          if (cum + hist[d] >= (unsigned)krem) {
            s_digit = d, s_above = (int)cum, s_count = (int)hist[d];
            break;
          }
          cum += hist[d];
        }
      }
    }
    __syncthreads();
    prefix = (hi == 64 ? 0ull : prefix << width) | (unsigned long long)s_digit;
    krem -= s_above;
    ncand = s_count;
    __syncthreads();
  }
  // Winners: keys above the prefix range, then krem of the candidates (keys in the range).
  if (threadIdx.x == 0) s_out = 0, s_cand = 0;
  __syncthreads();
  auto above = [&](unsigned long long u) { return shift < 64 && (u >> shift) > prefix; };
  auto inside = [&](unsigned long long u) { return shift == 64 || (u >> shift) == prefix; };
  const bool rank_exact = ncand <= kCandCap;
  for (int m = threadIdx.x; m < M; m += blockDim.x) {
    const unsigned long long u = keys[m];
    if (above(u)) {
      const int pos = atomicAdd(&s_out, 1);
      sel_k[pos] = u, sel_i[pos] = m;
    } else if (rank_exact && inside(u)) {
      const int pos = atomicAdd(&s_cand, 1);
      cand_k[pos] = u, cand_i[pos] = m;
    }
  }
  __syncthreads();
  if (rank_exact) {
    const int nc = s_cand;
    for (int t = threadIdx.x; t < nc; t += blockDim.x) {
      const unsigned long long u = cand_k[t];
      const int i = cand_i[t];
      int r = 0;
      for (int j = 0; j < nc; ++j) r += Before(cand_k[j], cand_i[j], u, i);
      if (r < krem) {
        const int pos = atomicAdd(&s_out, 1);
        sel_k[pos] = u, sel_i[pos] = i;
      }
    }
  } else {
    // Every 64 bits resolved and still more than kCandCap equal keys: the lowest positions win.
    int taken = 0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int m0 = 0; m0 < M && taken < krem; m0 += blockDim.x) {
      const int m = m0 + threadIdx.x;
      const bool in = m < M && inside(keys[m]);
      const unsigned bal = __ballot_sync(0xffffffffu, in);
      if (lane == 0) warp_cnt[warp] = __popc(bal);
      __syncthreads();
      int before = taken;
      for (int w = 0; w < warp; ++w) before += warp_cnt[w];
      before += __popc(bal & ((1u << lane) - 1u));
      if (in && before < krem) {
        const int pos = atomicAdd(&s_out, 1);
        sel_k[pos] = keys[m], sel_i[pos] = m;
      }
      int total = 0;
      for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += warp_cnt[w];
      taken += total;
      __syncthreads();
    }
  }
  __syncthreads();
}

// The candidates the top-k of KV head h ranks: the range's, or the kept groups' pages (listed in
// the workspace, ascending, so position order is page order and ties still go to the lower page).
__device__ __forceinline__ int ListedCount(const SelectionParams& p, const Workspace& w, int h) {
  return p.groups != nullptr ? w.list_count[h] : p.num_candidates;
}

// One candidate's combined score, exactly as CombineToKeys computes it (same operations in the
// same order); mx / z: the softmax-mean's per-head maximum and sum.
__device__ __forceinline__ double CombineOne(int combine, const float* raw, int stride, int m, int G, const float* mx,
                                             const double* z) {
  double a = 0.0;
  for (int g = 0; g < G; ++g) {
    const double r = (double)raw[(size_t)g * stride + m];
    if (combine == kCombineMax) a = g == 0 ? r : fmax(a, r);
    else if (combine == kCombineMean) a += r;
    else a += exp(r - (double)mx[g]) / z[g];
  }
  return combine == kCombineMax ? a : a / G;
}

// Chunk blockIdx.x of KV head blockIdx.y of an item ranked in chunks: its candidates [m0, m1).
struct ChunkOf {
  SelectionParams p;
  Workspace w;
  int h = 0, G = 0, M = 0, c = 0, m0 = 0, m1 = 0;
  const float* raw = nullptr;  // [G][num_candidates]
};
template <bool kBatch>
__device__ __forceinline__ bool ChunkJob(const SelectionParams& p0, const SelectionParams* items, bool stats,
                                         ChunkOf& j) {
  j.p = kBatch ? items[blockIdx.z] : p0;
  const SelectionParams& p = j.p;
  j.h = blockIdx.y;
  if (!Chunked(p) || SkipsHead(p, j.h)) return false;
  if (stats && CombineOf(p) != kCombineSoftmaxMean) return false;
  j.w = CarveWorkspace(p);
  j.G = SelectionRows(p);
  j.M = ListedCount(p, j.w, j.h);
  j.c = blockIdx.x;
  j.m0 = j.c * TopChunk(p.k);
  j.m1 = min(j.M, j.m0 + TopChunk(p.k));
  j.raw = p.scratch + (size_t)j.h * j.G * p.num_candidates;
  return j.m0 < j.M;
}

// Softmax-mean, pass 1: each chunk's float maximum of every query head's raw scores (exact in any
// order) -> pmax[h * G + g][c].
template <bool kBatch>
__global__ void __launch_bounds__(kTopThreads) ChunkMaxKernel(const SelectionParams p0, const SelectionParams* items) {
  ChunkOf j;
  if (!ChunkJob<kBatch>(p0, items, true, j)) return;
  __shared__ float red_f[32];
  for (int g = 0; g < j.G; ++g) {
    const float* r = j.raw + (size_t)g * j.p.num_candidates;
    float mx = -3.4e38f;
    for (int m = j.m0 + threadIdx.x; m < j.m1; m += blockDim.x) mx = fmaxf(mx, r[m]);
    mx = BlockReduce(mx, [](float a, float b) { return fmaxf(a, b); }, red_f);
    if (threadIdx.x == 0) j.w.pmax[(size_t)(j.h * j.G + g) * j.w.NC + j.c] = mx;
  }
}

// The head maxima (over the chunks' maxima) and, with sums, the heads' sums of exp(raw - max)
// (the chunks' partial sums added in chunk order) of an item ranked in chunks, into s_mx / s_z.
__device__ __forceinline__ void ChunkStats(const ChunkOf& j, bool sums, float* s_mx, double* s_z) {
  const int nc = (j.M + TopChunk(j.p.k) - 1) / TopChunk(j.p.k);
  for (int g = threadIdx.x; g < j.G; g += blockDim.x) {
    const size_t row = (size_t)(j.h * j.G + g) * j.w.NC;
    float mx = -3.4e38f;
    for (int c = 0; c < nc; ++c) mx = fmaxf(mx, j.w.pmax[row + c]);
    s_mx[g] = mx;
    if (sums) {
      double z = 0.0;
      for (int c = 0; c < nc; ++c) z += j.w.psum[row + c];
      s_z[g] = z;
    }
  }
  __syncthreads();
}

// Softmax-mean, pass 2: each chunk's sum of exp(double(raw) - the head's maximum) -> psum.
template <bool kBatch>
__global__ void __launch_bounds__(kTopThreads) ChunkSumKernel(const SelectionParams p0, const SelectionParams* items) {
  ChunkOf j;
  if (!ChunkJob<kBatch>(p0, items, true, j)) return;
  __shared__ float s_mx[kChunkMaxG];
  __shared__ double red_d[32];
  ChunkStats(j, false, s_mx, nullptr);
  for (int g = 0; g < j.G; ++g) {
    const float* r = j.raw + (size_t)g * j.p.num_candidates;
    const double mx = (double)s_mx[g];
    double z = 0.0;
    for (int m = j.m0 + threadIdx.x; m < j.m1; m += blockDim.x) z += exp((double)r[m] - mx);
    z = BlockReduce(z, [](double a, double b) { return a + b; }, red_d);
    if (threadIdx.x == 0) j.w.psum[(size_t)(j.h * j.G + g) * j.w.NC + j.c] = z;
  }
}

// Each chunk's best min(k, n): combined (CombineOne) into shared keys, RadixTop, then written in
// candidate order to mkeys / midx at [h][c * k ...], the places past n as key 0 (below every real
// key: OrderedKey(x) > 0 for every non-NaN x). Dynamic shared memory: kChunkTopKSmem.
constexpr size_t kChunkTopKSmem = (size_t)kChunkMax * 8 + (size_t)(kRankSortMax + kCandCap) * 12;
template <bool kBatch>
__global__ void __launch_bounds__(kTopThreads) ChunkTopKKernel(const SelectionParams p0, const SelectionParams* items) {
  ChunkOf j;
  if (!ChunkJob<kBatch>(p0, items, false, j)) return;
  extern __shared__ unsigned long long sm_u[];
  unsigned long long* keys = sm_u;
  unsigned long long* sel_k = keys + kChunkMax;
  unsigned long long* cand_k = sel_k + kRankSortMax;
  int* sel_i = reinterpret_cast<int*>(cand_k + kCandCap);
  int* cand_i = sel_i + kRankSortMax;
  __shared__ float s_mx[kChunkMaxG];
  __shared__ double s_z[kChunkMaxG];
  const int combine = CombineOf(j.p);
  if (combine == kCombineSoftmaxMean) ChunkStats(j, true, s_mx, s_z);
  const int n = j.m1 - j.m0, k = j.p.k, kk = min(k, n);
  const int stride = j.p.num_candidates;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    keys[i] = OrderedKey(CombineOne(combine, j.raw, stride, j.m0 + i, j.G, s_mx, s_z));
  __syncthreads();
  RadixTop(keys, n, kk, sel_k, sel_i, cand_k, cand_i);
  unsigned long long* out_k = j.w.mkeys + (size_t)j.h * j.w.MM + (size_t)j.c * k;
  int* out_i = j.w.midx + (size_t)j.h * j.w.MM + (size_t)j.c * k;
  for (int t = threadIdx.x; t < kk; t += blockDim.x) {
    const int i = sel_i[t];
    int r = 0;
    for (int q = 0; q < kk; ++q) r += sel_i[q] < i;
    out_k[r] = sel_k[t];
    out_i[r] = j.m0 + i;
  }
  for (int t = kk + threadIdx.x; t < k; t += blockDim.x) out_k[t] = 0ull, out_i[t] = -1;
}

// Dynamic shared memory: sel_k[kRankSortMax] u64 | cand_k[kCandCap] u64 | sel_i[kRankSortMax] int |
// cand_i[kCandCap] int | keys[M] u64 (unless GlobalKeys or Chunked). Batched: item blockIdx.y of
// `items`; an item with more than kRankSortMax places is left to SelectionSortKernel. An item ranked
// in chunks ranks its chunks' winners (their keys are already combined).
template <bool kBatch>
__global__ void __launch_bounds__(kTopThreads)
    SelectionTopKKernel(const SelectionParams p0, const SelectionParams* items) {
  const SelectionParams p = kBatch ? items[blockIdx.y] : p0;
  const int h = blockIdx.x;
  if (SkipsHead(p, h)) return;
  if (kBatch && min(p.k, p.num_candidates) > kRankSortMax) return;
  const Workspace w = CarveWorkspace(p);
  const bool listed = p.groups != nullptr, chunked = Chunked(p);
  const int G = SelectionRows(p);
  const int Mh = ListedCount(p, w, h);
  const int M = chunked ? NumChunks(Mh, p.k) * p.k : Mh;  // the keys ranked
  const int kk = min(p.k, Mh);
  extern __shared__ unsigned long long sm_u[];
  unsigned long long* sel_k = sm_u;
  unsigned long long* cand_k = sel_k + kRankSortMax;
  int* sel_i = reinterpret_cast<int*>(cand_k + kCandCap);
  int* cand_i = sel_i + kRankSortMax;
  unsigned long long* keys = chunked ? w.mkeys + (size_t)h * w.MM
                             : GlobalKeys(p) ? w.keys + (size_t)h * w.M
                                             : reinterpret_cast<unsigned long long*>(cand_i + kCandCap);
  __shared__ double red_d[32 * kCombineChunk];
  __shared__ float red_f[32 * kCombineChunk];

  if (kk > 0) {
    if (!chunked) {
      CombineToKeys(p, CombineOf(p), p.scratch + (size_t)h * G * p.num_candidates, M, p.num_candidates, keys, red_d,
                    red_f);
      __syncthreads();
    }
    RadixTop(keys, M, kk, sel_k, sel_i, cand_k, cand_i);
    // Rank sort of the kk winners: best first, ties to the lower page (position order is
    // candidate order in both the list and the chunks' winners).
    for (int t = threadIdx.x; t < kk; t += blockDim.x) {
      const unsigned long long u = sel_k[t];
      const int i = sel_i[t];
      int r = 0;
      for (int j = 0; j < kk; ++j) r += Before(sel_k[j], sel_i[j], u, i);
      const int m = chunked ? w.midx[(size_t)h * w.MM + i] : i;
      p.selected[(size_t)h * p.k + r] = listed ? w.list[(size_t)h * w.M + m] : p.first_page + m;
    }
  }
  for (int t = kk + threadIdx.x; t < p.k; t += blockDim.x) p.selected[(size_t)h * p.k + t] = -1;
}
// ---- hierarchical: seeds and pruning ----

__device__ __forceinline__ double KeyToDouble(unsigned long long k) {
  const unsigned long long b = (k >> 63) ? (k & 0x7fffffffffffffffull) : ~k;
  return __longlong_as_double(static_cast<long long>(b));
}

// Block-wide exclusive prefix sum of one int per thread; *total gets the sum of all.
__device__ int BlockExclusiveScan(int v, int* warp_sums /* [32] */, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int x = v;
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += o;
  }
  __syncthreads();
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  int before = 0, all = 0;
  for (int i = 0; i < nw; ++i) {
    if (i < warp) before += warp_sums[i];
    all += warp_sums[i];
  }
  *total = all;
  return before + x - v;
}

// The candidate pages [lo, hi) of group ga + i of the range [c0, c1).
__device__ __forceinline__ void GroupPages(int ga, int i, int c0, int c1, int& lo, int& hi) {
  lo = max(c0, (ga + i) * kSelGroupPages);
  hi = min(c1, (ga + i + 1) * kSelGroupPages);
}

// After the group scoring: every group's combined bound (the pages' combine over the group's raw
// scores; the combines are monotone in every head's score, so it bounds the combined score of
// each page inside) into the workspace, then the seeds: the best groups (ties: the lower group)
// until they hold min(k, M) candidate pages. Dynamic shared memory: keys[NG] u64.
template <bool kBatch>
__global__ void __launch_bounds__(kTopThreads) HierSeedKernel(const SelectionParams p0, const SelectionParams* items) {
  const SelectionParams p = kBatch ? items[blockIdx.y] : p0;
  const int h = blockIdx.x;
  if (!p.groups || SkipsHead(p, h)) return;
  const Workspace w = CarveWorkspace(p);
  const int M = p.num_candidates, G = SelectionRows(p);
  if (M == 0) {
    if (threadIdx.x == 0) w.seed_count[h] = 0;
    return;
  }
  const int c0 = p.first_page, c1 = c0 + M;
  const int ga = c0 / kSelGroupPages, ng = (c1 - 1) / kSelGroupPages + 1 - ga;
  extern __shared__ unsigned long long sm_u[];
  unsigned long long* keys = sm_u;
  __shared__ double red_d[32 * kCombineChunk];
  __shared__ float red_f[32 * kCombineChunk];
  __shared__ unsigned long long red_u[32];
  __shared__ int red_i[32];
  CombineToKeys(p, CombineOf(p), w.graw + (size_t)h * G * w.NG, ng, w.NG, keys, red_d, red_f);
  __syncthreads();
  for (int i = threadIdx.x; i < ng; i += blockDim.x) w.gkey[(size_t)h * w.NG + i] = keys[i];
  const int kk = min(p.k, M);
  int seeded = 0;  // the same in every thread
  while (seeded < kk) {
    unsigned long long best = 0;  // 0: taken (OrderedKey of any double is > 0)
    for (int i = threadIdx.x; i < ng; i += blockDim.x) best = keys[i] > best ? keys[i] : best;
    best = BlockReduce(best, [](unsigned long long a, unsigned long long b) { return a > b ? a : b; }, red_u);
    if (best == 0) break;  // every group taken (they hold M >= kk pages: not reached)
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < ng; i += blockDim.x)
      if (keys[i] == best) bi = min(bi, i);
    bi = BlockReduce(bi, [](int a, int b) { return a < b ? a : b; }, red_i);
    int lo, hi;
    GroupPages(ga, bi, c0, c1, lo, hi);
    for (int t = threadIdx.x; t < hi - lo; t += blockDim.x) w.seed[(size_t)h * w.S + seeded + t] = lo + t;
    __syncthreads();
    if (threadIdx.x == 0) keys[bi] = 0;
    __syncthreads();
    seeded += hi - lo;
  }
  if (threadIdx.x == 0) w.seed_count[h] = seeded;
}

// After the seed scoring: theta, the min(k, M)-th best combined seed score, is a lower bound of
// the final k-th score (that many pages reach it). A group whose bound is below theta holds no
// page that reaches it, so none of the top k and none of its ties: dropped. The pages of the other
// groups, ascending, into the workspace's list (NaN bounds or a NaN theta keep every group).
// Dynamic shared memory: keys[S] u64.
template <bool kBatch>
__global__ void __launch_bounds__(kTopThreads) HierPruneKernel(const SelectionParams p0, const SelectionParams* items) {
  const SelectionParams p = kBatch ? items[blockIdx.y] : p0;
  const int h = blockIdx.x;
  if (!p.groups || SkipsHead(p, h)) return;
  const Workspace w = CarveWorkspace(p);
  const int M = p.num_candidates, G = SelectionRows(p);
  if (M == 0) {
    if (threadIdx.x == 0) w.list_count[h] = 0;
    return;
  }
  const int c0 = p.first_page, c1 = c0 + M;
  const int ga = c0 / kSelGroupPages, ng = (c1 - 1) / kSelGroupPages + 1 - ga;
  extern __shared__ unsigned long long sm_u[];
  unsigned long long* keys = sm_u;
  __shared__ double red_d[32 * kCombineChunk];
  __shared__ float red_f[32 * kCombineChunk];
  __shared__ int red_i[32];
  __shared__ unsigned long long s_theta;
  const int ns = w.seed_count[h];
  CombineToKeys(p, CombineOf(p), w.sraw + (size_t)h * G * w.S, ns, w.S, keys, red_d, red_f);
  if (threadIdx.x == 0) s_theta = 0;
  __syncthreads();
  const int kk = min(p.k, M);
  for (int t = threadIdx.x; t < ns; t += blockDim.x) {
    const unsigned long long u = keys[t];
    int ge = 0;
    for (int j = 0; j < ns; ++j) ge += keys[j] >= u;
    if (ge >= kk) atomicMax(&s_theta, u);
  }
  __syncthreads();
  const unsigned long long theta = s_theta;
  const bool keep_all = theta == 0 || isnan(KeyToDouble(theta));
  const unsigned long long* gk = w.gkey + (size_t)h * w.NG;
  auto keep = [&](int i) { return keep_all || gk[i] >= theta || isnan(KeyToDouble(gk[i])); };
  const int per = (ng + blockDim.x - 1) / blockDim.x;
  const int g_lo = min(ng, (int)threadIdx.x * per), g_hi = min(ng, g_lo + per);
  int cnt = 0, lo, hi;
  for (int i = g_lo; i < g_hi; ++i)
    if (keep(i)) {
      GroupPages(ga, i, c0, c1, lo, hi);
      cnt += hi - lo;
    }
  int total = 0;
  int pos = BlockExclusiveScan(cnt, red_i, &total);
  int* list = w.list + (size_t)h * w.M;
  for (int i = g_lo; i < g_hi; ++i)
    if (keep(i)) {
      GroupPages(ga, i, c0, c1, lo, hi);
      for (int pg = lo; pg < hi; ++pg) list[pos++] = pg;
    }
  if (threadIdx.x == 0) w.list_count[h] = total;
}

__host__ __device__ inline int NextPow2(int x) {
  int n = 1;
  while (n < x) n <<= 1;
  return n;
}

// k > kRankSortMax: combine as above, then a bitonic sort of every candidate.
// Dynamic shared memory: keys[np] u64 | idx[np] int. Batched: item blockIdx.y of `items` (np from
// its own candidates); an item with at most kRankSortMax places is left to SelectionTopKKernel.
template <bool kBatch>
__global__ void __launch_bounds__(kTopThreads)
    SelectionSortKernel(const SelectionParams p0, int np, const SelectionParams* items) {
  const SelectionParams p = kBatch ? items[blockIdx.y] : p0;
  const int h = blockIdx.x;
  if (SkipsHead(p, h)) return;
  const int M = p.num_candidates;
  if (kBatch) {
    if (min(p.k, M) <= kRankSortMax) return;
    np = NextPow2(max(M, 1));
  }
  extern __shared__ unsigned long long sm_u[];
  unsigned long long* keys = sm_u;
  int* idx = reinterpret_cast<int*>(keys + np);
  __shared__ double red_d[32 * kCombineChunk];
  __shared__ float red_f[32 * kCombineChunk];
  if (M > 0)
    CombineToKeys(p, p.combine, p.scratch + (size_t)h * SelectionRows(p) * M, M, M, keys, red_d, red_f);
  for (int m = threadIdx.x; m < np; m += blockDim.x) {
    if (m >= M) keys[m] = 0;  // below every real key (OrderedKey(x) > 0 for non-NaN x)
    idx[m] = m;
  }
  __syncthreads();
  for (int size = 2; size <= np; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < np; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const bool desc = (i & size) == 0;
          const unsigned long long ki = keys[i], kj = keys[j];
          const int ii = idx[i], ij = idx[j];
          const bool i_first = Before(ki, ii, kj, ij);
          if (desc ? !i_first : i_first) {
            keys[i] = kj, keys[j] = ki;
            idx[i] = ij, idx[j] = ii;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < p.k; i += blockDim.x) p.selected[(size_t)h * p.k + i] = i < M ? p.first_page + idx[i] : -1;
}

// Single (items == nullptr): grid (chunks of m candidates, kv_heads) for p. Batched: grid (chunks of
// m, kv_heads, count) over the device array items (m: the largest item's, for the pass).
struct ScoreLaunch {
  const SelectionParams& p;
  cudaStream_t stream;
  const SelectionParams* items = nullptr;
  int count = 1;
  int m = 0;
  int pass = kPassPages;
  int rows = 0;  // score rows per pass (SelectionBatchShape::score_rows)
  template <int NCH, int MAXG, int PASS>
  void Launch() const {
    const int needed = (m + kPagesPerBlock - 1) / kPagesPerBlock;
    if (items) {
      auto* kernel = SelectionScoreKernel<NCH, MAXG, true, PASS>;
      const dim3 grid(ScoreGridBlocks(reinterpret_cast<const void*>(kernel), needed), p.kv_heads, count);
      kernel<<<grid, kScoreThreads, 0, stream>>>(p, items);
    } else {
      auto* kernel = SelectionScoreKernel<NCH, MAXG, false, PASS>;
      const dim3 grid(ScoreGridBlocks(reinterpret_cast<const void*>(kernel), needed), p.kv_heads, count);
      kernel<<<grid, kScoreThreads, 0, stream>>>(p, nullptr);
    }
  }
  // Blocks per (KV head, item): one wave of the device over all of them (the warps then loop over
  // the pages), or `needed` (a warp per group of pages) when that is fewer or score_grid is 1. The
  // count depends only on the shape and the device, so a graphed step's launch stays the same.
  int ScoreGridBlocks(const void* kernel, int needed) const {
    if (p.score_grid == 1) return needed;
    const int wave = WaveBlocks(kernel);
    return std::max(1, std::min(needed, wave / std::max(1, p.kv_heads * count)));
  }
  static int WaveBlocks(const void* kernel) {
    static std::mutex mu;
    static std::vector<std::pair<std::pair<int, const void*>, int>> known;
    int dev = 0;
    FKV_CUDA_CHECK(cudaGetDevice(&dev));
    std::lock_guard<std::mutex> lock(mu);
    for (const auto& e : known)
      if (e.first.first == dev && e.first.second == kernel) return e.second;
    int sms = 0, per_sm = 0;
    FKV_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    FKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kScoreThreads, 0));
    const int wave = std::max(1, sms * std::max(1, per_sm));
    known.push_back({{dev, kernel}, wave});
    return wave;
  }
  template <int NCH, int MAXG>
  void Go() const {
    if (pass == kPassGroups) Launch<NCH, MAXG, kPassGroups>();
    else if (pass == kPassSeeds) Launch<NCH, MAXG, kPassSeeds>();
    else Launch<NCH, MAXG, kPassPages>();
  }
  template <int NCH>
  void ByG(int G) const {
    if (G <= 1) Go<NCH, 1>();
    else if (G <= 2) Go<NCH, 2>();
    else if (G <= 4) Go<NCH, 4>();
    else Go<NCH, 8>();  // G > 8 runs in passes of 8 heads
  }
  void Run() const {
    if (m <= 0) return;
    const int G = rows;
    if (p.head_dim <= 128) ByG<1>(G);
    else if (p.head_dim <= 256) ByG<2>(G);
    else ByG<4>(G);
    FKV_CUDA_CHECK_LAUNCH("SelectionScoreKernel");
  }
};

}  // namespace

size_t SelectionScratchBytes(const SelectionParams& p) {
  return (size_t)p.q_heads * (size_t)std::max(p.num_candidates, 1) * sizeof(float);
}

size_t SelectionWorkspaceBytes(const SelectionParams& p) {
  SelectionParams q = p;
  q.workspace = nullptr;
  return CarveWorkspace(q).bytes;
}

namespace {
void CheckSelection(const SelectionParams& p) {
  Require(p.kv_heads > 0 && p.q_heads > 0 && p.q_heads % p.kv_heads == 0,
          "selection: q_heads must be a positive multiple of kv_heads");
  Require(p.k > 0, "selection: k must be > 0");
  Require(p.num_candidates >= 0 && p.num_candidates <= kMaxSelectionCandidates,
          "selection: num_candidates must be in [0, " + std::to_string(kMaxSelectionCandidates) + "], got " +
              std::to_string(p.num_candidates));
  Require(p.combine >= kCombineSoftmaxMean && p.combine <= kCombineMax, "selection: unknown combine");
  Require(p.head_dim > 0 && p.head_dim % 4 == 0 && p.head_dim <= 512,
          "selection: head_dim must be a multiple of 4 in [4, 512], got " + std::to_string(p.head_dim));
  Require(p.q && p.summaries && p.scratch && p.selected, "selection: a device pointer is null");
  if (Chunked(p))
    Require(p.workspace != nullptr, "selection: above " + std::to_string(2 * TopChunk(p.k)) +
                                        " candidates for k " + std::to_string(p.k) + ", the workspace must be set");
  if (GlobalKeys(p)) {
    Require(p.workspace != nullptr, "selection: hierarchical or above " + std::to_string(kMaxSharedCandidates) +
                                        " candidates, the workspace must be set");
    Require(std::min(p.k, p.num_candidates) <= kRankSortMax,
            "selection: hierarchical or above " + std::to_string(kMaxSharedCandidates) + " candidates, k must be <= " +
                std::to_string(kRankSortMax));
  }
  if (p.groups)
    Require(HierarchicalCombine(p.combine, p.q_heads, p.kv_heads),
            "selection: the hierarchical selection takes the mean or max combine (softmax-mean with one query head "
            "per KV head)");
}

// The kernels' dynamic shared memory limit is only ever raised (per device and kernel): a launch
// captured into a CUDA graph with a larger size must stay valid when a later direct launch needs
// less.
void EnsureDynamicSmem(const void* kernel, int which, size_t bytes) {
  static std::mutex mu;
  static int limit[64][12] = {};
  int dev = 0;
  FKV_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  int& cur = limit[dev & 63][which];
  if ((int)bytes <= cur) return;
  FKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  cur = (int)bytes;
}

size_t TopKSmem(int shared_m) { return kTopKFixedSmem + (size_t)std::max(shared_m, 0) * 8; }

// Every launch of one selection (single: items == nullptr, host[0] by value) or of a batch
// (items: device array, host: the same on the host), in shape `sh`: the hierarchical passes
// (groups, seeds, pruning) when an item has group bounds, then the page scoring, the top-k and
// the sort.
void LaunchAll(const SelectionParams* items, const SelectionParams* host, int count, const SelectionBatchShape& sh,
               cudaStream_t stream) {
  const SelectionParams& p0 = host[0];
  const bool batch = items != nullptr;
  const int B = batch ? count : 1;
  if (sh.group_m > 0) {
    ScoreLaunch{p0, stream, items, B, sh.group_m, kPassGroups, sh.score_rows}.Run();
    const size_t seed_smem = (size_t)sh.group_m * 8;
    if (batch) {
      EnsureDynamicSmem(reinterpret_cast<const void*>(HierSeedKernel<true>), 4, seed_smem);
      HierSeedKernel<true><<<dim3(p0.kv_heads, B), kTopThreads, seed_smem, stream>>>(p0, items);
    } else {
      EnsureDynamicSmem(reinterpret_cast<const void*>(HierSeedKernel<false>), 5, seed_smem);
      HierSeedKernel<false><<<p0.kv_heads, kTopThreads, seed_smem, stream>>>(p0, nullptr);
    }
    FKV_CUDA_CHECK_LAUNCH("HierSeedKernel");
    ScoreLaunch{p0, stream, items, B, sh.seed_m, kPassSeeds, sh.score_rows}.Run();
    const size_t prune_smem = (size_t)sh.seed_m * 8;
    if (batch) {
      EnsureDynamicSmem(reinterpret_cast<const void*>(HierPruneKernel<true>), 6, prune_smem);
      HierPruneKernel<true><<<dim3(p0.kv_heads, B), kTopThreads, prune_smem, stream>>>(p0, items);
    } else {
      EnsureDynamicSmem(reinterpret_cast<const void*>(HierPruneKernel<false>), 7, prune_smem);
      HierPruneKernel<false><<<p0.kv_heads, kTopThreads, prune_smem, stream>>>(p0, nullptr);
    }
    FKV_CUDA_CHECK_LAUNCH("HierPruneKernel");
  }
  ScoreLaunch{p0, stream, items, B, sh.score_m, kPassPages, sh.score_rows}.Run();
  if (sh.chunk_n > 0) {
    const dim3 grid(sh.chunk_n, p0.kv_heads, B);
    if (sh.chunk_stats) {
      if (batch) {
        ChunkMaxKernel<true><<<grid, kTopThreads, 0, stream>>>(p0, items);
        ChunkSumKernel<true><<<grid, kTopThreads, 0, stream>>>(p0, items);
      } else {
        ChunkMaxKernel<false><<<grid, kTopThreads, 0, stream>>>(p0, nullptr);
        ChunkSumKernel<false><<<grid, kTopThreads, 0, stream>>>(p0, nullptr);
      }
      FKV_CUDA_CHECK_LAUNCH("ChunkMaxKernel / ChunkSumKernel");
    }
    if (batch) {
      EnsureDynamicSmem(reinterpret_cast<const void*>(ChunkTopKKernel<true>), 8, kChunkTopKSmem);
      ChunkTopKKernel<true><<<grid, kTopThreads, kChunkTopKSmem, stream>>>(p0, items);
    } else {
      EnsureDynamicSmem(reinterpret_cast<const void*>(ChunkTopKKernel<false>), 9, kChunkTopKSmem);
      ChunkTopKKernel<false><<<grid, kTopThreads, kChunkTopKSmem, stream>>>(p0, nullptr);
    }
    FKV_CUDA_CHECK_LAUNCH("ChunkTopKKernel");
  }
  if (sh.topk_m >= 0) {
    const size_t smem = TopKSmem(sh.topk_m);
    if (batch) {
      EnsureDynamicSmem(reinterpret_cast<const void*>(SelectionTopKKernel<true>), 2, smem);
      SelectionTopKKernel<true><<<dim3(p0.kv_heads, B), kTopThreads, smem, stream>>>(p0, items);
    } else {
      EnsureDynamicSmem(reinterpret_cast<const void*>(SelectionTopKKernel<false>), 0, smem);
      SelectionTopKKernel<false><<<p0.kv_heads, kTopThreads, smem, stream>>>(p0, nullptr);
    }
    FKV_CUDA_CHECK_LAUNCH("SelectionTopKKernel");
  }
  if (sh.sort_np > 0) {
    const size_t smem = (size_t)sh.sort_np * 12;
    if (batch) {
      EnsureDynamicSmem(reinterpret_cast<const void*>(SelectionSortKernel<true>), 3, smem);
      SelectionSortKernel<true><<<dim3(p0.kv_heads, B), kTopThreads, smem, stream>>>(p0, 0, items);
    } else {
      EnsureDynamicSmem(reinterpret_cast<const void*>(SelectionSortKernel<false>), 1, smem);
      SelectionSortKernel<false><<<p0.kv_heads, kTopThreads, smem, stream>>>(p0, sh.sort_np, nullptr);
    }
    FKV_CUDA_CHECK_LAUNCH("SelectionSortKernel");
  }
}

// Exact (unrounded) shape of one selection.
SelectionBatchShape ShapeOf(const SelectionParams* host_items, int count, bool round) {
  SelectionBatchShape sh;
  int max_m = 0, max_topk_m = -1, max_sort_np = 0, max_g = 0, max_s = 0, max_chunks = 0, stats = 0, rows = 0;
  auto up = [&](int m) {
    return round ? std::min((m + kShapeQuantum - 1) / kShapeQuantum * kShapeQuantum, kMaxSelectionCandidates) : m;
  };
  for (int i = 0; i < count; ++i) {
    const SelectionParams& p = host_items[i];
    max_m = std::max(max_m, p.num_candidates);
    rows = std::max(rows, SelectionRows(p));
    if (Chunked(p)) {
      // Rounded like the scoring (an item keeps its chunk count's bound for 256 pages of growth).
      max_chunks = std::max(max_chunks, NumChunks(up(p.num_candidates), p.k));
      if (CombineOf(p) == kCombineSoftmaxMean) stats = 1;
    }
    if (std::min(p.k, p.num_candidates) <= kRankSortMax)
      max_topk_m = std::max(max_topk_m, GlobalKeys(p) || Chunked(p) ? 0 : p.num_candidates);
    else max_sort_np = std::max(max_sort_np, NextPow2(std::max(p.num_candidates, 1)));
    if (p.groups && p.num_candidates > 0) {
      max_g = std::max(max_g, SpanGroups(p.num_candidates));
      max_s = std::max(max_s, SeedCap(p.k));
    }
  }
  // Rounded up (blocks past an item's own candidates exit; the top-k's shared memory is a bound),
  // so that a graphed step keeps its shape for 256 pages of context growth.
  sh.chunk_n = max_chunks;
  sh.chunk_stats = stats;
  sh.score_rows = rows;
  sh.score_m = max_m > 0 ? up(max_m) : 0;
  sh.topk_m = max_topk_m > 0 ? up(max_topk_m) : max_topk_m;
  sh.sort_np = max_sort_np;
  // Hierarchical: the groups a range can touch (rounded with the candidates: 256 / 32 + 2).
  sh.group_m = max_g > 0 ? (round ? SpanGroups(up(max_m)) : max_g) : 0;
  sh.seed_m = max_s;
  return sh;
}

}  // namespace

void LaunchSelection(const SelectionParams& p, cudaStream_t stream) {
  CheckSelection(p);
  LaunchAll(nullptr, &p, 1, ShapeOf(&p, 1, false), stream);
}

long long HierarchicalPagesScored(const SelectionParams& p, cudaStream_t stream) {
  Require(p.groups && p.workspace, "HierarchicalPagesScored: not a hierarchical selection");
  const Workspace w = CarveWorkspace(p);
  std::vector<int> n(p.kv_heads);
  FKV_CUDA_CHECK(cudaMemcpyAsync(n.data(), w.list_count, sizeof(int) * p.kv_heads, cudaMemcpyDeviceToHost, stream));
  FKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  long long s = 0;
  for (int x : n) s += x;
  return s;
}

SelectionBatchShape SelectionBatchShapeOf(const SelectionParams* host_items, int count) {
  return ShapeOf(host_items, count, true);
}

void LaunchSelectionBatch(const SelectionParams* items, const SelectionParams* host_items, int count,
                          cudaStream_t stream) {
  if (count == 0) return;
  Require(count > 0 && count <= 65535 && items && host_items, "selection batch: count must be in [1, 65535]");
  const SelectionParams& p0 = host_items[0];
  for (int i = 0; i < count; ++i) {
    const SelectionParams& p = host_items[i];
    CheckSelection(p);
    Require(p.q_heads == p0.q_heads && p.kv_heads == p0.kv_heads && p.head_dim == p0.head_dim,
            "selection batch: the items' geometries differ");
  }
  LaunchAll(items, host_items, count, SelectionBatchShapeOf(host_items, count), stream);
}

}  // namespace freekv::cuda
