// Selection in two launches, so that the scoring is bandwidth bound over the summaries and only
// the small per-KV-head part runs one block per head (native/src/engine/cuda/PERF.md has the figures):
//
//   1. SelectionScoreKernel, grid (page chunks, kv_heads): a warp scores 4 pages at a time for
//      all query heads of the group (16-byte loads of the hi/lo rows, q in registers), the
//      lane partial sums reduced by a transposing butterfly; raw scores -> scratch [h][g][m].
//   2. SelectionTopKKernel, one block per KV head: the group combine in double (the CPU engine's
//      precision and order: per head in order, softmax of the raw scores shifted by their float
//      max, then the mean), the combined scores as order-preserving 64-bit keys in shared
//      memory, a radix select (the bits all keys share skipped, then 8 bits a pass) down to at
//      most kCandCap candidates for the k-th place, an exact rank among those (ties: the lower
//      page), and a rank sort of the k winners
//      (best first; ties: the lower page), exactly as the CPU's TopK orders them.
//      For k > kRankSortMax the whole candidate set is bitonic-sorted instead.
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>

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

// ---- 1. scoring ----

// NCH: float4 chunks of a hi (or lo) row per lane (D <= 128 * NCH); MAXG: query heads per pass.
// Batched: item blockIdx.z of `items`.
template <int NCH, int MAXG, bool kBatch>
__global__ void __launch_bounds__(kScoreThreads)
    SelectionScoreKernel(const SelectionParams p0, const SelectionParams* items) {
  const SelectionParams p = kBatch ? items[blockIdx.z] : p0;
  const int h = blockIdx.y;
  if (p.head_mask && p.head_mask[h] == 0) return;
  const int G = p.q_heads / p.kv_heads, D = p.head_dim, M = p.num_candidates, D4 = D / 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int m0 = blockIdx.x * kPagesPerBlock + warp * kPagesPerWarp;
  if (m0 >= M) return;  // whole warps leave together
  float* raw = p.scratch + (size_t)h * G * M;
  for (int g0 = 0; g0 < G; g0 += MAXG) {
    float4 q[MAXG][NCH];
#pragma unroll
    for (int g = 0; g < MAXG; ++g)
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        const int d4 = lane + 32 * c;
        q[g][c] = g0 + g < G && d4 < D4
                      ? reinterpret_cast<const float4*>(p.q + ((size_t)h * G + g0 + g) * D)[d4]
                      : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    float4 hi[kPagesPerWarp][NCH], lo[kPagesPerWarp][NCH];
#pragma unroll
    for (int u = 0; u < kPagesPerWarp; ++u) {
      const int m = m0 + u;
      const float4* s = reinterpret_cast<const float4*>(
          p.summaries + ((size_t)(p.first_page + (m < M ? m : 0)) * p.kv_heads + h) * 2 * D);
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        const int d4 = lane + 32 * c;
        const bool ok = m < M && d4 < D4;
        hi[u][c] = ok ? __ldg(s + d4) : make_float4(0.f, 0.f, 0.f, 0.f);
        lo[u][c] = ok ? __ldg(s + D4 + d4) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    float v[kPagesPerWarp * MAXG];
#pragma unroll
    for (int u = 0; u < kPagesPerWarp; ++u)
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        float a = 0.f;
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
          const float4 qq = q[g][c], hh = hi[u][c], ll = lo[u][c];
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
        if (g0 + g < G && m < M) raw[(size_t)(g0 + g) * M + m] = v[c];
      }
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

// Combined scores of KV head h in double, as the CPU engine's CombineGroup computes them, into
// keys[m] (as OrderedKey) for m < M. The double accumulators live in `keys` itself (same bytes,
// converted in place at the end); every thread only touches m = threadIdx.x + i * blockDim.x.
// Softmax-mean: the float maxima of up to 4 heads in one block reduction, their sums of
// exp(double(s) - max) in a second; the exponentials are recomputed for the accumulation
// (cheaper than more barriers), and added head by head in order, as on the CPU.
__device__ void CombineToKeys(const SelectionParams& p, int h, unsigned long long* keys, double* red_d,
                              float* red_f) {
  const int G = p.q_heads / p.kv_heads, M = p.num_candidates;
  const float* raw = p.scratch + (size_t)h * G * M;
  double* acc = reinterpret_cast<double*>(keys);
  for (int m = threadIdx.x; m < M; m += kTopThreads) acc[m] = 0.0;
  if (p.combine == kCombineMax || p.combine == kCombineMean) {
    for (int g = 0; g < G; ++g) {
      const float* r = raw + (size_t)g * M;
      if (p.combine == kCombineMax) {
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
          const float* r = raw + (size_t)(g0 + j) * M;
          for (int m = threadIdx.x; m < M; m += kTopThreads) mx[j] = fmaxf(mx[j], r[m]);
        }
      }
      BlockReduceVec(mx, [](float a, float b) { return fmaxf(a, b); }, red_f);
#pragma unroll
      for (int j = 0; j < kCombineChunk; ++j) {
        z[j] = 0.0;
        if (g0 + j < G) {
          const float* r = raw + (size_t)(g0 + j) * M;
          for (int m = threadIdx.x; m < M; m += kTopThreads) z[j] += exp((double)r[m] - (double)mx[j]);
        }
      }
      BlockReduceVec(z, [](double a, double b) { return a + b; }, red_d);
      for (int m = threadIdx.x; m < M; m += kTopThreads) {
        double a = acc[m];
#pragma unroll
        for (int j = 0; j < kCombineChunk; ++j)
          if (g0 + j < G) a += exp((double)raw[(size_t)(g0 + j) * M + m] - (double)mx[j]) / z[j];
        acc[m] = a;
      }
    }
  }
  for (int m = threadIdx.x; m < M; m += kTopThreads)
    keys[m] = OrderedKey(p.combine == kCombineMax ? acc[m] : acc[m] / G);
}

// Dynamic shared memory: keys[M] u64 | sel_k[kRankSortMax] u64 | cand_k[kCandCap] u64 |
// sel_i[kRankSortMax] int | cand_i[kCandCap] int. Batched: item blockIdx.y of `items`; an item
// with more than kRankSortMax places is left to SelectionSortKernel.
template <bool kBatch>
__global__ void __launch_bounds__(kTopThreads)
    SelectionTopKKernel(const SelectionParams p0, const SelectionParams* items) {
  const SelectionParams p = kBatch ? items[blockIdx.y] : p0;
  const int h = blockIdx.x;
  if (p.head_mask && p.head_mask[h] == 0) return;
  const int M = p.num_candidates;
  const int kk = min(p.k, M);
  if (kBatch && kk > kRankSortMax) return;
  extern __shared__ unsigned long long sm_u[];
  unsigned long long* keys = sm_u;
  unsigned long long* sel_k = keys + M;
  unsigned long long* cand_k = sel_k + kRankSortMax;
  int* sel_i = reinterpret_cast<int*>(cand_k + kCandCap);
  int* cand_i = sel_i + kRankSortMax;
  __shared__ double red_d[32 * kCombineChunk];
  __shared__ float red_f[32 * kCombineChunk];
  __shared__ unsigned long long red_u[64];
  __shared__ unsigned hist[256];
  __shared__ int s_digit, s_above, s_count, s_out, s_cand;
  __shared__ int warp_cnt[32];

  if (kk > 0) {
    CombineToKeys(p, h, keys, red_d, red_f);
    __syncthreads();
    // Radix select: narrow the candidates for the last places of the top kk. The bits every
    // key shares (from the block's min and max key) are skipped; then 8 bits a pass.
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
      // Every 64 bits resolved and still more than kCandCap equal keys: the lowest pages win.
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
    // Rank sort of the kk winners: best first, ties to the lower page.
    for (int t = threadIdx.x; t < kk; t += blockDim.x) {
      const unsigned long long u = sel_k[t];
      const int i = sel_i[t];
      int r = 0;
      for (int j = 0; j < kk; ++j) r += Before(sel_k[j], sel_i[j], u, i);
      p.selected[(size_t)h * p.k + r] = p.first_page + i;
    }
  }
  for (int t = kk + threadIdx.x; t < p.k; t += blockDim.x) p.selected[(size_t)h * p.k + t] = -1;
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
  if (p.head_mask && p.head_mask[h] == 0) return;
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
  if (M > 0) CombineToKeys(p, h, keys, red_d, red_f);
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

// Single (items == nullptr): grid (page chunks, kv_heads) for p. Batched: grid (page chunks of
// the largest item, kv_heads, count) over the device array items.
struct ScoreLaunch {
  const SelectionParams& p;
  cudaStream_t stream;
  const SelectionParams* items = nullptr;
  int count = 1;
  template <int NCH, int MAXG>
  void Go() const {
    const dim3 grid((p.num_candidates + kPagesPerBlock - 1) / kPagesPerBlock, p.kv_heads, count);
    if (items) SelectionScoreKernel<NCH, MAXG, true><<<grid, kScoreThreads, 0, stream>>>(p, items);
    else SelectionScoreKernel<NCH, MAXG, false><<<grid, kScoreThreads, 0, stream>>>(p, nullptr);
  }
  template <int NCH>
  void ByG(int G) const {
    if (G <= 1) Go<NCH, 1>();
    else if (G <= 2) Go<NCH, 2>();
    else if (G <= 4) Go<NCH, 4>();
    else Go<NCH, 8>();  // G > 8 runs in passes of 8 heads
  }
};

}  // namespace

size_t SelectionScratchBytes(const SelectionParams& p) {
  return (size_t)p.q_heads * (size_t)std::max(p.num_candidates, 1) * sizeof(float);
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
}
}  // namespace

