// Owning handles for device memory, pinned host memory, streams and events of the CUDA backend.
// Destructors never throw (they run on error paths); constructors and Resize() throw
// std::runtime_error through FKV_CUDA_CHECK.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "cuda/cuda_check.cuh"

namespace freekv::cuda {

template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n) { Resize(n); }
  ~DeviceArray() { Free(); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      Free();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  // Reallocates (contents lost) when n exceeds the capacity. The caller makes sure no queued
  // work still uses the old allocation.
  void Resize(size_t n) {
    if (n <= n_ && p_) return;
    Free();
    FKV_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<size_t>(n, 1) * sizeof(T)));
    n_ = n;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

 private:
  void Free() {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Device memory from a stream-ordered memory pool (cudaMallocFromPoolAsync / cudaFreeAsync on
// `stream`) when `pool` is set: a pool whose release threshold keeps freed memory gives it to the
// next allocation of that stream without returning it to the driver. Without a pool it is a
// DeviceArray (cudaMalloc / cudaFree). The caller makes sure no queued work of another stream
// still uses an allocation it frees.
template <class T>
class PoolArray {
 public:
  PoolArray() = default;
  PoolArray(cudaMemPool_t pool, cudaStream_t stream) : pool_(pool), stream_(stream) {}
  ~PoolArray() { Free(); }
  PoolArray(const PoolArray&) = delete;
  PoolArray& operator=(const PoolArray&) = delete;
  PoolArray(PoolArray&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)), pool_(o.pool_), stream_(o.stream_) {}
  PoolArray& operator=(PoolArray&& o) noexcept {
    if (this != &o) {
      Free();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
      pool_ = o.pool_;
      stream_ = o.stream_;
    }
    return *this;
  }
  // Reallocates (contents lost) when n exceeds the capacity (in stream order from a pool).
  void Resize(size_t n) {
    if (n <= n_ && p_) return;
    Free();
    const size_t bytes = std::max<size_t>(n, 1) * sizeof(T);
    if (pool_) {
      FKV_CUDA_CHECK(cudaMallocFromPoolAsync(reinterpret_cast<void**>(&p_), bytes, pool_, stream_));
    } else {
      FKV_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), bytes));
    }
    n_ = n;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

 private:
  void Free() {
    if (p_) {
      if (pool_) {
        cudaFreeAsync(p_, stream_);
      } else {
        cudaFree(p_);
      }
    }
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  size_t n_ = 0;
  cudaMemPool_t pool_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() {
    if (p_) cudaFreeHost(p_);
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void Resize(size_t bytes) {
    if (bytes <= n_ && p_) return;
    if (p_) cudaFreeHost(p_);
    p_ = nullptr;
    n_ = 0;
    FKV_CUDA_CHECK(cudaMallocHost(&p_, std::max<size_t>(bytes, 1)));
    n_ = bytes;
  }
  uint8_t* get() const { return static_cast<uint8_t*>(p_); }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

class Stream {
 public:
  Stream() { FKV_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() {
    if (s_) {
      cudaStreamSynchronize(s_);
      cudaStreamDestroy(s_);
    }
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  Event() { FKV_CUDA_CHECK(cudaEventCreateWithFlags(&e_, cudaEventDisableTiming)); }
  ~Event() {
    if (e_) cudaEventDestroy(e_);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

}  // namespace freekv::cuda
