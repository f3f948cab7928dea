// The dense building blocks of the forward pass, float32, OpenMP over rows/outputs with SIMD
// inner loops. Matrices are row-major; weights are [out][in] as transformers stores them.
#pragma once

namespace freekv::model {

// y[n][out] = x[n][in] * W[out][in]^T (+ bias[out] when given).
void Linear(const float* x, int n, int in, const float* w, const float* bias, int out, float* y);

// y[n][h] = x / sqrt(mean(x^2) + eps) * weight (statistics in float32, as transformers does).
void RmsNorm(const float* x, int n, int h, const float* weight, float eps, float* y);

// Rotates heads in place with the rotate-half pairing (i, i + D/2) of the HF implementations:
// x[n][heads][D]; positions[n]; inv_freq[D/2].
void Rope(float* x, int n, int heads, int head_dim, const int* positions, const float* inv_freq);

// gate[n][i] = silu(gate) * up, in place in gate.
void SwiGlu(float* gate, const float* up, long count);

// x += y, elementwise.
void AddInPlace(float* x, const float* y, long count);

// Exact causal attention for `n` queries at context positions [ctx - n, ctx): q[n][Hq][D],
// k/v[ctx][Hkv][D], out[n][Hq][D]; scale 1/sqrt(D); query head h reads KV head h / (Hq / Hkv).
void CausalAttention(const float* q, int n, const float* k, const float* v, int ctx, int q_heads, int kv_heads,
                     int head_dim, float* out);

}  // namespace freekv::model
