// OpenMP loop over independent tasks (sessions x KV heads) that carries the first exception out
// of the parallel region instead of terminating the process.
#pragma once

#include <exception>
#include <mutex>

namespace freekv::cpu {

template <typename Fn>
void ParallelFor(int n, int threads, Fn fn) {
  if (n <= 0) return;
  if (n == 1 || threads <= 1) {
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  std::exception_ptr err;
  std::mutex mu;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
  for (int i = 0; i < n; ++i) {
    try {
      fn(i);
    } catch (...) {
      std::lock_guard<std::mutex> l(mu);
      if (!err) err = std::current_exception();
    }
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace freekv::cpu
