#include "cuda/cuda_check.cuh"
#include "summary.cuh"

namespace freekv::cuda {
namespace {

// A group's bounds folded with a page's: the larger hi, the smaller lo; a NaN sticks (the CPU
// engine's FoldPageIntoGroup).
__device__ __forceinline__ float FoldHi(float g, float x) { return isnan(g) ? g : (isnan(x) || x > g ? x : g); }
__device__ __forceinline__ float FoldLo(float g, float x) { return isnan(g) ? g : (isnan(x) || x < g ? x : g); }

// grid (ceil(kv_heads * head_dim / 128), count); one thread per channel. Batched: page blockIdx.y
// is items[blockIdx.y].page, its summary goes to items[blockIdx.y].summary.
template <bool kBatch>
__global__ void PageSummaryKernel(const __nv_bfloat16* pages, __nv_bfloat16* summaries, int kv_heads, int head_dim,
                                  int page_size, int kind, const PageSummaryItem* items) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  int page = blockIdx.y;
  if (kBatch) {
    const PageSummaryItem it = items[blockIdx.y];
    if (!it.page) return;  // no page this step (a graphed step keeps one item per session)
    pages = it.page;
    summaries = it.summary;
    kind = it.kind;
    page = 0;
  }
  const int C = kv_heads * head_dim;
  if (ch >= C) return;
  const __nv_bfloat16* k = pages + (size_t)page * 2 * page_size * C + ch;  // K half of the page
  float hi = -3.4e38f, lo = 3.4e38f;
  for (int t = 0; t < page_size; ++t) {
    const float x = __bfloat162float(k[(size_t)t * C]);
    hi = fmaxf(hi, x);
    lo = fminf(lo, x);
  }
  if (kind == kSummaryCuboidMean) {
    const float c = __fmul_rn(0.5f, __fadd_rn(hi, lo));
    double acc = 0.0;  // as the CPU backend: the same float radius bit for bit
    for (int t = 0; t < page_size; ++t) acc += (double)fabsf(__fsub_rn(__bfloat162float(k[(size_t)t * C]), c));
    const float r = (float)(acc / page_size);
    hi = __fadd_rn(c, r);
    lo = __fsub_rn(c, r);
  }
  hi = Bf16RoundUp(hi);
  lo = Bf16RoundDown(lo);
  const int h = ch / head_dim, d = ch % head_dim;
  // hi and lo are bf16 values (NaN stays NaN): the conversions are exact.
  __nv_bfloat16* s = summaries + ((size_t)page * kv_heads + h) * 2 * head_dim;
  s[d] = __float2bfloat16_rn(hi);
  s[head_dim + d] = __float2bfloat16_rn(lo);
  if (kBatch && items[blockIdx.y].group) {
    __nv_bfloat16* g = items[blockIdx.y].group + (size_t)h * 2 * head_dim;
    if (items[blockIdx.y].first) {
      g[d] = __float2bfloat16_rn(hi);
      g[head_dim + d] = __float2bfloat16_rn(lo);
    } else {
      g[d] = __float2bfloat16_rn(FoldHi(__bfloat162float(g[d]), hi));
      g[head_dim + d] = __float2bfloat16_rn(FoldLo(__bfloat162float(g[head_dim + d]), lo));
    }
  }
}

// grid (ceil(kv_heads * head_dim / 128), groups); one thread per channel.
__global__ void GroupBoundsKernel(const __nv_bfloat16* summaries, __nv_bfloat16* groups, int page_from, int page_to, int kv_heads,
                                  int head_dim, int group_pages) {
  const int ch = blockIdx.x * blockDim.x + threadIdx.x;
  const int C = kv_heads * head_dim;
  if (ch >= C) return;
  const int gi = page_from / group_pages + blockIdx.y;
  const int h = ch / head_dim, d = ch % head_dim;
  const int p0 = gi * group_pages, p1 = min(page_to, p0 + group_pages);
  float hi = 0.f, lo = 0.f;
  for (int p = p0; p < p1; ++p) {
    const __nv_bfloat16* s = summaries + ((size_t)p * kv_heads + h) * 2 * head_dim;
    const float sh = __bfloat162float(s[d]), sl = __bfloat162float(s[head_dim + d]);
    hi = p == p0 ? sh : FoldHi(hi, sh);
    lo = p == p0 ? sl : FoldLo(lo, sl);
  }
  __nv_bfloat16* g = groups + ((size_t)gi * kv_heads + h) * 2 * head_dim;
  g[d] = __float2bfloat16_rn(hi);
  g[head_dim + d] = __float2bfloat16_rn(lo);
}

}  // namespace

void LaunchPageSummary(const __nv_bfloat16* pages, int count, __nv_bfloat16* summaries, int kv_heads, int head_dim,
                       int page_size, int kind, cudaStream_t stream) {
  if (count == 0) return;
  Require(count > 0 && pages && summaries, "page summary: count must be > 0 and pointers set");
  Require(kind == kSummaryMaxMin || kind == kSummaryCuboidMean, "page summary: unknown summary kind");
  Require(count <= 65535, "page summary: at most 65535 pages per launch");
  const int C = kv_heads * head_dim;
  PageSummaryKernel<false><<<dim3((C + 127) / 128, count), 128, 0, stream>>>(pages, summaries, kv_heads, head_dim,
                                                                             page_size, kind, nullptr);
  FKV_CUDA_CHECK_LAUNCH("PageSummaryKernel");
}

void LaunchPageSummaryBatch(const PageSummaryItem* items, int count, int kv_heads, int head_dim, int page_size,
                            cudaStream_t stream) {
  if (count == 0) return;
  Require(count > 0 && count <= 65535 && items, "page summary batch: count must be in [1, 65535], items set");
  const int C = kv_heads * head_dim;
  PageSummaryKernel<true><<<dim3((C + 127) / 128, count), 128, 0, stream>>>(nullptr, nullptr, kv_heads, head_dim,
                                                                            page_size, 0, items);
  FKV_CUDA_CHECK_LAUNCH("PageSummaryKernel(batch)");
}

void LaunchGroupBounds(const __nv_bfloat16* summaries, __nv_bfloat16* groups, int page_from, int page_to, int kv_heads,
                       int head_dim, int group_pages, cudaStream_t stream) {
  if (page_to <= page_from) return;
  Require(page_from >= 0 && summaries && groups && group_pages > 0, "group bounds: bad arguments");
  const int ng = (page_to - 1) / group_pages - page_from / group_pages + 1;
  Require(ng <= 65535, "group bounds: at most 65535 groups per launch");
  const int C = kv_heads * head_dim;
  GroupBoundsKernel<<<dim3((C + 127) / 128, ng), 128, 0, stream>>>(summaries, groups, page_from, page_to, kv_heads,
                                                                   head_dim, group_pages);
  FKV_CUDA_CHECK_LAUNCH("GroupBoundsKernel");
}

}  // namespace freekv::cuda
