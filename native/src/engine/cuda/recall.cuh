// Recall: missing HND head-pages of the host store -> NHD slots of the device tier.
//
// A recall job moves one head-page: the K and V of one KV head of one page, a contiguous
// [2][page_size][head_dim] bf16 block in the store (16 KiB at P=32, D=128), into slot `slot`
// of an NHD pool [slots][2][page_size][kv_heads][head_dim], at the head's column.
//
// Two modes, measured side by side:
//  (a) gather (default): one kernel on a few SMs reads the head-pages straight from the store's
//      shared segment (cudaHostRegister(..., cudaHostRegisterMapped) + cudaHostGetDevicePointer)
//      with 16-byte loads and writes the NHD slots. The job list and its length stay on the
//      device (written by the residency diff), so there is no host round trip.
//  (b) double buffer (the paper's method): one cudaMemcpyAsync per head-page into one of two
//      device staging buffers while the other is scattered (HND -> NHD) into the slots. The job
//      list must be on the host (one copy call per job).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace freekv::cuda {

#ifdef __CUDACC__
constexpr int kRecallVec = 8;  // bf16 elements per 16-byte vector

// Position of 16-byte vector `w` of an HND head-page ([2][P][D/8]) in the NHD pool.
__device__ __forceinline__ size_t RecallNhdOffset(int slot, int head, int w, int kv_heads, int head_dim,
                                                  int page_size) {
  const int vpr = head_dim / kRecallVec;
  const int c = w % vpr;
  const int t = (w / vpr) % page_size;
  const int kv = w / (vpr * page_size);
  return (((size_t)slot * 2 + kv) * page_size + t) * kv_heads * head_dim + (size_t)head * head_dim + c * kRecallVec;
}
#endif

struct RecallJob {
  int page;  // page index in the store's layer
  int head;  // KV head
  int slot;  // destination slot in the NHD pool
  int pad;
};

struct RecallGeometry {
  int kv_heads = 0, head_dim = 0, page_size = 0;
  size_t src_page_stride = 0;  // bytes between HND pages in the store (kv_heads * head-page bytes)
  size_t HeadPageBytes() const { return (size_t)2 * page_size * head_dim * 2; }
};

// Gather. src: device pointer of the mapped store at this layer's first page. jobs/job_count in
// device memory; at most max_jobs are read. blocks: SMs to use (8 reach the link on an H200).
void LaunchRecallGather(const uint8_t* src, const RecallGeometry& g, const RecallJob* jobs, const int* job_count,
                        int max_jobs, __nv_bfloat16* pool, int blocks, cudaStream_t stream);

// The batched decode's recall runs inside its residency diff (LaunchResidencyDiffBatch with
// ResidencyParams::pool, cuda/residency.cuh): one block per (item, KV head) copies that head's
// misses as soon as its diff has chosen their slots.

// Double-buffered streamed recall: owns two device staging buffers of `chunk` head-pages, a copy
// stream, a scatter stream and the events that order them:
//   copy(buf) waits scatter_done(buf) of the previous use; scatter(buf) waits copy_done(buf).
// Run() is ordered after the work already on `stream`, and `stream` waits for the whole recall.
class DoubleBufferRecall {
 public:
  DoubleBufferRecall(size_t head_page_bytes, int chunk);
  ~DoubleBufferRecall();
  DoubleBufferRecall(const DoubleBufferRecall&) = delete;
  DoubleBufferRecall& operator=(const DoubleBufferRecall&) = delete;

  // src_host: host pointer of the (registered, pinned) store at this layer's first page.
  // jobs: host array of n jobs.
  void Run(const uint8_t* src_host, const RecallGeometry& g, const RecallJob* jobs, int n, __nv_bfloat16* pool,
           cudaStream_t stream);

  static constexpr int kMaxChunk = 64;  // jobs per scatter launch (passed by value)

 private:
  void Release();
  size_t head_page_bytes_;
  int chunk_;
  uint8_t* staging_[2] = {nullptr, nullptr};
  cudaStream_t copy_ = nullptr, scatter_ = nullptr;
  cudaEvent_t start_ = nullptr, copied_[2] = {nullptr, nullptr}, scattered_[2] = {nullptr, nullptr};
};

}  // namespace freekv::cuda