namespace {
// The kernels' dynamic shared memory limit is only ever raised (per device and kernel): a launch
// captured into a CUDA graph with a larger size must stay valid when a later direct launch needs
// less.
void EnsureDynamicSmem(const void* kernel, int which, size_t bytes) {
  static std::mutex mu;
  static int limit[64][4] = {};
  int dev = 0;
  FKV_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  int& cur = limit[dev & 63][which];
  if ((int)bytes <= cur) return;
  FKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  cur = (int)bytes;
}
}  // namespace

void LaunchSelection(const SelectionParams& p, cudaStream_t stream) {
  CheckSelection(p);
  const int G = p.q_heads / p.kv_heads;
  if (p.num_candidates > 0) {
    const ScoreLaunch sl{p, stream};
    if (p.head_dim <= 128) sl.ByG<1>(G);
    else if (p.head_dim <= 256) sl.ByG<2>(G);
    else sl.ByG<4>(G);
    FKV_CUDA_CHECK_LAUNCH("SelectionScoreKernel");
  }
  const int kk = std::min(p.k, p.num_candidates);
  if (kk <= kRankSortMax) {
    const size_t smem = (size_t)p.num_candidates * 8 + (size_t)(kRankSortMax + kCandCap) * 12;
    EnsureDynamicSmem(reinterpret_cast<const void*>(SelectionTopKKernel<false>), 0, smem);
    SelectionTopKKernel<false><<<p.kv_heads, kTopThreads, smem, stream>>>(p, nullptr);
    FKV_CUDA_CHECK_LAUNCH("SelectionTopKKernel");
  } else {
    const int np = NextPow2(std::max(p.num_candidates, 1));
    const size_t smem = (size_t)np * 12;
    EnsureDynamicSmem(reinterpret_cast<const void*>(SelectionSortKernel<false>), 1, smem);
    SelectionSortKernel<false><<<p.kv_heads, kTopThreads, smem, stream>>>(p, np, nullptr);
    FKV_CUDA_CHECK_LAUNCH("SelectionSortKernel");
  }
}

