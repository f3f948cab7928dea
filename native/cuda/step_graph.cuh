// A whole decode step of the GPU model runner as one CUDA graph (StepGraph).
//
// While a device step is open (Engine::BeginDeviceStep .. EndDeviceStep), the engine and the
// runner do not launch their work: every stream operation (kernel launcher, copy, memset, event
// record or wait) is appended to the step's op list, with its arguments copied by value. The list
// itself is the graph's key: a launcher pointer, its stream and its argument bytes per op (device
// and pinned-host addresses, counts, shapes), plus the launch shapes some launchers derive from
// host tables (Key()). What changes from step to step without changing the key is data in device
// memory or in pinned host regions (descriptor tables, token ids, positions) that the graph's
// copies read when they run. So at EndDeviceStep:
//   * the same key as a cached graph:      one cudaGraphLaunch (replay);
//   * a new key with the same op sequence as a cached graph (e.g. a longer candidate range after
//     a page filled): capture, then cudaGraphExecUpdate of that graph (no new instantiation);
//   * a key seen in the previous step:     capture and instantiate a new graph (LRU of kCached);
//   * otherwise (first step of a batch, a one-off shape): the ops run at once, as without graphs,
//     so lazy module loading, GEMM plans and workspaces are set up outside any capture.
// Correctness does not depend on which of the four happens: they issue the same operations in the
// same order on the same streams (tests compare graph and direct steps bit for bit).
//
// Side stream: an op on another stream than the step's main stream must come after a wait on an
// event recorded on the main stream in the same step (a fork); Flush joins that stream back into
// the main stream at the end of the step (capture requires it), so the step's last speculative
// recalls finish before the step does (about one layer's recall, e.g. 0.05 ms at 8B shapes).
//
// Host-side validation inside the launchers runs when ops are issued directly or captured, not
// on a replay (the replayed arguments are the ones validated at capture).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_check.cuh"
#include "engine/Engine.h"

namespace freekv::cuda {

// Stream operations with the stream as the last argument (the form StepGraph::Op calls).
inline void MemcpyOp(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
  FKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, s));
}
inline void MemsetOp(void* dst, int value, size_t bytes, cudaStream_t s) {
  FKV_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, s));
}
inline void RecordOp(cudaEvent_t e, cudaStream_t s) { FKV_CUDA_CHECK(cudaEventRecord(e, s)); }
inline void WaitOp(cudaEvent_t e, cudaStream_t s) { FKV_CUDA_CHECK(cudaStreamWaitEvent(s, e, 0)); }

class StepGraph {
 public:
  static constexpr int kCached = 4;

  StepGraph() = default;
  ~StepGraph() {
    for (Cached& c : cache_)
      if (c.exec) cudaGraphExecDestroy(c.exec);
  }
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;

  // Opens a step. deferred = false: every Op runs at once (graphs off, or a step that needs a host
  // round trip). `main` is the stream the step is ordered on.
  void Begin(bool deferred, cudaStream_t main) {
    deferred_ = deferred;
    main_ = main;
    arena_.clear();
    n_ops_ = 0;
  }
  bool deferred() const { return deferred_; }

  // Queues f(a..., stream) (or runs it now when not deferred). f: a function pointer or a
  // capture-free lambda; a...: trivially copyable values (the key compares their bytes, so
  // structs must have zeroed padding).
  template <class F, class... A>
  void Op(cudaStream_t s, F f, A... a) {
    static_assert(std::is_pointer_v<F> || std::is_empty_v<F>, "StepGraph::Op: f must not capture state");
    static_assert((std::is_trivially_copyable_v<A> && ...), "StepGraph::Op: arguments must be trivially copyable");
    if (!deferred_) {
      f(a..., s);
      return;
    }
    Header h{&Invoke<F, A...>, s, 0};
    const size_t at = Reserve(sizeof(Header));
    const size_t body = Reserve(0);
    Put(f);
    (Put(a), ...);
    h.size = arena_.size() - body;
    std::memcpy(arena_.data() + at, &h, sizeof h);
    ++n_ops_;
  }

  // Extra key bytes: launch shapes a launcher derives from host tables (see file comment).
  void Key(const void* p, size_t n) {
    if (!deferred_) return;
    Header h{nullptr, nullptr, n};
    const size_t at = Reserve(sizeof(Header));
    std::memcpy(arena_.data() + at, &h, sizeof h);
    const size_t d = Reserve(n);
    std::memcpy(arena_.data() + d, p, n);
  }

