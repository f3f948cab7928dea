// The engine's one background thread: runs the speculative selection + recall jobs queued after
// each layer's attention, in order. Each job belongs to one (session, layer); the layer records
// that it has a recall in flight (LayerRecall) and the next decode of that layer waits for it.
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

namespace freekv::cpu {

// In-flight state of one layer's recall, and the guard that keeps a recall from writing slots
// that attention reads: attention holds `readers` while it reads the selected slots; a recall
// is only issued after that layer's attention returned and, as a second line of defence, waits
// for readers == 0 before writing.
struct LayerRecall {
  std::mutex mu;
  std::condition_variable cv;
  bool pending = false;
  std::exception_ptr error;
  int readers = 0;

  void BeginRead() {
    std::lock_guard<std::mutex> l(mu);
    ++readers;
  }
  void EndRead() {
    {
      std::lock_guard<std::mutex> l(mu);
      --readers;
    }
    cv.notify_all();
  }
  // Blocks until no attention reads this layer's slots. Returns true if it had to wait.
  bool WaitNoReaders() {
    std::unique_lock<std::mutex> l(mu);
    if (readers == 0) return false;
    cv.wait(l, [&] { return readers == 0; });
    return true;
  }
  void MarkPending() {
    std::lock_guard<std::mutex> l(mu);
    pending = true;
    error = nullptr;
  }
  void Complete(std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> l(mu);
      pending = false;
      error = e;
    }
    cv.notify_all();
  }
  // Waits for the in-flight recall; rethrows its failure. Returns true if it had to wait (also
  // written to *waited first, so that a wait for a recall that failed is known to the caller).
  bool Wait(bool* waited_out = nullptr) {
    std::unique_lock<std::mutex> l(mu);
    const bool waited = pending;
    if (waited_out) *waited_out = waited;
    cv.wait(l, [&] { return !pending; });
    if (error) {
      auto e = error;
      error = nullptr;
      std::rethrow_exception(e);
    }
    return waited;
  }
};

class SpeculativeWorker {
 public:
  SpeculativeWorker();
  ~SpeculativeWorker();
  // Queues a job; `state` is marked pending now and completed when the job ends.
  void Submit(LayerRecall* state, std::function<void()> job);

 private:
  void Run();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<LayerRecall*, std::function<void()>>> jobs_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace freekv::cpu
