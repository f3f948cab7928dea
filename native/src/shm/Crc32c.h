// CRC32C (Castagnoli), the checksum of committed pages: computed by compute when it commits, by the
// kvstore when it verifies a commit and when its scrubber re-reads committed pages. The SSE4.2
// crc32 instruction where the build has it (x86-64-v2 and later: every x86 machine this runs on),
// a slicing-by-8 table otherwise; both give the same values as services/common/crc32c.ts.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace freekv {

// CRC32C of n bytes, continuing from `crc` (0 for a fresh checksum), as the usual
// crc32c(data) = ~update(~0, data) convention: Crc32c(b, n) of "123456789" is 0xe3069283.
uint32_t Crc32c(const uint8_t* data, size_t n, uint32_t crc = 0);

// The CRC32C of each of `count` consecutive pages of `pageBytes` from `data`, into out[0, count).
// Pages are independent: with at least kCrc32cPagesThreadMinPages pages and enough bytes for each
// thread to pay for starting it, they are split into contiguous runs over up to
// min(hardware threads, 8) threads, the calling thread among them (Crc32cPagesThreads); the values
// are the same as one thread's. When `cancel` is given and turns true, every thread stops after
// its current page and the call returns false (out is then incomplete); true otherwise.
bool Crc32cPages(const uint8_t* data, size_t pageBytes, size_t count, uint32_t* out,
                 const std::atomic<bool>* cancel = nullptr);

// Pages below which Crc32cPages stays on the calling thread.
constexpr size_t kCrc32cPagesThreadMinPages = 64;
// Bytes each thread of Crc32cPages checksums at least (a thread starts in tens of microseconds;
// 1 MiB takes ~170 us on the crc32 instruction).
constexpr size_t kCrc32cPagesThreadMinBytes = size_t{1} << 20;

// Threads Crc32cPages uses for `count` pages of `pageBytes` (1: the calling thread alone).
unsigned Crc32cPagesThreads(size_t pageBytes, size_t count);

// Whether Crc32c runs on the crc32 instruction.
bool Crc32cHardware();

}  // namespace freekv
