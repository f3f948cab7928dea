// Exact causal attention for a chunk of prompt queries (PrefillAttend), fp32 accumulation.
//
// The context (earlier tokens and the chunk's own) is given as contiguous NHD pages
// [pages][2 (K,V)][page_size][kv_heads][head_dim] bf16: token j lies in page j / page_size,
// row j % page_size. Query i of the chunk sits at position start + i and attends tokens
// 0..start+i. Grid (n, kv_heads): one block per (query, GQA group), reusing the decode inner loop.
// Simple and exact rather than tiled: fine for the chunk sizes the engine feeds it; a tiled
// tensor-core kernel would be the next step for long prompts.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace freekv::cuda {

struct PrefillAttentionParams {
  const float* q = nullptr;              // [n][q_heads][head_dim] fp32
  float* out = nullptr;                  // [n][q_heads][head_dim] fp32
  const __nv_bfloat16* pages = nullptr;  // contiguous NHD pages holding tokens 0..start+n-1
  int n = 0, start = 0;
  int q_heads = 0, kv_heads = 0, head_dim = 0, page_size = 0;
  float scale = 0.f;
};

void LaunchPrefillAttention(const PrefillAttentionParams& p, cudaStream_t stream);

}  // namespace freekv::cuda
