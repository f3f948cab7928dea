// A whole decode step of the GPU model runner as one CUDA graph (StepGraph).
//
// While a device step is open (Engine::BeginDeviceStep .. EndDeviceStep), the engine and the
// runner do not launch their work: every stream operation (kernel launcher, copy, memset, event
// record or wait) is appended to the step's op list, with its arguments copied by value. The list
// of the main stream's ops is the graph's key: a launcher pointer and its argument bytes per op
// (device and pinned-host addresses, counts, shapes), plus the launch shapes some launchers derive
// from host tables (Key()). What changes from step to step without changing the key is data in
// device memory or in pinned host regions (descriptor tables, token ids, positions) that the
// graph's copies read when they run. So at EndDeviceStep the main stream's ops are issued as:
//   * the same key as a cached graph:      one cudaGraphLaunch (replay);
//   * a key seen in the previous step:     capture; then cudaGraphExecUpdate of a cached graph
//     with the same op sequence (e.g. a longer candidate range after the context grew by 256
//     pages), else a new instantiation (LRU of kCached);
//   * otherwise (first step of a batch, a new shape): the ops run at once, as without graphs, so
//     lazy module loading, GEMM plans (and their tuning) and workspaces are set up outside any
//     capture; a capture or instantiation that fails also falls back to this.
// Correctness does not depend on which of the four happens: they issue the same operations in the
// same order on the same streams (parity.ts compares graph and direct steps bit for bit).
//
// Ops on other streams (the engine's speculative selection + recall on its side stream) are not
// captured: they are issued directly right after the main stream's ops, every step. They are
// ordered against the graph by events the graph records and waits for as external event nodes
// (RecordExternalOp / WaitExternalOp), so the speculative recall of layer l keeps overlapping the
// rest of the step and the next step's layers before l, exactly as in a direct step. (A graph
// that contained them would have to finish them before the step ends.)
//
// Host-side validation inside the launchers runs when ops are issued directly or captured, not
// on a replay (the replayed arguments are the ones validated at capture). Only the thread that
// opened the step defers its ops; another thread's ops run at once (the engine makes its own
// calls wait for the step to end).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <new>
#include <stdexcept>
#include <thread>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/cuda_check.cuh"
#include "engine/DeviceEngine.h"

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
// Inside a capture these become event record / wait nodes on real events (so work outside the
// graph can order against it); outside a capture (where the flags are invalid) the plain calls.
inline bool Capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  FKV_CUDA_CHECK(cudaStreamIsCapturing(s, &st));
  return st == cudaStreamCaptureStatusActive;
}
inline void RecordExternalOp(cudaEvent_t e, cudaStream_t s) {
  FKV_CUDA_CHECK(cudaEventRecordWithFlags(e, s, Capturing(s) ? cudaEventRecordExternal : cudaEventRecordDefault));
}
inline void WaitExternalOp(cudaEvent_t e, cudaStream_t s) {
  FKV_CUDA_CHECK(cudaStreamWaitEvent(s, e, Capturing(s) ? cudaEventWaitExternal : cudaEventWaitDefault));
}

class StepGraph {
 public:
  static constexpr int kCached = 4;

  // side_timing: time the side stream's ops of every graphed step (DeviceStepStats::side_ms).
  explicit StepGraph(bool side_timing = false) : side_timing_(side_timing) {}
  ~StepGraph() {
    for (Cached& c : cache_)
      if (c.exec) cudaGraphExecDestroy(c.exec);
    if (t0_) cudaEventDestroy(t0_);
    if (t1_) cudaEventDestroy(t1_);
    if (s0_) cudaEventDestroy(s0_);
    if (s1_) cudaEventDestroy(s1_);
  }
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;

  // Opens a step. deferred = false: every Op runs at once (graphs off, or a step that needs a host
  // round trip). `main` is the stream the step is ordered on.
  void Begin(bool deferred, cudaStream_t main) {
    owner_.store(std::this_thread::get_id());
    deferred_.store(deferred);
    main_ = main;
    arena_.clear();
    outside_.clear();
    n_ops_ = 0;
    began_ms_ = NowMs();
    timed_ = false;
    if (!deferred) Mark(t0_);
  }
  // After the caller's wait for the step's main stream: adds the step's device time.
  void Finished() {
    if (!timed_) return;
    timed_ = false;
    float ms = 0;
    if (cudaEventElapsedTime(&ms, t0_, t1_) == cudaSuccess) counters_.device_ms += ms;
    cudaGetLastError();
  }
  // Whether this thread's ops are being deferred (it opened a graphed step).
  bool deferred() const { return deferred_.load() && owner_.load() == std::this_thread::get_id(); }

