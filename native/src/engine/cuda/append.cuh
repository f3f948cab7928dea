// Appending new tokens' keys and values (fp32 in) to NHD pages of the device tier (bf16), with
// write-through of the partial page to the host store's tail (so a restarted compute process
// loses nothing). The tail is host memory mapped into the device (cudaHostRegisterMapped).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace freekv::cuda {

struct AppendParams {
  const float* k = nullptr;  // [n][kv_heads][head_dim] fp32 (device)
  const float* v = nullptr;
  int n = 0;
  // Token i goes to row (offset + i) % page_size of page (offset + i) / page_size of this
  // contiguous run of NHD pages [..][2][page_size][kv_heads][head_dim].
  __nv_bfloat16* pages = nullptr;
  int offset = 0;
  int kv_heads = 0, head_dim = 0, page_size = 0;
  // Optional write-through: tokens i >= tail_from also go to row (offset + i) % page_size of the
  // tail page [page_size][2][kv_heads][head_dim] bf16 (device pointer of mapped host memory).
  uint8_t* tail = nullptr;
  int tail_from = 0;
};

void LaunchAppend(const AppendParams& p, cudaStream_t stream);

// `count` appends in one launch: items is a device array of count AppendParams (checked by the
// caller: n <= max_n, the geometry kv_heads x head_dim for every item).
void LaunchAppendBatch(const AppendParams* items, int count, int max_n, int kv_heads, int head_dim,
                       cudaStream_t stream);

}  // namespace freekv::cuda
