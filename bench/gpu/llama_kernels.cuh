// The small per-token kernels of a Llama decode step that are not attention or GEMMs:
// embedding lookup, RMSNorm, RoPE fused with the append of the new token's K and V into its NHD
// page, and SwiGLU. bf16 storage, fp32 arithmetic. The GEMMs are native/cuda/gemm_cublaslt.
#pragma once
#include "common.cuh"

namespace fkbench {

// x[b][hidden] = table[token[b]][hidden]
void EmbeddingLookup(const bf16* table, const int* token, bf16* x, int batch, int hidden, cudaStream_t s);

// y[b][n] = x[b][n] * rsqrt(mean_n x^2 + eps) * w[n]; n % 8 == 0, n <= 8192
void RmsNorm(const bf16* x, const bf16* w, bf16* y, int batch, int n, float eps, cudaStream_t s);

// qkv[b] = [q: hq*D][k: hkv*D][v: hkv*D]. Rotates q and k in place by position pos[b] (rotate-half
// convention, theta), then writes k and v of token b into its NHD page: page[b] points at a page
// laid out [2][P][hkv][D] (K block then V block) and the token goes to row slot[b] of it.
void RopeAppend(bf16* qkv, const int* pos, bf16* const* page, const int* slot, int batch, int hq, int hkv,
                int D, int P, float theta, cudaStream_t s);

// act[b][f] = silu(gu[b][f]) * gu[b][F + f], gu = [gate F][up F] per row.
void SwiGLU(const bf16* gu, bf16* act, int batch, int F, cudaStream_t s);

}  // namespace fkbench