  // Issues the step's ops (see file comment); `side` is joined back into `main` when used, with
  // `join` (an event owned by the caller).
  void Flush(cudaStream_t side, cudaEvent_t join) {
    if (!deferred_) {
      ++counters_.steps;
      ++counters_.direct;
      return;
    }
    deferred_ = false;
    ++counters_.steps;
    counters_.ops = n_ops_;
    if (arena_.empty()) return;
    // Work the side stream still has from earlier direct steps is ordered before this step (the
    // step's ops do not wait for it themselves).
    FKV_CUDA_CHECK(cudaEventRecord(join, side));
    FKV_CUDA_CHECK(cudaStreamWaitEvent(main_, join, 0));
    const uint64_t shape = ShapeHash();
    ++clock_;
    Cached* hit = nullptr;
    Cached* same_shape = nullptr;
    for (Cached& c : cache_) {
      if (c.key.size() == arena_.size() && std::memcmp(c.key.data(), arena_.data(), arena_.size()) == 0) hit = &c;
      else if (c.shape == shape && !same_shape) same_shape = &c;
    }
    if (hit) {
      hit->used = clock_;
      FKV_CUDA_CHECK(cudaGraphLaunch(hit->exec, main_));
      ++counters_.replays;
      return;
    }
    const bool seen = previous_.size() == arena_.size() && std::memcmp(previous_.data(), arena_.data(), arena_.size()) == 0;
    if (!same_shape && !seen) {
      Issue(side, join);
      ++counters_.direct;
      previous_.swap(arena_);
      return;
    }
    const double t0 = NowMs();
    cudaGraph_t graph = Capture(side, join);
    bool updated = false;
    if (same_shape) {
      cudaGraphExecUpdateResultInfo info;
      if (cudaGraphExecUpdate(same_shape->exec, graph, &info) == cudaSuccess) {
        updated = true;
        same_shape->key = arena_;
        same_shape->used = clock_;
        hit = same_shape;
      } else {
        cudaGetLastError();
      }
    }
    if (!updated) {
      Cached* slot = nullptr;
      if ((int)cache_.size() < kCached) {
        cache_.emplace_back();
        slot = &cache_.back();
      } else {
        slot = &*std::min_element(cache_.begin(), cache_.end(),
                                  [](const Cached& a, const Cached& b) { return a.used < b.used; });
        cudaGraphExecDestroy(slot->exec);
        slot->exec = nullptr;
      }
      const cudaError_t e = cudaGraphInstantiate(&slot->exec, graph, 0);
      if (e != cudaSuccess) {
        cudaGraphDestroy(graph);
        slot->exec = nullptr;
        slot->key.clear();
        slot->used = 0;
        Check(e, "cudaGraphInstantiate(decode step)");
      }
      slot->key = arena_;
      slot->shape = shape;
      slot->used = clock_;
      hit = slot;
    }
    cudaGraphDestroy(graph);
    counters_.capture_ms += NowMs() - t0;
    ++(updated ? counters_.updates : counters_.captures);
    FKV_CUDA_CHECK(cudaGraphLaunch(hit->exec, main_));
  }

  const DeviceStepStats& counters() const { return counters_; }

 private:
  struct Header {
    void (*invoke)(const uint8_t*, cudaStream_t);  // null: key bytes only
    cudaStream_t stream;
    size_t size;  // bytes after the header (from its 16-byte aligned start)
  };
  struct Cached {
    std::vector<uint8_t> key;
    uint64_t shape = 0;
    uint64_t used = 0;
    cudaGraphExec_t exec = nullptr;
  };

  static constexpr size_t kAlign = 16;
  size_t Reserve(size_t n) {
    const size_t at = (arena_.size() + kAlign - 1) / kAlign * kAlign;
    arena_.resize(at + n, 0);  // zero-filled, so gaps compare equal
    return at;
  }
  template <class T>
  void Put(const T& v) {
    const size_t at = Reserve(sizeof(T));
    std::memcpy(arena_.data() + at, &v, sizeof(T));
  }
  template <class T>
  static T Get(const uint8_t*& p) {
    const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kAlign - 1) / kAlign * kAlign;
    p = reinterpret_cast<const uint8_t*>(a);
    alignas(T) unsigned char buf[sizeof(T)];
    std::memcpy(buf, p, sizeof(T));
    p += sizeof(T);
    return *std::launder(reinterpret_cast<T*>(buf));
  }
  template <class F, class... A>
  static void Invoke(const uint8_t* p, cudaStream_t s) {
    F f = Get<F>(p);
    std::tuple<A...> args{Get<A>(p)...};  // braced list: evaluated left to right
    std::apply([&](A&... a) { f(a..., s); }, args);
  }

  // Calls fn(header, body) for every entry in order.
  template <class Fn>
  void Walk(Fn fn) const {
    if (reinterpret_cast<uintptr_t>(arena_.data()) % kAlign) throw std::logic_error("StepGraph: arena misaligned");
    size_t at = 0;
    while (at < arena_.size()) {
      at = (at + kAlign - 1) / kAlign * kAlign;
      Header h;
      std::memcpy(&h, arena_.data() + at, sizeof h);
      const size_t body = (at + sizeof(Header) + kAlign - 1) / kAlign * kAlign;
      fn(h, arena_.data() + body);
      at = body + h.size;
    }
  }
  void Issue(cudaStream_t side, cudaEvent_t join) {
    bool forked = false;
    Walk([&](const Header& h, const uint8_t* body) {
      if (!h.invoke) return;
      forked |= h.stream != main_;
      h.invoke(body, h.stream);
    });
    if (forked) {
      RecordOp(join, side);
      WaitOp(join, main_);
    }
  }
  cudaGraph_t Capture(cudaStream_t side, cudaEvent_t join) {
    FKV_CUDA_CHECK(cudaStreamBeginCapture(main_, cudaStreamCaptureModeRelaxed));
    try {
      Issue(side, join);
    } catch (...) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(main_, &g);
      if (g) cudaGraphDestroy(g);
      cudaGetLastError();
      throw;
    }
    cudaGraph_t g = nullptr;
    FKV_CUDA_CHECK(cudaStreamEndCapture(main_, &g));
    return g;
  }
  // The op sequence without argument values: steps with equal shapes have equal graph topology
  // (launchers launch the same kernels for the same list), so an update can replace a capture.
  uint64_t ShapeHash() const {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    Walk([&](const Header& hd, const uint8_t*) {
      mix(reinterpret_cast<uintptr_t>(hd.invoke));
      mix(reinterpret_cast<uintptr_t>(hd.stream));
    });
    return h;
  }
  static double NowMs() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
  }

  bool deferred_ = false;
  cudaStream_t main_ = nullptr;
  std::vector<uint8_t> arena_, previous_;
  uint64_t n_ops_ = 0, clock_ = 0;
  std::vector<Cached> cache_;
  DeviceStepStats counters_;
};

}  // namespace freekv::cuda
