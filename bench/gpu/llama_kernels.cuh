// The small per-token kernels of a Llama decode step that are not attention or GEMMs:
// the step input, RMSNorm, RoPE fused with the append of the new token's K and V into its NHD
// page, and SwiGLU. bf16 storage, fp32 arithmetic. The GEMMs are native/src/model/cuda/gemm_cublaslt.
#pragma once
#include "common.cuh"

namespace fkbench {

// The decode step's input, varying from step to step like real text does: *step += 1, then
// x[b] = a * table[token[b]] + sqrt(1 - a^2) * noise(seed, *step, b) * noise_scale, so that the
// inputs of adjacent steps have cosine about a^2 and consecutive queries stay similar (the
// premise of speculative selection) without being identical (which would hide all recall).
void AdvanceStep(int* step, cudaStream_t s);
void StepInput(const bf16* table, const int* token, const int* step, uint64_t seed, float a, float noise_scale,
               bf16* x, int batch, int hidden, cudaStream_t s);

// y = bf16(x), n % 8 == 0
void F32ToBf16(const float* x, bf16* y, size_t n, cudaStream_t s);
// p[i] = uniform(-scale, scale) from a seeded hash, never zero
void FillF32(float* p, size_t n, uint64_t seed, float scale, cudaStream_t s);

// y[b][n] = x[b][n] * rsqrt(mean_n x^2 + eps) * w[n]; n % 8 == 0, n <= 8192
void RmsNorm(const bf16* x, const bf16* w, bf16* y, int batch, int n, float eps, cudaStream_t s);

// qkv[b] = [q: hq*D][k: hkv*D][v: hkv*D]. Rotates q and k by position `pos` (rotate-half
// convention, theta); writes q as fp32 to q_out[b][hq][D] (what attention and selection take) and
// k, v of token b into its NHD page: page[b] points at a page laid out [2][P][hkv][D] (K block
// then V block) and the token goes to row `row` of it.
void RopeAppend(const bf16* qkv, float* q_out, int pos, bf16* const* page, int row, int batch, int hq, int hkv,
                int D, int P, float theta, cudaStream_t s);

// act[b][f] = silu(gu[b][f]) * gu[b][F + f], gu = [gate F][up F] per row.
void SwiGLU(const bf16* gu, bf16* act, int batch, int F, cudaStream_t s);

}  // namespace fkbench
