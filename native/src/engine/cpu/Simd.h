// Vector kernels of the CPU backend: dot products, axpy, the page score and bf16 -> f32
// conversion. AVX2+FMA versions are chosen at run time when the CPU has them (the addon is built
// for x86-64-v2); the portable versions keep eight partial sums so the compiler can vectorise
// them without reassociating floating point on its own. One process always uses one variant, so
// results are reproducible run to run (and across a re-attach on the same machine).
#pragma once

#include <cstddef>
#include <cstdint>

namespace freekv::cpu::simd {

struct Kernels {
  float (*dot)(const float* a, const float* b, int n);
  void (*axpy)(float w, const float* x, float* y, int n);  // y += w * x
  float (*score)(const float* q, const float* hi, const float* lo, int n);  // sum max(q*hi, q*lo)
  void (*bf16_to_f32)(const uint16_t* src, float* dst, int n);
  float (*score_bf16)(const float* q, const uint16_t* hi, const uint16_t* lo, int n);  // bf16 bounds
  // Group kernels: one K/V row (or summary) read once for the G query heads of a KV head.
  // q, out rows have stride D. dot: out[j] = q_j . k; axpy: out_j += w[j] * v.
  void (*dot_group_f32)(const float* q, int G, const float* k, int D, float* out);
  void (*dot_group_bf16)(const float* q, int G, const uint16_t* k, int D, float* out);
  void (*axpy_group_f32)(const float* w, int G, const float* v, int D, float* out);
  void (*axpy_group_bf16)(const float* w, int G, const uint16_t* v, int D, float* out);
  // The selection's scan: n page summaries of one KV head, page p's bf16 [hi][D] then [lo][D] at
  // base + p * stride (elements), scored for the G query heads q ([G][D]):
  //   out[p * G + j] = sum_d (max(q_jd, 0) hi_pd + min(q_jd, 0) lo_pd)
  // which is sum_d max(q_jd hi_pd, q_jd lo_pd) for hi >= lo, term by term the same products. Each
  // term is monotone in the bounds (nondecreasing in hi, nonincreasing in lo), and every page is
  // summed in the same order, so a group bound scored here bounds every page inside it also in
  // float arithmetic (engine/Hierarchy.h). Pages go two at a time (each query chunk loaded once
  // for both), with the pages a few rows ahead prefetched.
  void (*score_pages_bf16)(const float* q, int G, const uint16_t* base, size_t stride, int n, int D, float* out);
  const char* name;
};

const Kernels& Get();

inline float Dot(const float* a, const float* b, int n) { return Get().dot(a, b, n); }
inline void Axpy(float w, const float* x, float* y, int n) { Get().axpy(w, x, y, n); }
inline float Score(const float* q, const float* hi, const float* lo, int n) { return Get().score(q, hi, lo, n); }
inline float ScoreBF16(const float* q, const uint16_t* hi, const uint16_t* lo, int n) {
  return Get().score_bf16(q, hi, lo, n);
}
inline void BF16ToF32(const uint16_t* src, float* dst, int n) { Get().bf16_to_f32(src, dst, n); }

}  // namespace freekv::cpu::simd
