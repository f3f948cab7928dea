#include "engine/cpu/Simd.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

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

static void DotGroupF32Portable(const float* q, int G, const float* k, int D, float* out) {
  for (int j = 0; j < G; ++j) out[j] = DotPortable(q + static_cast<size_t>(j) * D, k, D);
}
static void DotGroupBF16Portable(const float* q, int G, const uint16_t* k, int D, float* out) {
  thread_local std::vector<float> row;
  row.resize(D);
  BF16Portable(k, row.data(), D);
  DotGroupF32Portable(q, G, row.data(), D, out);
}
static void AxpyGroupF32Portable(const float* w, int G, const float* v, int D, float* out) {
  for (int j = 0; j < G; ++j) AxpyPortable(w[j], v, out + static_cast<size_t>(j) * D, D);
}
static void AxpyGroupBF16Portable(const float* w, int G, const uint16_t* v, int D, float* out) {
  thread_local std::vector<float> row;
  row.resize(D);
  BF16Portable(v, row.data(), D);
  AxpyGroupF32Portable(w, G, row.data(), D, out);
}
// The positive and negative parts of the group's queries, [G][D] each, kept per thread.
static void SplitQuery(const float* q, int G, int D, std::vector<float>& qp, std::vector<float>& qn) {
  const size_t n = static_cast<size_t>(G) * D;
  qp.resize(n);
  qn.resize(n);
  for (size_t i = 0; i < n; ++i) {
    qp[i] = q[i] > 0.f ? q[i] : 0.f;
    qn[i] = q[i] < 0.f ? q[i] : 0.f;
  }
}

static void ScorePagesBF16Portable(const float* q, int G, const uint16_t* base, size_t stride, int n, int D, float* out) {
  thread_local std::vector<float> qp, qn;
  SplitQuery(q, G, D, qp, qn);
  for (int p = 0; p < n; ++p) {
    const uint16_t* hi = base + static_cast<size_t>(p) * stride;
    const uint16_t* lo = hi + D;
    for (int j = 0; j < G; ++j) {
      const float* a = qp.data() + static_cast<size_t>(j) * D;
      const float* b = qn.data() + static_cast<size_t>(j) * D;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int i = 0;
      for (; i + 8 <= D; i += 8)
        for (int t = 0; t < 8; ++t) {
          acc[t] += a[i + t] * B2F(hi[i + t]);
          acc[t] += b[i + t] * B2F(lo[i + t]);
        }
      float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; i < D; ++i) {
        s += a[i] * B2F(hi[i]);
        s += b[i] * B2F(lo[i]);
      }
      out[static_cast<size_t>(p) * G + j] = s;
    }
  }
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

// Group kernels: G accumulators in registers, each K/V/summary chunk loaded (and converted) once.
template <int G>
__attribute__((target("avx2,fma"))) static void DotGroupT(const float* q, const float* k32, const uint16_t* k16, int D, float* out) {
  __m256 acc[G];
  for (int j = 0; j < G; ++j) acc[j] = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 kv = k16 ? LoadBF16x8(k16 + i) : _mm256_loadu_ps(k32 + i);
    for (int j = 0; j < G; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * D + i), kv, acc[j]);
  }
  for (int j = 0; j < G; ++j) {
    float s = HSum(acc[j]);
    for (int t = i; t < D; ++t) s += q[j * D + t] * (k16 ? B2F(k16[t]) : k32[t]);
    out[j] = s;
  }
}

template <int G>
__attribute__((target("avx2,fma"))) static void AxpyGroupT(const float* w, const float* v32, const uint16_t* v16, int D, float* out) {
  __m256 wv[G];
  for (int j = 0; j < G; ++j) wv[j] = _mm256_set1_ps(w[j]);
  int i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 vv = v16 ? LoadBF16x8(v16 + i) : _mm256_loadu_ps(v32 + i);
    for (int j = 0; j < G; ++j) {
      float* o = out + j * D + i;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(wv[j], vv, _mm256_loadu_ps(o)));
    }
  }
  for (; i < D; ++i) {
    const float x = v16 ? B2F(v16[i]) : v32[i];
    for (int j = 0; j < G; ++j) out[j * D + i] += w[j] * x;
  }
}

