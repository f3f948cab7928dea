// The element-wise kernels of the GPU model runner (forward_cuda.cu): embedding gather, RMSNorm,
// bias + RoPE + q/k/v split, SwiGLU, fp32 -> bf16. The residual stream and every result that
// feeds attention are fp32; outputs that feed a GEMM are written in the GEMM's operand type
// (`bf16` = true: bf16, else fp32). Arithmetic matches the CPU forward pass (model/Kernels.cpp):
// RMSNorm scales by 1 / sqrt(mean + eps) then the weight, RoPE uses the rotate-half convention
// with the fp32 angle inv_freq * pos and its cosine/sine taken in double.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

namespace freekv::cuda {

// x[m][H] = table[tokens[m]][H] (table fp32 or bf16 by `table_bf16`); tokens on the device.
void LaunchEmbed(const void* table, bool table_bf16, const int* tokens, int M, int H, float* x, cudaStream_t s);

// y[m][i] = w[i] * (x[m][i] / sqrt(mean_i x[m]^2 + eps)); y fp32 or bf16.
void LaunchRmsNorm(const float* x, const float* w, int M, int H, float eps, void* y, bool y_bf16, cudaStream_t s);

// qkv [M][(Hq + 2 Hkv) D] fp32 (+ bias of that width, or null) -> q [M][Hq][D], k, v [M][Hkv][D]
// with q and k rotated by positions[m] (device array) and inv_freq [D/2] (device array).
// q16 (or null; [M][Hq][D] bf16): the rotated queries go there instead, rounded to nearest even
// (the bits the prefill kernel's own conversion of q would give), and q gets only its last row
// (the query the engine keeps for the first decode step): one pass instead of an fp32 write, a
// read and a bf16 write.
void LaunchBiasRopeSplit(const float* qkv, const float* bias, const int* positions, const float* inv_freq, int M,
                         int Hq, int Hkv, int D, float* q, float* k, float* v, void* q16, cudaStream_t s);

// act[m][f] = silu(gu[m][f]) * gu[m][I + f] for gu = [M][gate I | up I] fp32; act fp32 or bf16.
void LaunchSwiGlu(const float* gu, int M, int I, void* act, bool act_bf16, cudaStream_t s);

// The same for gu in bf16 (the gate/up GEMM's output rounded to bf16, as PyTorch's bf16 Linear
// gives it): read as fp32, the product rounded once into act. I % 8 == 0, buffers 16-byte aligned.
void LaunchSwiGluBf16(const void* gu, int M, int I, void* act, bool act_bf16, cudaStream_t s);

// out[m] = index of the largest of x[m][0..n) (the lowest index on ties; NaN never wins unless the
// row is all NaN, then 0), the host sampler's argmax. One block per row.
void LaunchArgmaxRows(const float* x, int M, int n, int* out, cudaStream_t s);

// y[i] = bf16(x[i]) for i < n.
void LaunchToBf16(const float* x, size_t n, void* y, cudaStream_t s);

}  // namespace freekv::cuda