  // Queues f(a..., stream) (or runs it now when not deferred). f: a function pointer or a
  // capture-free lambda; a...: trivially copyable values (the key compares their bytes, so
  // structs must have zeroed padding).
  template <class F, class... A>
  void Op(cudaStream_t s, F f, A... a) {
    static_assert(std::is_pointer_v<F> || std::is_empty_v<F>, "StepGraph::Op: f must not capture state");
    static_assert((std::is_trivially_copyable_v<A> && ...), "StepGraph::Op: arguments must be trivially copyable");
    if (!deferred()) {
      if (owner_.load() == std::this_thread::get_id()) ++n_ops_;
      f(a..., s);
      return;
    }
    ++n_ops_;
    std::vector<uint8_t>& ar = s == main_ ? arena_ : outside_;
    Header h{&Invoke<F, A...>, s, 0};
    const size_t at = Reserve(ar, sizeof(Header));
    const size_t body = Reserve(ar, 0);
    if constexpr (std::is_empty_v<F>) Reserve(ar, sizeof(F));  // no state: a zero byte, not f's indeterminate one
    else Put(ar, f);
    (Put(ar, a), ...);
    h.size = ar.size() - body;
    std::memcpy(ar.data() + at, &h, sizeof h);
  }

  // Extra key bytes: launch shapes a launcher of the main stream derives from host tables.
  void Key(const void* p, size_t n) {
    if (!deferred()) return;
    Header h{nullptr, nullptr, n};
    const size_t at = Reserve(arena_, sizeof(Header));
    std::memcpy(arena_.data() + at, &h, sizeof h);
    const size_t d = Reserve(arena_, n);
    std::memcpy(arena_.data() + d, p, n);
  }

  // Issues the step's ops (see file comment).
  void Flush() {
    ++counters_.steps;
    counters_.ops = n_ops_;
    if (!deferred_.load()) {
      ++counters_.direct;
      counters_.host_ms += NowMs() - began_ms_;
      Mark(t1_);
      timed_ = true;
      return;
    }
    deferred_.store(false);
    counters_.host_ms += NowMs() - began_ms_;
    Mark(t0_);
    IssueMain();
    Mark(t1_);
    timed_ = true;
    const double t = NowMs();
    IssueSide();
    counters_.side_issue_ms += NowMs() - t;
  }
  // The caller's wait for the step and its bookkeeping after it (host ms).
  void AddAfterIssue(double wait_ms, double finish_ms) {
    counters_.wait_ms += wait_ms;
    counters_.finish_ms += finish_ms;
  }
  // From the runner's thread after the step, outside the engine's lock: kept apart, atomically.
  void AddResultCopy(double ms) {
    double cur = result_ms_.load();
    while (!result_ms_.compare_exchange_weak(cur, cur + ms)) {
    }
  }

