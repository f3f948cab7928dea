// bf16 GEMMs through cuBLASLt, opened at run time.
//
// Why dlopen: the machines that build the addon have nvcc and cudart but no cuBLAS headers or
// libraries; the GPU machine has libcublasLt.so.13. So the library is opened with
// dlopen("libcublasLt.so.13") on first use and the dozen entry points we need are declared by
// hand (gemm_cublaslt.cu). A build without cuBLAS still links and loads; GemmBf16 then throws
// "cuBLASLt unavailable: ..." instead of aborting.
//
// Layout: the model's linear layers are stored like PyTorch's nn.Linear, W = [N out][K in]
// row-major, activations X = [M tokens][K] row-major. GemmBf16 computes, in fp32 accumulation,
//     Y[M][N] = alpha * X · W^T + beta * Y
// so beta = 1 folds the residual add of o_proj / down_proj into the GEMM.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace freekv::cuda {

// True when libcublasLt.so.13 was found and every entry point resolved. Never throws.
bool CublasLtAvailable(std::string* reason = nullptr);

// Y = alpha * X W^T + beta * Y on `stream`. M, N, K > 0; pointers 16-byte aligned, K and N
// multiples of 8. The first call for a shape picks an algorithm with cuBLASLt's heuristic and
// caches it; call once per shape before capturing a CUDA graph (the heuristic and the one-time
// workspace allocation must not happen inside a capture). Throws std::runtime_error on bad
// arguments, a missing library or a failed call.
void GemmBf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int M, int N, int K,
              cudaStream_t stream, float alpha = 1.0f, float beta = 0.0f);

// The same with operand and output types chosen: (BF16 in, BF16 out), (BF16 in, F32 out) or
// (F32 in, F32 out); fp32 accumulation always (CUBLAS_COMPUTE_32F: no TF32). K and N multiples
// of 8 (bf16 operands) or 4 (f32). The model runner uses F32 outputs so that beta = 1 adds into
// its fp32 residual stream.
enum class GemmType : int { BF16 = 0, F32 = 1 };
// Changes whenever the cached GEMM plans (algorithms) are dropped, e.g. by SetGemmAutotune: a
// captured CUDA graph holds the algorithm of its time, so graph keys include this.
uint64_t GemmPlanEpoch();

void Gemm(const void* x, const void* w, void* y, int M, int N, int K, GemmType in, GemmType out, cudaStream_t stream,
          float alpha = 1.0f, float beta = 0.0f);

// Autotuning (off by default; FREEKV_GEMM_AUTOTUNE=1 turns it on at start): when on, the first call for a shape outside a graph capture times
// up to 8 of the heuristic's algorithms on the call's own operands (into a scratch output, so y
// is written once, by the real call) and keeps the fastest. Switching clears the cached plans.
void SetGemmAutotune(bool on);

// Workspace handed to cuBLASLt (allocated once, on first use, with cudaMalloc).
constexpr size_t kCublasLtWorkspaceBytes = size_t(32) << 20;

}  // namespace freekv::cuda
