#include "engine/cpu/Attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <immintrin.h>

#include "engine/cpu/KvElement.h"
#include "engine/cpu/Simd.h"

namespace freekv::cpu {


template <DType T>
static void AttendGroupT(const PageGeometry& g, int h, const float* q, const std::vector<AttendedPage>& pages, float* out) {
  const int group = g.Hq / g.Hkv;
  const int D = g.D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto& kern = simd::Get();
  size_t total = 0;
  for (const auto& p : pages) total += p.tokens;
  thread_local std::vector<float> scores, dots, w;
  scores.resize(static_cast<size_t>(group) * std::max<size_t>(total, 1));
  dots.resize(group);
  w.resize(group);
  // Scores: each key row is read (and converted) once for the whole group.
  size_t t = 0;
  for (const auto& p : pages) {
    for (int i = 0; i < p.tokens; ++i, ++t) {
      const uint8_t* k = p.base + g.NhdK(i, h);
      if constexpr (T == DType::F32)
        kern.dot_group_f32(q, group, reinterpret_cast<const float*>(k), D, dots.data());
      else
        kern.dot_group_bf16(q, group, reinterpret_cast<const uint16_t*>(k), D, dots.data());
      for (int j = 0; j < group; ++j) scores[j * total + t] = dots[j] * scale;
    }
  }
  std::vector<float> inv(group);
  for (int j = 0; j < group; ++j) {
    float* s = scores.data() + j * total;
    float m = -std::numeric_limits<float>::infinity();
    for (size_t x = 0; x < total; ++x) m = std::max(m, s[x]);
    float z = 0.f;
    for (size_t x = 0; x < total; ++x) {
      s[x] = std::exp(s[x] - m);
      z += s[x];
    }
    inv[j] = total ? 1.0f / z : 0.f;
    std::fill(out + static_cast<size_t>(j) * D, out + static_cast<size_t>(j + 1) * D, 0.f);
  }
  t = 0;
  for (const auto& p : pages) {
    for (int i = 0; i < p.tokens; ++i, ++t) {
      for (int j = 0; j < group; ++j) w[j] = scores[j * total + t];
      const uint8_t* v = p.base + g.NhdV(i, h);
      if constexpr (T == DType::F32)
        kern.axpy_group_f32(w.data(), group, reinterpret_cast<const float*>(v), D, out);
      else
        kern.axpy_group_bf16(w.data(), group, reinterpret_cast<const uint16_t*>(v), D, out);
    }
  }
  for (int j = 0; j < group; ++j)
    for (int d = 0; d < D; ++d) out[static_cast<size_t>(j) * D + d] *= inv[j];
}

void AttendDecodeGroup(const PageGeometry& g, int h, const float* q, const std::vector<AttendedPage>& pages, float* out) {
  if (g.dtype == DType::F32)
    AttendGroupT<DType::F32>(g, h, q, pages, out);
  else
    AttendGroupT<DType::BF16>(g, h, q, pages, out);
}

namespace {

constexpr int kKeyTile = 64;

bool HasAvx2Fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

// Scores of NH query heads (q + h*D) against a transposed key tile kt [D][kKeyTile], the first
// halves*32 keys: s[h*kKeyTile + t] = scale * sum_d q[h][d] kt[d][t]. Each K load serves NH heads.
template <int NH>
__attribute__((target("avx2,fma"))) void TileScores(const float* kt, int D, const float* q, int halves, float scale, float* s) {
  const __m256 sc = _mm256_set1_ps(scale);
  for (int hf = 0; hf < halves; ++hf) {
    __m256 acc[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) acc[h][c] = _mm256_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const float* kr = kt + static_cast<size_t>(d) * kKeyTile + hf * 32;
      const __m256 k0 = _mm256_loadu_ps(kr), k1 = _mm256_loadu_ps(kr + 8), k2 = _mm256_loadu_ps(kr + 16), k3 = _mm256_loadu_ps(kr + 24);
      for (int h = 0; h < NH; ++h) {
        const __m256 qv = _mm256_broadcast_ss(q + static_cast<size_t>(h) * D + d);
        acc[h][0] = _mm256_fmadd_ps(qv, k0, acc[h][0]);
        acc[h][1] = _mm256_fmadd_ps(qv, k1, acc[h][1]);
        acc[h][2] = _mm256_fmadd_ps(qv, k2, acc[h][2]);
        acc[h][3] = _mm256_fmadd_ps(qv, k3, acc[h][3]);
      }
    }
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(s + h * kKeyTile + hf * 32 + c * 8, _mm256_mul_ps(acc[h][c], sc));
  }
}

// out[h][:] += sum_t p[h*kKeyTile + t] v[t][:] for NH heads and cnt value rows (D % 32 == 0):
// the accumulator stays in registers across the tile, each V load serves NH heads.
template <int NH>
__attribute__((target("avx2,fma"))) void TileValues(const float* p, int cnt, const float* v, int D, float* out) {
  for (int d0 = 0; d0 < D; d0 += 32) {
    __m256 acc[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) acc[h][c] = _mm256_loadu_ps(out + static_cast<size_t>(h) * D + d0 + c * 8);
    for (int t = 0; t < cnt; ++t) {
      const float* vr = v + static_cast<size_t>(t) * D + d0;
      const __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8), v2 = _mm256_loadu_ps(vr + 16), v3 = _mm256_loadu_ps(vr + 24);
      for (int h = 0; h < NH; ++h) {
        const __m256 w = _mm256_broadcast_ss(p + h * kKeyTile + t);
        acc[h][0] = _mm256_fmadd_ps(w, v0, acc[h][0]);
        acc[h][1] = _mm256_fmadd_ps(w, v1, acc[h][1]);
        acc[h][2] = _mm256_fmadd_ps(w, v2, acc[h][2]);
        acc[h][3] = _mm256_fmadd_ps(w, v3, acc[h][3]);
      }
    }
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + static_cast<size_t>(h) * D + d0 + c * 8, acc[h][c]);
  }
}

}  // namespace