SelectionBatchShape SelectionBatchShapeOf(const SelectionParams* host_items, int count) {
  SelectionBatchShape sh;
  int max_m = 0, max_topk_m = -1, max_sort_np = 0;
  for (int i = 0; i < count; ++i) {
    const SelectionParams& p = host_items[i];
    max_m = std::max(max_m, p.num_candidates);
    if (std::min(p.k, p.num_candidates) <= kRankSortMax) max_topk_m = std::max(max_topk_m, p.num_candidates);
    else max_sort_np = std::max(max_sort_np, NextPow2(std::max(p.num_candidates, 1)));
  }
  // Rounded up (blocks past an item's own candidates exit; the top-k's shared memory is a bound),
  // so that a graphed step keeps its shape for 256 pages of context growth.
  auto up = [](int m) { return std::min((m + kShapeQuantum - 1) / kShapeQuantum * kShapeQuantum, kMaxSelectionCandidates); };
  sh.score_m = max_m > 0 ? up(max_m) : 0;
  sh.topk_m = max_topk_m >= 0 ? up(max_topk_m) : -1;
  sh.sort_np = max_sort_np;
  return sh;
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
  const SelectionBatchShape sh = SelectionBatchShapeOf(host_items, count);
  const int G = p0.q_heads / p0.kv_heads;
  if (sh.score_m > 0) {
    SelectionParams shape = p0;  // grid shape only: the kernels read their items from `items`
    shape.num_candidates = sh.score_m;
    const ScoreLaunch sl{shape, stream, items, count};
    if (p0.head_dim <= 128) sl.ByG<1>(G);
    else if (p0.head_dim <= 256) sl.ByG<2>(G);
    else sl.ByG<4>(G);
    FKV_CUDA_CHECK_LAUNCH("SelectionScoreKernel(batch)");
  }
  if (sh.topk_m >= 0) {
    const size_t smem = (size_t)sh.topk_m * 8 + (size_t)(kRankSortMax + kCandCap) * 12;
    EnsureDynamicSmem(reinterpret_cast<const void*>(SelectionTopKKernel<true>), 2, smem);
    SelectionTopKKernel<true><<<dim3(p0.kv_heads, count), kTopThreads, smem, stream>>>(p0, items);
    FKV_CUDA_CHECK_LAUNCH("SelectionTopKKernel(batch)");
  }
  if (sh.sort_np > 0) {
    const size_t smem = (size_t)sh.sort_np * 12;
    EnsureDynamicSmem(reinterpret_cast<const void*>(SelectionSortKernel<true>), 3, smem);
    SelectionSortKernel<true><<<dim3(p0.kv_heads, count), kTopThreads, smem, stream>>>(p0, 0, items);
    FKV_CUDA_CHECK_LAUNCH("SelectionSortKernel(batch)");
  }
}

}  // namespace freekv::cuda
