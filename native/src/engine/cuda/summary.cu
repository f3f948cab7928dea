#include "cuda/cuda_check.cuh"
#include "summary.cuh"

namespace freekv::cuda {
namespace {

// grid (ceil(kv_heads * head_dim / 128), count); one thread per channel. Batched: page blockIdx.y
// is items[blockIdx.y].page, its summary goes to items[blockIdx.y].summary.
template <bool kBatch>
__global__ void PageSummaryKernel(const __nv_bfloat16* pages, float* summaries, int kv_heads, int head_dim,
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
  float* s = summaries + ((size_t)page * kv_heads + h) * 2 * head_dim;
  s[d] = hi;
  s[head_dim + d] = lo;
}

}  // namespace

void LaunchPageSummary(const __nv_bfloat16* pages, int count, float* summaries, int kv_heads, int head_dim,
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

}  // namespace freekv::cuda
