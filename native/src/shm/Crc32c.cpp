#include "shm/Crc32c.h"

#include <algorithm>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__SSE4_2__)
#include <nmmintrin.h>
#endif

namespace freekv {
namespace {

struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t c = i;
      for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
      for (int s = 1; s < 8; s++) t[s][i] = t[0][t[s - 1][i] & 0xff] ^ (t[s - 1][i] >> 8);
  }
};

[[maybe_unused]] uint32_t UpdateTable(uint32_t crc, const uint8_t* p, size_t n) {
  static const Tables tb;
  for (; n >= 8; n -= 8, p += 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= crc;  // little-endian hosts only (x86-64, aarch64)
    crc = tb.t[7][lo & 0xff] ^ tb.t[6][(lo >> 8) & 0xff] ^ tb.t[5][(lo >> 16) & 0xff] ^ tb.t[4][lo >> 24] ^
          tb.t[3][hi & 0xff] ^ tb.t[2][(hi >> 8) & 0xff] ^ tb.t[1][(hi >> 16) & 0xff] ^ tb.t[0][hi >> 24];
  }
  for (; n > 0; n--, p++) crc = tb.t[0][(crc ^ *p) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__SSE4_2__)
uint32_t UpdateHw(uint32_t crc, const uint8_t* p, size_t n) {
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n > 0; n--, p++) c32 = _mm_crc32_u8(c32, *p);
  return c32;
}
#endif

}  // namespace

uint32_t Crc32c(const uint8_t* data, size_t n, uint32_t crc) {
#if defined(__SSE4_2__)
  return ~UpdateHw(~crc, data, n);
#else
  return ~UpdateTable(~crc, data, n);
#endif
}

unsigned Crc32cPagesThreads(size_t pageBytes, size_t count) {
  if (count < kCrc32cPagesThreadMinPages || pageBytes == 0) return 1;
  static const size_t hw = std::max(1u, std::thread::hardware_concurrency());  // reads sysfs: once
  // The pages lie in memory, so count * pageBytes fits a size_t.
  const size_t n = std::min({hw, size_t{8}, count * pageBytes / kCrc32cPagesThreadMinBytes});
  return static_cast<unsigned>(std::max<size_t>(n, 1));
}

bool Crc32cPages(const uint8_t* data, size_t pageBytes, size_t count, uint32_t* out, const std::atomic<bool>* cancel) {
  // Pages [first, last) on this thread; false once cancelled.
  auto run = [=](size_t first, size_t last) {
    for (size_t i = first; i < last; i++) {
      if (cancel && cancel->load(std::memory_order_relaxed)) return false;
      out[i] = Crc32c(data + i * pageBytes, pageBytes);
    }
    return true;
  };
  const unsigned n = Crc32cPagesThreads(pageBytes, count);
  if (n <= 1) return run(0, count);
  // Contiguous runs of pages, as even as whole pages allow; run 0 stays on this thread.
  auto bound = [&](unsigned t) { return count / n * t + std::min<size_t>(t, count % n); };
  std::vector<std::thread> threads;
  threads.reserve(n - 1);
  std::vector<char> ok(n, 1);
  unsigned t = 1;
  for (; t < n; t++) {
    try {
      threads.emplace_back([&, t] { ok[t] = run(bound(t), bound(t + 1)); });
    } catch (const std::system_error&) {
      break;  // no more threads to be had: this thread does the rest
    }
  }
  ok[0] = run(0, bound(1));
  if (t < n) ok[t] = run(bound(t), count);
  for (auto& th : threads) th.join();
  return std::all_of(ok.begin(), ok.end(), [](char v) { return v != 0; });
}

bool Crc32cHardware() {
#if defined(__SSE4_2__)
  return true;
#else
  return false;
#endif
}

}  // namespace freekv
