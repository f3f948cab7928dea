// Teardowns that step aside: a closed session's host memory is given back in pieces (munmap of
// its segments, cudaHostUnregister of its store), and between pieces the teardown waits while
// this process is opening a session or committing and pinning a store's pages.
//
// Why: unmapping and unregistering tens of GiB take the process's memory-map lock and the
// driver's registration path piece after piece, and the work a new prompt needs first (its
// session's creation; MADV_POPULATE_WRITE and cudaHostRegister of its store ahead of each chunk)
// needs the same. On an H100, a 128K prompt that followed another's close opened its session in
// 418 ms instead of 75 and ran its first chunk in 1107 ms instead of 365 (native/src/engine/cuda/
// PERF.md, "A prompt that follows another"). Run in the gaps between that work instead (the CUDA
// engine counts a fresh session as opening until its first prefill call ends), the second 128K
// prompt took 11.53 s against 12.35 s on an H200 (PERF.md, "A teardown that steps aside"); what
// is left is the unregistration's own cost beside the prompt's later chunks.
//
// Process-wide: Foreground marks the work that has priority (it nests, and may be held on any
// thread); a Pacer belongs to one teardown and waits at BetweenPieces() while any Foreground is
// held, up to FREEKV_TEARDOWN_YIELD_MS in all for that teardown (0, the default: never waits),
// so a teardown is delayed a bounded time however busy the process is, and its memory comes back.
#pragma once
#include <cstdint>

namespace freekv::teardown {

class Foreground {
 public:
  Foreground();
  ~Foreground();
  Foreground(const Foreground&) = delete;
  Foreground& operator=(const Foreground&) = delete;
};

class Pacer {
 public:
  // budget_ms < 0: FREEKV_TEARDOWN_YIELD_MS (read once; 0 when unset).
  explicit Pacer(int64_t budget_ms = -1);
  ~Pacer();
  Pacer(const Pacer&) = delete;
  Pacer& operator=(const Pacer&) = delete;
  // Returns at once when nothing is in the foreground or the budget is spent; else waits until
  // the foreground work ends or the budget runs out.
  void BetweenPieces();
  int64_t waited_us() const { return waited_us_; }

 private:
  int64_t budget_us_;
  int64_t waited_us_ = 0;
};

// The budget FREEKV_TEARDOWN_YIELD_MS sets (ms; throws on a value outside 0..60000).
int64_t YieldBudgetMs();
// Since the process started: microseconds teardowns waited in all, and pieces that waited.
int64_t TotalWaitedUs();
int64_t PiecesWaited();
// Foreground work now in progress (nested marks counted).
int ForegroundCount();

}  // namespace freekv::teardown
