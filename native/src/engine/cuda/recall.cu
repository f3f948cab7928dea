#include <algorithm>
#include <string>

#include "cuda/bf16_vec.cuh"
#include "cuda/cuda_check.cuh"
#include "recall.cuh"

namespace freekv::cuda {
namespace {

__device__ __forceinline__ size_t NhdOffset(int slot, int head, int w, int kv_heads, int head_dim, int page_size) {
  return RecallNhdOffset(slot, head, w, kv_heads, head_dim, page_size);
}
static_assert(kRecallVec == kVec, "the recall's vector is the bf16 helpers' 16-byte vector");

constexpr int kGatherUnroll = 4;

// Grid-stride over all 16-byte vectors of all jobs; each thread issues kGatherUnroll loads from
// host memory before its stores, so enough reads are in flight to fill PCIe from a few SMs.
__global__ void __launch_bounds__(1024) RecallGatherKernel(const uint8_t* src, size_t src_page_stride,
                                                           const RecallJob* jobs, const int* job_count, int max_jobs,
                                                           __nv_bfloat16* pool, int kv_heads, int head_dim,
                                                           int page_size) {
  const int n = min(*job_count, max_jobs);
  const int vpj = 2 * page_size * head_dim / kVec;  // vectors per job
  const size_t hp_bytes = (size_t)vpj * 16;
  const long long total = (long long)n * vpj;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long base = blockIdx.x * (long long)blockDim.x + threadIdx.x; base < total;
       base += stride * kGatherUnroll) {
    uint4 v[kGatherUnroll];
    RecallJob jb[kGatherUnroll];
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const long long x = base + u * stride;
      if (x < total) {
        jb[u] = jobs[x / vpj];
        const int w = x % vpj;
        v[u] = *reinterpret_cast<const uint4*>(src + (size_t)jb[u].page * src_page_stride + jb[u].head * hp_bytes +
                                               (size_t)w * 16);
      }
    }
#pragma unroll
    for (int u = 0; u < kGatherUnroll; ++u) {
      const long long x = base + u * stride;
      if (x < total) {
        const int w = x % vpj;
        *reinterpret_cast<uint4*>(pool + NhdOffset(jb[u].slot, jb[u].head, w, kv_heads, head_dim, page_size)) = v[u];
      }
    }
  }
}

struct ChunkJobs {
  RecallJob j[DoubleBufferRecall::kMaxChunk];
};

// Staging buffer (head-pages back to back) -> NHD slots; one block per job.
__global__ void ScatterKernel(const uint8_t* staging, ChunkJobs jobs, __nv_bfloat16* pool, int kv_heads, int head_dim,
                              int page_size) {
  const RecallJob jb = jobs.j[blockIdx.x];
  const int vpj = 2 * page_size * head_dim / kVec;
  const uint4* s = reinterpret_cast<const uint4*>(staging) + (size_t)blockIdx.x * vpj;
  for (int w = threadIdx.x; w < vpj; w += blockDim.x)
    *reinterpret_cast<uint4*>(pool + NhdOffset(jb.slot, jb.head, w, kv_heads, head_dim, page_size)) = s[w];
}

}  // namespace

void LaunchRecallGather(const uint8_t* src, const RecallGeometry& g, const RecallJob* jobs, const int* job_count,
                        int max_jobs, __nv_bfloat16* pool, int blocks, cudaStream_t stream) {
  if (max_jobs == 0) return;
  Require(src && jobs && job_count && pool, "recall gather: a pointer is null");
  Require(g.head_dim % kVec == 0 && g.page_size > 0 && g.kv_heads > 0, "recall gather: bad geometry");
  Require(blocks > 0, "recall gather: blocks must be > 0");
  RecallGatherKernel<<<blocks, 1024, 0, stream>>>(src, g.src_page_stride, jobs, job_count, max_jobs, pool, g.kv_heads,
                                                  g.head_dim, g.page_size);
  FKV_CUDA_CHECK_LAUNCH("RecallGatherKernel");
}

