#include "engine/cpu/Attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

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

void AttendPrefillGroup(int D, int G, const float* k, const float* v, int start, int n, const float* q, size_t q_stride,
                        float* out, size_t out_stride) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto& kern = simd::Get();
  const size_t max_len = static_cast<size_t>(start) + n;
  thread_local std::vector<float> s, dots, w;
  s.resize(static_cast<size_t>(G) * max_len);
  dots.resize(G);
  w.resize(G);
  for (int i = 0; i < n; ++i) {
    const float* qi = q + i * q_stride;
    float* oi = out + i * out_stride;
    const size_t len = static_cast<size_t>(start) + i + 1;
    for (size_t t = 0; t < len; ++t) {
      kern.dot_group_f32(qi, G, k + t * D, D, dots.data());
      for (int j = 0; j < G; ++j) s[j * max_len + t] = dots[j] * scale;
    }
    std::vector<float> inv(G);
    for (int j = 0; j < G; ++j) {
      float* sj = s.data() + j * max_len;
      float m = -std::numeric_limits<float>::infinity();
      for (size_t t = 0; t < len; ++t) m = std::max(m, sj[t]);
      float z = 0.f;
      for (size_t t = 0; t < len; ++t) {
        sj[t] = std::exp(sj[t] - m);
        z += sj[t];
      }
      inv[j] = 1.0f / z;
      std::fill(oi + static_cast<size_t>(j) * D, oi + static_cast<size_t>(j + 1) * D, 0.f);
    }
    for (size_t t = 0; t < len; ++t) {
      for (int j = 0; j < G; ++j) w[j] = s[j * max_len + t];
      kern.axpy_group_f32(w.data(), G, v + t * D, D, oi);
    }
    for (int j = 0; j < G; ++j)
      for (int d = 0; d < D; ++d) oi[static_cast<size_t>(j) * D + d] *= inv[j];
  }
}

}  // namespace freekv::cpu
