#include "model/cpu/Kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace freekv::model {

namespace {
inline float Dot(const float* a, const float* b, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}
}  // namespace

namespace {
// R rows x O outputs of y = x W^T over the whole inner dimension, in 8-lane partial sums that the
// compiler keeps in vector registers (an AVX2+FMA clone is picked at load time when the CPU has
// it; the baseline build is x86-64-v2). Each weight row is read once per R tokens.
template <int R, int O>
__attribute__((target_clones("avx2,fma", "default"))) void Tile(const float* x, long ldx, const float* w, long ldw, int in,
                                                                float* y, long ldy, const float* bias) {
  float s[R][O][8] = {};
  int k = 0;
  for (; k + 8 <= in; k += 8)
    for (int r = 0; r < R; r++)
      for (int o = 0; o < O; o++)
        for (int l = 0; l < 8; l++) s[r][o][l] += x[r * ldx + k + l] * w[o * ldw + k + l];
  for (int r = 0; r < R; r++)
    for (int o = 0; o < O; o++) {
      float t = 0.f;
      for (int l = 0; l < 8; l++) t += s[r][o][l];
      for (int kk = k; kk < in; kk++) t += x[r * ldx + kk] * w[o * ldw + kk];
      y[r * ldy + o] = t + (bias ? bias[o] : 0.f);
    }
}

template <int R>
void TileRows(const float* x, const float* w, int outs, int in, float* y, long ldy, const float* bias) {
  if (outs == 2)
    Tile<R, 2>(x, in, w, in, in, y, ldy, bias);
  else
    Tile<R, 1>(x, in, w, in, in, y, ldy, bias);
}
}  // namespace

// Below this many multiply-adds a Linear runs on the calling thread: the fork and join of a
// parallel region cost more than they save, and on a small host the second thread may be busy
// with the other tier. (A decode step of the built-in model, whose projections are up to 128 x 352,
// took 2.0-3.7 ms per token with its Linears split over 2 threads and 1.0-1.8 ms on one.)
constexpr long kParallelLinearMacs = 1L << 18;

void Linear(const float* x, int n, int in, const float* w, const float* bias, int out, float* y) {
  constexpr int R = 4, O = 2;
  const int row_tiles = (n + R - 1) / R, out_tiles = (out + O - 1) / O;
  const long total = static_cast<long>(row_tiles) * out_tiles;
  const bool split = total > 16 && static_cast<long>(n) * in * out >= kParallelLinearMacs;
#pragma omp parallel for schedule(static) if (split)
  for (long t = 0; t < total; t++) {
    const int o0 = static_cast<int>(t % out_tiles) * O, r0 = static_cast<int>(t / out_tiles) * R;
    const int rows = std::min(R, n - r0), outs = std::min(O, out - o0);
    const float* xs = x + static_cast<long>(r0) * in;
    const float* ws = w + static_cast<long>(o0) * in;
    float* ys = y + static_cast<long>(r0) * out + o0;
    const float* bs = bias ? bias + o0 : nullptr;
    switch (rows) {
      case 4: TileRows<4>(xs, ws, outs, in, ys, out, bs); break;
      case 3: TileRows<3>(xs, ws, outs, in, ys, out, bs); break;
      case 2: TileRows<2>(xs, ws, outs, in, ys, out, bs); break;
      default: TileRows<1>(xs, ws, outs, in, ys, out, bs); break;
    }
  }
}

void RmsNorm(const float* x, int n, int h, const float* weight, float eps, float* y) {
#pragma omp parallel for schedule(static) if (n > 8)
  for (int r = 0; r < n; r++) {
    const float* xr = x + static_cast<long>(r) * h;
    float* yr = y + static_cast<long>(r) * h;
    float ss = Dot(xr, xr, h);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
#pragma omp simd
    for (int i = 0; i < h; i++) yr[i] = weight[i] * (xr[i] * inv);
  }
}

void Rope(float* x, int n, int heads, int head_dim, const int* positions, const float* inv_freq) {
  const int half = head_dim / 2;
#pragma omp parallel for schedule(static) if (n > 8)
  for (int r = 0; r < n; r++) {
    std::vector<float> c(half), s(half);
    const float pos = static_cast<float>(positions[r]);
    for (int i = 0; i < half; i++) {
      const float angle = inv_freq[i] * pos;  // float32 product, as transformers forms it
      c[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      s[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
    for (int h = 0; h < heads; h++) {
      float* v = x + (static_cast<long>(r) * heads + h) * head_dim;
      for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

void SwiGlu(float* gate, const float* up, long count) {
#pragma omp parallel for simd schedule(static) if (count > 65536)
  for (long i = 0; i < count; i++) {
    const float g = gate[i];
    gate[i] = g / (1.f + std::exp(-g)) * up[i];
  }
}

void AddInPlace(float* x, const float* y, long count) {
#pragma omp parallel for simd schedule(static) if (count > 65536)
  for (long i = 0; i < count; i++) x[i] += y[i];
}

void CausalAttention(const float* q, int n, const float* k, const float* v, int ctx, int q_heads, int kv_heads,
                     int head_dim, float* out) {
  const int group = q_heads / kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  const int first = ctx - n;
  const long kv_stride = static_cast<long>(kv_heads) * head_dim;
#pragma omp parallel for collapse(2) schedule(dynamic, 4)
  for (int r = 0; r < n; r++) {
    for (int h = 0; h < q_heads; h++) {
      const int kvh = h / group;
      const int len = first + r + 1;
      const float* qr = q + (static_cast<long>(r) * q_heads + h) * head_dim;
      std::vector<float> p(len);
      float mx = -INFINITY;
      for (int t = 0; t < len; t++) {
        p[t] = Dot(qr, k + t * kv_stride + static_cast<long>(kvh) * head_dim, head_dim) * scale;
        mx = std::max(mx, p[t]);
      }
      float sum = 0.f;
      for (int t = 0; t < len; t++) {
        p[t] = std::exp(p[t] - mx);
        sum += p[t];
      }
      float* o = out + (static_cast<long>(r) * q_heads + h) * head_dim;
      std::fill(o, o + head_dim, 0.f);
      for (int t = 0; t < len; t++) {
        const float* vr = v + t * kv_stride + static_cast<long>(kvh) * head_dim;
        const float wgt = p[t] / sum;
#pragma omp simd
        for (int d = 0; d < head_dim; d++) o[d] += wgt * vr[d];
      }
    }
  }
}

}  // namespace freekv::model