DoubleBufferRecall::DoubleBufferRecall(size_t head_page_bytes, int chunk)
    : head_page_bytes_(head_page_bytes), chunk_(std::max(1, std::min(chunk, kMaxChunk))) {
  try {
    for (int b = 0; b < 2; ++b) {
      FKV_CUDA_CHECK(cudaMalloc(&staging_[b], head_page_bytes_ * chunk_));
      FKV_CUDA_CHECK(cudaEventCreateWithFlags(&copied_[b], cudaEventDisableTiming));
      FKV_CUDA_CHECK(cudaEventCreateWithFlags(&scattered_[b], cudaEventDisableTiming));
    }
    FKV_CUDA_CHECK(cudaEventCreateWithFlags(&start_, cudaEventDisableTiming));
    FKV_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking));
    FKV_CUDA_CHECK(cudaStreamCreateWithFlags(&scatter_, cudaStreamNonBlocking));
  } catch (...) {
    Release();
    throw;
  }
}

DoubleBufferRecall::~DoubleBufferRecall() { Release(); }

void DoubleBufferRecall::Release() {
  if (copy_) cudaStreamSynchronize(copy_);
  if (scatter_) cudaStreamSynchronize(scatter_);
  for (int b = 0; b < 2; ++b) {
    if (staging_[b]) cudaFree(staging_[b]);
    if (copied_[b]) cudaEventDestroy(copied_[b]);
    if (scattered_[b]) cudaEventDestroy(scattered_[b]);
    staging_[b] = nullptr;
    copied_[b] = scattered_[b] = nullptr;
  }
  if (start_) cudaEventDestroy(start_);
  if (copy_) cudaStreamDestroy(copy_);
  if (scatter_) cudaStreamDestroy(scatter_);
  start_ = nullptr;
  copy_ = scatter_ = nullptr;
}

void DoubleBufferRecall::Run(const uint8_t* src_host, const RecallGeometry& g, const RecallJob* jobs, int n,
                             __nv_bfloat16* pool, cudaStream_t stream) {
  if (n <= 0) return;
  Require(src_host && jobs && pool, "double-buffer recall: a pointer is null");
  Require(g.HeadPageBytes() == head_page_bytes_, "double-buffer recall: head-page size differs from the staging's");
  FKV_CUDA_CHECK(cudaEventRecord(start_, stream));
  FKV_CUDA_CHECK(cudaStreamWaitEvent(copy_, start_, 0));
  FKV_CUDA_CHECK(cudaStreamWaitEvent(scatter_, start_, 0));
  for (int first = 0, round = 0; first < n; first += chunk_, ++round) {
    const int b = round & 1;
    const int m = std::min(chunk_, n - first);
    // The buffer's previous scatter must be done before it is refilled.
    FKV_CUDA_CHECK(cudaStreamWaitEvent(copy_, scattered_[b], 0));
    ChunkJobs cj{};
    for (int i = 0; i < m; ++i) {
      const RecallJob& jb = jobs[first + i];
      cj.j[i] = jb;
      FKV_CUDA_CHECK(cudaMemcpyAsync(staging_[b] + i * head_page_bytes_,
                                     src_host + (size_t)jb.page * g.src_page_stride + jb.head * head_page_bytes_,
                                     head_page_bytes_, cudaMemcpyHostToDevice, copy_));
    }
    FKV_CUDA_CHECK(cudaEventRecord(copied_[b], copy_));
    FKV_CUDA_CHECK(cudaStreamWaitEvent(scatter_, copied_[b], 0));
    ScatterKernel<<<m, 256, 0, scatter_>>>(staging_[b], cj, pool, g.kv_heads, g.head_dim, g.page_size);
    FKV_CUDA_CHECK_LAUNCH("ScatterKernel");
    FKV_CUDA_CHECK(cudaEventRecord(scattered_[b], scatter_));
  }
  // The caller's stream continues after every scatter (the scatter stream is in order).
  FKV_CUDA_CHECK(cudaEventRecord(scattered_[0], scatter_));
  FKV_CUDA_CHECK(cudaStreamWaitEvent(stream, scattered_[0], 0));
}

}  // namespace freekv::cuda