  DeviceStepStats counters() const {
    DeviceStepStats c = counters_;
    c.result_ms = result_ms_.load();
    return c;
  }
  static double NowMs() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
  }

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

  // The main stream's ops: replayed, captured (new or updated graph) or issued directly.
  void IssueMain() {
    if (arena_.empty()) return;
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
    if (!seen) {
      Issue(arena_);
      ++counters_.direct;
      previous_.swap(arena_);
      return;
    }
    const double t0 = NowMs();
    cudaGraph_t graph = nullptr;
    try {
      graph = Capture();
    } catch (const std::exception& e) {
      // Nothing ran during the capture: the step is issued op by op instead (an error that is
      // the ops' own surfaces again there).
      WarnOnce(e.what());
      Issue(arena_);
      ++counters_.direct;
      return;
    }
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
        if (slot->exec) cudaGraphExecDestroy(slot->exec);
        slot->exec = nullptr;
      }
      const cudaError_t e = cudaGraphInstantiate(&slot->exec, graph, 0);
      if (e != cudaSuccess) {
        cudaGetLastError();
        cudaGraphDestroy(graph);
        slot->exec = nullptr;
        slot->key.clear();
        slot->shape = 0;
        slot->used = 0;
        WarnOnce((std::string("cudaGraphInstantiate(decode step): ") + cudaGetErrorString(e)).c_str());
        Issue(arena_);
        ++counters_.direct;
        return;
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

  static constexpr size_t kAlign = 16;
  static size_t Reserve(std::vector<uint8_t>& ar, size_t n) {
    const size_t at = (ar.size() + kAlign - 1) / kAlign * kAlign;
    ar.resize(at + n, 0);  // zero-filled, so gaps compare equal
    return at;
  }
  template <class T>
  static void Put(std::vector<uint8_t>& ar, const T& v) {
    const size_t at = Reserve(ar, sizeof(T));
    std::memcpy(ar.data() + at, &v, sizeof(T));
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

  // Calls fn(header, body) for every entry of `ar` in order.
  template <class Fn>
  static void Walk(const std::vector<uint8_t>& ar, Fn fn) {
    if (reinterpret_cast<uintptr_t>(ar.data()) % kAlign) throw std::logic_error("StepGraph: arena misaligned");
    size_t at = 0;
    while (at < ar.size()) {
      at = (at + kAlign - 1) / kAlign * kAlign;
      Header h;
      std::memcpy(&h, ar.data() + at, sizeof h);
      const size_t body = (at + sizeof(Header) + kAlign - 1) / kAlign * kAlign;
      fn(h, ar.data() + body);
      at = body + h.size;
    }
  }
  // The side stream's ops of a graphed step; timed with side_timing (see DeviceStepStats).
  void IssueSide() {
    cudaStream_t side = nullptr;
    if (side_timing_)
      Walk(outside_, [&](const Header& h, const uint8_t*) {
        if (h.invoke && !side) side = h.stream;
      });
    if (!side) {
      Issue(outside_);
      return;
    }
    if (side_timed_) {
      float ms = 0;
      if (cudaEventSynchronize(s1_) == cudaSuccess && cudaEventElapsedTime(&ms, s0_, s1_) == cudaSuccess) {
        counters_.side_ms += ms;
        ++counters_.side_steps;
      }
      cudaGetLastError();
    }
    if (!s0_) FKV_CUDA_CHECK(cudaEventCreate(&s0_));
    if (!s1_) FKV_CUDA_CHECK(cudaEventCreate(&s1_));
    FKV_CUDA_CHECK(cudaEventRecord(s0_, side));
    Issue(outside_);
    FKV_CUDA_CHECK(cudaEventRecord(s1_, side));
    side_timed_ = true;
  }
  static void Issue(const std::vector<uint8_t>& ar) {
    Walk(ar, [&](const Header& h, const uint8_t* body) {
      if (h.invoke) h.invoke(body, h.stream);
    });
  }
  cudaGraph_t Capture() {
    FKV_CUDA_CHECK(cudaStreamBeginCapture(main_, cudaStreamCaptureModeRelaxed));
    try {
      Issue(arena_);
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
  // The op sequence without argument values: steps with equal shapes usually have equal graph
  // topology, so an update can replace an instantiation (cudaGraphExecUpdate checks it).
  uint64_t ShapeHash() const {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    Walk(arena_, [&](const Header& hd, const uint8_t*) { mix(reinterpret_cast<uintptr_t>(hd.invoke)); });
    return h;
  }
  void Mark(cudaEvent_t& e) {
    if (!e) FKV_CUDA_CHECK(cudaEventCreate(&e));
    FKV_CUDA_CHECK(cudaEventRecord(e, main_));
  }
  static void WarnOnce(const char* why) {
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true))
      std::fprintf(stderr, "freekv: a decode step could not become a CUDA graph (%s); such steps run op by op\n", why);
  }
  const bool side_timing_;
  std::atomic<bool> deferred_{false};
  std::atomic<std::thread::id> owner_{};
  cudaStream_t main_ = nullptr;
  std::vector<uint8_t> arena_, outside_, previous_;
  uint64_t n_ops_ = 0, clock_ = 0;
  double began_ms_ = 0;
  cudaEvent_t t0_ = nullptr, t1_ = nullptr, s0_ = nullptr, s1_ = nullptr;
  bool timed_ = false, side_timed_ = false;
  std::vector<Cached> cache_;
  DeviceStepStats counters_;
  std::atomic<double> result_ms_{0};
};

}  // namespace freekv::cuda
