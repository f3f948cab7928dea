#include "shm/TeardownGate.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

namespace freekv::teardown {
namespace {
std::mutex mu;
std::condition_variable idle;
int foreground = 0;
std::atomic<int64_t> total_waited_us{0};
std::atomic<int64_t> pieces_waited{0};
}  // namespace

int64_t YieldBudgetMs() {
  static const int64_t ms = [] {
    const char* e = std::getenv("FREEKV_TEARDOWN_YIELD_MS");
    if (!e || !*e) return int64_t{0};
    char* end = nullptr;
    const long long v = std::strtoll(e, &end, 10);
    if (*end != 0 || v < 0 || v > 60000)
      throw std::runtime_error(std::string("FREEKV_TEARDOWN_YIELD_MS must be an integer from 0 to 60000, got '") + e + "'");
    return int64_t{v};
  }();
  return ms;
}

Foreground::Foreground() {
  std::lock_guard<std::mutex> g(mu);
  ++foreground;
}

Foreground::~Foreground() {
  bool now_idle;
  {
    std::lock_guard<std::mutex> g(mu);
    now_idle = --foreground == 0;
  }
  if (now_idle) idle.notify_all();
}

namespace {
// A malformed FREEKV_TEARDOWN_YIELD_MS is reported where an engine is made (CudaEngine's
// constructor reads it) and by the services' configuration at start; a pacer made on a worker
// thread must not throw, so it never waits then.
int64_t BudgetOrZero() {
  try {
    return YieldBudgetMs();
  } catch (const std::exception&) {
    return 0;
  }
}
}  // namespace

Pacer::Pacer(int64_t budget_ms) : budget_us_((budget_ms < 0 ? BudgetOrZero() : budget_ms) * 1000) {}

Pacer::~Pacer() {
  if (waited_us_ > 0) total_waited_us.fetch_add(waited_us_, std::memory_order_relaxed);
}

void Pacer::BetweenPieces() {
  if (waited_us_ >= budget_us_) return;
  std::unique_lock<std::mutex> g(mu);
  if (foreground == 0) return;
  const auto t0 = std::chrono::steady_clock::now();
  idle.wait_for(g, std::chrono::microseconds(budget_us_ - waited_us_), [] { return foreground == 0; });
  g.unlock();
  waited_us_ += std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
  pieces_waited.fetch_add(1, std::memory_order_relaxed);
}

int64_t TotalWaitedUs() { return total_waited_us.load(std::memory_order_relaxed); }
int64_t PiecesWaited() { return pieces_waited.load(std::memory_order_relaxed); }

int ForegroundCount() {
  std::lock_guard<std::mutex> g(mu);
  return foreground;
}

}  // namespace freekv::teardown