void AttendPrefillGroup(int D, int G, const float* k, const float* v, int start, int n, const float* q, size_t q_stride,
                        float* out, size_t out_stride) {
  // Blocked exact attention: the n query rows (all G heads) against tiles of kKeyTile keys. For
  // each key tile the scores of every row that sees it are computed while the K tile is in cache,
  // then each row's running max and sum (online softmax) are updated, its accumulator rescaled
  // when the max grows, and the V tile is added in. The causal mask only cuts the tiles on the
  // diagonal (the last keys a row sees); rows before a tile's first key skip it.
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto& kern = simd::Get();
  const size_t GD = static_cast<size_t>(G) * D;
  const bool fast = D % 32 == 0 && HasAvx2Fma();
  thread_local std::vector<float> s, m, l, dots, w, kt;
  if (fast) kt.resize(static_cast<size_t>(D) * kKeyTile);
  s.resize(static_cast<size_t>(n) * G * kKeyTile);
  m.assign(static_cast<size_t>(n) * G, -std::numeric_limits<float>::infinity());
  l.assign(static_cast<size_t>(n) * G, 0.f);
  dots.resize(G);
  w.resize(G);
  for (int i = 0; i < n; ++i) std::fill(out + i * out_stride, out + i * out_stride + GD, 0.f);
  const int end = start + n;  // keys 0..end-1; row i sees keys 0..start+i
  for (int t0 = 0; t0 < end; t0 += kKeyTile) {
    const int t1 = std::min(t0 + kKeyTile, end);
    const int i0 = std::max(0, t0 - start);  // first row that sees key t0
    // Scores of the tile, [row][head][key - t0].
    if (fast) {
      // K tile transposed to [D][key], zero past its last key; the scores of a row's masked keys
      // are computed and ignored.
      const int tn = t1 - t0;
      for (int t = 0; t < kKeyTile; ++t) {
        const float* kr = t < tn ? k + static_cast<size_t>(t0 + t) * D : nullptr;
        for (int d = 0; d < D; ++d) kt[static_cast<size_t>(d) * kKeyTile + t] = kr ? kr[d] : 0.f;
      }
      for (int i = i0; i < n; ++i) {
        const float* qi = q + i * q_stride;
        float* si = s.data() + static_cast<size_t>(i) * G * kKeyTile;
        const int halves = (std::min(t1, start + i + 1) - t0 + 31) / 32;
        int j = 0;
        for (; j + 2 <= G; j += 2) TileScores<2>(kt.data(), D, qi + static_cast<size_t>(j) * D, halves, scale, si + j * kKeyTile);
        if (j < G) TileScores<1>(kt.data(), D, qi + static_cast<size_t>(j) * D, halves, scale, si + j * kKeyTile);
      }
    } else {
      for (int i = i0; i < n; ++i) {
        const float* qi = q + i * q_stride;
        float* si = s.data() + static_cast<size_t>(i) * G * kKeyTile;
        const int lim = std::min(t1, start + i + 1);
        for (int t = t0; t < lim; ++t) {
          kern.dot_group_f32(qi, G, k + static_cast<size_t>(t) * D, D, dots.data());
          for (int j = 0; j < G; ++j) si[j * kKeyTile + (t - t0)] = dots[j] * scale;
        }
      }
    }
    // Online softmax update and the V tile.
    for (int i = i0; i < n; ++i) {
      float* oi = out + i * out_stride;
      float* si = s.data() + static_cast<size_t>(i) * G * kKeyTile;
      const int cnt = std::min(t1, start + i + 1) - t0;
      for (int j = 0; j < G; ++j) {
        float* sj = si + j * kKeyTile;
        float& mj = m[static_cast<size_t>(i) * G + j];
        float& lj = l[static_cast<size_t>(i) * G + j];
        float mt = mj;
        for (int t = 0; t < cnt; ++t) mt = std::max(mt, sj[t]);
        if (mt > mj) {
          const float alpha = std::exp(mj - mt);  // 0 on the first tile (mj = -inf)
          lj *= alpha;
          float* oj = oi + static_cast<size_t>(j) * D;
          for (int d = 0; d < D; ++d) oj[d] *= alpha;
          mj = mt;
        }
        float z = 0.f;
        for (int t = 0; t < cnt; ++t) {
          sj[t] = std::exp(sj[t] - mj);
          z += sj[t];
        }
        lj += z;
      }
      if (fast) {
        const float* vt = v + static_cast<size_t>(t0) * D;
        int j = 0;
        for (; j + 2 <= G; j += 2) TileValues<2>(si + j * kKeyTile, cnt, vt, D, oi + static_cast<size_t>(j) * D);
        if (j < G) TileValues<1>(si + j * kKeyTile, cnt, vt, D, oi + static_cast<size_t>(j) * D);
        continue;
      }
      for (int t = 0; t < cnt; ++t) {
        for (int j = 0; j < G; ++j) w[j] = si[j * kKeyTile + t];
        kern.axpy_group_f32(w.data(), G, v + static_cast<size_t>(t0 + t) * D, D, oi);
      }
    }
  }
  for (int i = 0; i < n; ++i) {
    float* oi = out + i * out_stride;
    for (int j = 0; j < G; ++j) {
      const float inv = 1.0f / l[static_cast<size_t>(i) * G + j];
      for (int d = 0; d < D; ++d) oi[static_cast<size_t>(j) * D + d] *= inv;
    }
  }
}

}  // namespace freekv::cpu
