// Offload: full NHD pages of the device tier -> HND pages of the host store, converted on the
// device and written straight into the store's shared segment (mapped into the device with
// cudaHostRegisterMapped), 16-byte stores. HND page = [kv_heads][2 (K,V)][page_size][head_dim],
// so one head's K and V of a page are one contiguous block (what recall reads back).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace freekv::cuda {

// pages: [count][2][page_size][kv_heads][head_dim] NHD bf16 (device);
// dst: device pointer of the first destination HND page; page i goes to dst + i * dst_page_stride.
void LaunchOffloadHnd(const __nv_bfloat16* pages, int count, uint8_t* dst, size_t dst_page_stride, int kv_heads,
                      int head_dim, int page_size, cudaStream_t stream);

// One full page of one batch item: its NHD page on the device and its HND destination page.
struct OffloadItem {
  const __nv_bfloat16* page;
  uint8_t* dst;
};

// `count` single-page offloads in one launch; items: device array. An item with a null page is
// skipped.
void LaunchOffloadHndBatch(const OffloadItem* items, int count, int kv_heads, int head_dim, int page_size,
                           cudaStream_t stream);

}  // namespace freekv::cuda
