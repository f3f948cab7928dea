// Work shared by a few threads: RunOnThreads runs `work` on the calling thread and on up to n - 1
// more (fewer when the system gives no more), then waits for all of them. `work` takes its items
// from a counter of its own, so it does what the threads that could not start would have done.
#pragma once
#include <system_error>
#include <thread>
#include <vector>

namespace freekv {

template <class F>
void RunOnThreads(unsigned n, const F& work) {
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < n; ++t) {
    try {
      pool.emplace_back(work);
    } catch (const std::system_error&) {
      break;  // no more threads to be had
    }
  }
  work();
  for (auto& t : pool) t.join();
}

}  // namespace freekv
