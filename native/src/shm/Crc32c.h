// CRC32C (Castagnoli), the checksum of committed pages: computed by compute when it commits, by the
// kvstore when it verifies a commit and when its scrubber re-reads committed pages. The SSE4.2
// crc32 instruction where the build has it (x86-64-v2 and later: every x86 machine this runs on),
// a slicing-by-8 table otherwise; both give the same values as services/common/crc32c.ts.
#pragma once

#include <cstddef>
#include <cstdint>

namespace freekv {

// CRC32C of n bytes, continuing from `crc` (0 for a fresh checksum), as the usual
// crc32c(data) = ~update(~0, data) convention: Crc32c(b, n) of "123456789" is 0xe3069283.
uint32_t Crc32c(const uint8_t* data, size_t n, uint32_t crc = 0);

// Whether Crc32c runs on the crc32 instruction.
bool Crc32cHardware();

}  // namespace freekv
