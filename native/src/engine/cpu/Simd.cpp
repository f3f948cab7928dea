#include "engine/cpu/Simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

namespace freekv::cpu::simd {

// ---- portable ----

static float DotPortable(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

static void AxpyPortable(float w, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += w * x[i];
}

static float ScorePortable(const float* q, const float* hi, const float* lo, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += std::max(q[i + j] * hi[i + j], q[i + j] * lo[i + j]);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += std::max(q[i] * hi[i], q[i] * lo[i]);
  return s;
}

static void BF16Portable(const uint16_t* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

static inline float B2F(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static float ScoreBF16Portable(const float* q, const uint16_t* hi, const uint16_t* lo, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += std::max(q[i + j] * B2F(hi[i + j]), q[i + j] * B2F(lo[i + j]));
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += std::max(q[i] * B2F(hi[i]), q[i] * B2F(lo[i]));
  return s;
}

// ---- AVX2 + FMA ----

__attribute__((target("avx2,fma"))) static inline float HSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma"))) static float DotAvx2(const float* a, const float* b, int n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = HSum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx2,fma"))) static void AxpyAvx2(float w, const float* x, float* y, int n) {
  const __m256 vw = _mm256_set1_ps(w);
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(vw, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}

__attribute__((target("avx2,fma"))) static float ScoreAvx2(const float* q, const float* hi, const float* lo, int n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 q0 = _mm256_loadu_ps(q + i), q1 = _mm256_loadu_ps(q + i + 8);
    s0 = _mm256_add_ps(s0, _mm256_max_ps(_mm256_mul_ps(q0, _mm256_loadu_ps(hi + i)), _mm256_mul_ps(q0, _mm256_loadu_ps(lo + i))));
    s1 = _mm256_add_ps(s1, _mm256_max_ps(_mm256_mul_ps(q1, _mm256_loadu_ps(hi + i + 8)), _mm256_mul_ps(q1, _mm256_loadu_ps(lo + i + 8))));
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 q0 = _mm256_loadu_ps(q + i);
    s0 = _mm256_add_ps(s0, _mm256_max_ps(_mm256_mul_ps(q0, _mm256_loadu_ps(hi + i)), _mm256_mul_ps(q0, _mm256_loadu_ps(lo + i))));
  }
  float s = HSum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += std::max(q[i] * hi[i], q[i] * lo[i]);
  return s;
}

__attribute__((target("avx2,fma"))) static inline __m256 LoadBF16x8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"))) static float ScoreBF16Avx2(const float* q, const uint16_t* hi, const uint16_t* lo, int n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 q0 = _mm256_loadu_ps(q + i), q1 = _mm256_loadu_ps(q + i + 8);
    s0 = _mm256_add_ps(s0, _mm256_max_ps(_mm256_mul_ps(q0, LoadBF16x8(hi + i)), _mm256_mul_ps(q0, LoadBF16x8(lo + i))));
    s1 = _mm256_add_ps(s1, _mm256_max_ps(_mm256_mul_ps(q1, LoadBF16x8(hi + i + 8)), _mm256_mul_ps(q1, LoadBF16x8(lo + i + 8))));
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 q0 = _mm256_loadu_ps(q + i);
    s0 = _mm256_add_ps(s0, _mm256_max_ps(_mm256_mul_ps(q0, LoadBF16x8(hi + i)), _mm256_mul_ps(q0, LoadBF16x8(lo + i))));
  }
  float s = HSum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += std::max(q[i] * B2F(hi[i]), q[i] * B2F(lo[i]));
  return s;
}

__attribute__((target("avx2,fma"))) static void BF16Avx2(const uint16_t* src, float* dst, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
  }
  for (; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

const Kernels& Get() {
  static const Kernels k = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Kernels{DotAvx2, AxpyAvx2, ScoreAvx2, BF16Avx2, ScoreBF16Avx2, "avx2+fma"};
    return Kernels{DotPortable, AxpyPortable, ScorePortable, BF16Portable, ScoreBF16Portable, "portable"};
  }();
  return k;
}

}  // namespace freekv::cpu::simd
