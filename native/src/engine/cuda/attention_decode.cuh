// Paged decode attention over NHD pages with GQA (one query token per sequence).
//
// Each batch item b has its own page pool (the device tier of one session and layer), laid out
// NHD: pool = [slots][2 (K,V)][page_size][kv_heads][head_dim] bf16. For each (b, kv head) a
// table lists the attended pages: the pool slot of each and how many of its tokens are valid
// (page_size for full pages, fewer for the partial page being filled; 0 = skip). Different KV
// heads may attend different pages (per-head selection); a slot then holds, for each head, the
// head's own page.
//
// Long tables are split along the sequence (flash-decoding): grid = (splits, kv_heads, batch);
// each block attends `pages_per_split` pages for all G = q_heads / kv_heads query heads of its
// group, then a combine pass merges the splits. Output fp32; accumulation fp32; scale is
// applied to q (usually 1/sqrt(head_dim)). Supported: head_dim 64/128/256, G <= 8.
// Size the workspace with DecodeAttentionWorkspaceBytes of the same params.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace freekv::cuda {

struct DecodeAttentionParams {
  const float* q = nullptr;                    // [batch][q_heads][head_dim] fp32
  float* out = nullptr;                        // [batch][q_heads][head_dim] fp32
  const __nv_bfloat16* const* pools = nullptr; // [batch] device array of device pointers (NHD pools)
  const int* page_slot = nullptr;              // [batch][kv_heads][max_pages]
  const int* page_tokens = nullptr;            // [batch][kv_heads][max_pages], 0..page_size
  const int* num_pages = nullptr;              // [batch][kv_heads], <= max_pages
  int batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0, page_size = 0;
  int max_pages = 0;        // row length of the tables (upper bound on num_pages)
  float scale = 0.f;        // softmax scale applied to q.k
  int pages_per_split = 0;  // 0: chosen by the launcher to fill the GPU
};

// Pages per split that LaunchDecodeAttention uses for these params (deterministic).
int DecodeAttentionPagesPerSplit(const DecodeAttentionParams& p);

// Bytes of device workspace LaunchDecodeAttention needs (0 when no split is needed).
size_t DecodeAttentionWorkspaceBytes(const DecodeAttentionParams& p);

// Launches on `stream`; checks shapes (throws std::invalid_argument) and the launch status
// (throws std::runtime_error). `workspace` must hold DecodeAttentionWorkspaceBytes(p) bytes.
void LaunchDecodeAttention(const DecodeAttentionParams& p, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

}  // namespace freekv::cuda
