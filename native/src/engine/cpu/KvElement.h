// Storage elements of the K/V tiers: float32 or bfloat16 rows, converted to float32 for compute.
// Summaries and attention always read the stored (rounded) values, so a session rebuilt from the
// host store computes exactly what the original process computed.
#pragma once

#include <cstdint>
#include <cstring>

#include "engine/Engine.h"
#include "engine/cpu/Simd.h"

namespace freekv::cpu {

inline uint16_t FloatToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>((u + rounding) >> 16);
}

// Directed rounding to bf16 (summaries are bounds: hi rounds up, lo rounds down, so a rounded
// summary still bounds every key of its page).
inline uint16_t BF16RoundUp(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0xffffu) == 0 || (u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(u >> 16);
  return static_cast<uint16_t>((u >> 31) ? (u >> 16) : (u >> 16) + 1);
}
inline uint16_t BF16RoundDown(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0xffffu) == 0 || (u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>(u >> 16);
  return static_cast<uint16_t>((u >> 31) ? (u >> 16) + 1 : (u >> 16));
}

inline float BF16ToFloat(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Writes n floats as `t` elements.
inline void StoreRow(DType t, const float* src, uint8_t* dst, int n) {
  if (t == DType::F32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    auto* d = reinterpret_cast<uint16_t*>(dst);
    for (int i = 0; i < n; ++i) d[i] = FloatToBF16(src[i]);
  }
}

// Reads n `t` elements as floats.
inline void LoadRow(DType t, const uint8_t* src, float* dst, int n) {
  if (t == DType::F32) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
    simd::BF16ToF32(reinterpret_cast<const uint16_t*>(src), dst, n);
  }
}

}  // namespace freekv::cpu