// P pages (1 or 2) for GB <= 4 query heads: 2 x GB accumulators, each summary chunk loaded and
// converted once for the GB heads, each query chunk once for the P pages. Every page is summed in
// the same order whatever P and its place in the pair (see Kernels::score_pages_bf16).
template <int GB, int P>
__attribute__((target("avx2,fma"))) static inline void ScorePagesBlock(const float* qp, const float* qn, int D, const uint16_t* const* hi,
                                                                      float* const* out) {
  __m256 acc[P][GB];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < GB; ++j) acc[p][j] = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= D; i += 8) {
    __m256 h[P], l[P];
    for (int p = 0; p < P; ++p) {
      h[p] = LoadBF16x8(hi[p] + i);
      l[p] = LoadBF16x8(hi[p] + D + i);
    }
    for (int j = 0; j < GB; ++j) {
      const __m256 a = _mm256_loadu_ps(qp + j * D + i), b = _mm256_loadu_ps(qn + j * D + i);
      for (int p = 0; p < P; ++p) {
        acc[p][j] = _mm256_fmadd_ps(a, h[p], acc[p][j]);
        acc[p][j] = _mm256_fmadd_ps(b, l[p], acc[p][j]);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < GB; ++j) {
      float s = HSum(acc[p][j]);
      for (int t = i; t < D; ++t) {
        s += qp[j * D + t] * B2F(hi[p][t]);
        s += qn[j * D + t] * B2F(hi[p][D + t]);
      }
      out[p][j] = s;
    }
}

template <int P>
__attribute__((target("avx2,fma"))) static inline void ScorePagesHeads(const float* qp, const float* qn, int G, int D, const uint16_t* const* hi,
                                                                      float* const* out) {
  for (int j0 = 0; j0 < G; j0 += 4) {
    const float* a = qp + static_cast<size_t>(j0) * D;
    const float* b = qn + static_cast<size_t>(j0) * D;
    float* o[P];
    for (int p = 0; p < P; ++p) o[p] = out[p] + j0;
    switch (std::min(4, G - j0)) {
      case 1: ScorePagesBlock<1, P>(a, b, D, hi, o); break;
      case 2: ScorePagesBlock<2, P>(a, b, D, hi, o); break;
      case 3: ScorePagesBlock<3, P>(a, b, D, hi, o); break;
      default: ScorePagesBlock<4, P>(a, b, D, hi, o); break;
    }
  }
}

__attribute__((target("avx2,fma"))) static void ScorePagesBF16Avx2(const float* q, int G, const uint16_t* base, size_t stride, int n, int D,
                                                                   float* out) {
  thread_local std::vector<float> qp, qn;
  SplitQuery(q, G, D, qp, qn);
  // Prefetch distance in pages: a summary row is a few cache lines per head, the next pages are
  // a stride apart (a new 4 KiB page each at the shapes of interest).
  constexpr int kAhead = 6;
  const size_t lines = (static_cast<size_t>(2) * D * sizeof(uint16_t) + 63) / 64;
  auto prefetch = [&](int p) {
    if (p >= n) return;
    const char* c = reinterpret_cast<const char*>(base + static_cast<size_t>(p) * stride);
    for (size_t k = 0; k < lines; ++k) _mm_prefetch(c + 64 * k, _MM_HINT_T0);
  };
  for (int p = 0; p < std::min(n, kAhead); ++p) prefetch(p);
  int p = 0;
  for (; p + 2 <= n; p += 2) {
    prefetch(p + kAhead);
    prefetch(p + kAhead + 1);
    const uint16_t* hi[2] = {base + static_cast<size_t>(p) * stride, base + static_cast<size_t>(p + 1) * stride};
    float* o[2] = {out + static_cast<size_t>(p) * G, out + static_cast<size_t>(p + 1) * G};
    ScorePagesHeads<2>(qp.data(), qn.data(), G, D, hi, o);
  }
  if (p < n) {
    const uint16_t* hi[1] = {base + static_cast<size_t>(p) * stride};
    float* o[1] = {out + static_cast<size_t>(p) * G};
    ScorePagesHeads<1>(qp.data(), qn.data(), G, D, hi, o);
  }
}

// Runs F<8> over blocks of 8 heads, then F<G % 8>.
#define FREEKV_GROUP_DISPATCH(F, G, STEP, ...)          \
  do {                                                  \
    int j0 = 0;                                         \
    for (; j0 + 8 <= (G); j0 += 8) F<8>(__VA_ARGS__);   \
    switch ((G) - j0) {                                 \
      case 1: F<1>(__VA_ARGS__); break;                 \
      case 2: F<2>(__VA_ARGS__); break;                 \
      case 3: F<3>(__VA_ARGS__); break;                 \
      case 4: F<4>(__VA_ARGS__); break;                 \
      case 5: F<5>(__VA_ARGS__); break;                 \
      case 6: F<6>(__VA_ARGS__); break;                 \
      case 7: F<7>(__VA_ARGS__); break;                 \
      default: break;                                   \
    }                                                   \
  } while (0)

__attribute__((target("avx2,fma"))) static void DotGroupF32Avx2(const float* q, int G, const float* k, int D, float* out) {
  FREEKV_GROUP_DISPATCH(DotGroupT, G, 8, q + static_cast<size_t>(j0) * D, k, nullptr, D, out + j0);
}
__attribute__((target("avx2,fma"))) static void DotGroupBF16Avx2(const float* q, int G, const uint16_t* k, int D, float* out) {
  FREEKV_GROUP_DISPATCH(DotGroupT, G, 8, q + static_cast<size_t>(j0) * D, nullptr, k, D, out + j0);
}
__attribute__((target("avx2,fma"))) static void AxpyGroupF32Avx2(const float* w, int G, const float* v, int D, float* out) {
  FREEKV_GROUP_DISPATCH(AxpyGroupT, G, 8, w + j0, v, nullptr, D, out + static_cast<size_t>(j0) * D);
}
__attribute__((target("avx2,fma"))) static void AxpyGroupBF16Avx2(const float* w, int G, const uint16_t* v, int D, float* out) {
  FREEKV_GROUP_DISPATCH(AxpyGroupT, G, 8, w + j0, nullptr, v, D, out + static_cast<size_t>(j0) * D);
}
#undef FREEKV_GROUP_DISPATCH

const Kernels& Get() {
  static const Kernels k = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Kernels{DotAvx2,          AxpyAvx2,          ScoreAvx2,         BF16Avx2,           ScoreBF16Avx2,
                     DotGroupF32Avx2,  DotGroupBF16Avx2,  AxpyGroupF32Avx2,  AxpyGroupBF16Avx2,
                     ScorePagesBF16Avx2, "avx2+fma"};
    return Kernels{DotPortable,         AxpyPortable,         ScorePortable,         BF16Portable,
                   ScoreBF16Portable,   DotGroupF32Portable,  DotGroupBF16Portable,  AxpyGroupF32Portable,
                   AxpyGroupBF16Portable, ScorePagesBF16Portable, "portable"};
  }();
  return k;
}

}  // namespace freekv::cpu::simd
