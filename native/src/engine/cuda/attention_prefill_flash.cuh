// Tensor-core causal prefill attention (FlashAttention-2 style): bf16 Q and paged bf16 K/V in,
// fp32 accumulation, fp32 or bf16 out.
//
// Layouts (the same K/V layout as PrefillAttentionParams in attention_prefill.cuh):
//   q     [n][q_heads][head_dim] bf16, contiguous
//   pages contiguous NHD pages [pages][2 (K,V)][page_size][kv_heads][head_dim] bf16 holding
//         tokens 0..start+n-1: token j lies in page j / page_size, row j % page_size
//   out   [n][q_heads][head_dim], fp32 (out_f32) or bf16 (out_bf16): exactly one is set
// Query i of the chunk sits at position start + i and attends tokens 0..start+i (start = tokens
// of the session before this chunk; any value, not necessarily page aligned).
//
// Design: one CTA of 4 warps per (tile of 128 (query, head) rows, KV head). The G = q_heads /
// kv_heads query heads of a GQA group are folded into the M dimension (row r of the flattened
// [n * G] rows is query r / G, head kv_head * G + r % G), so every K/V tile read serves the whole
// group. Each warp owns 32 rows (two m16 tiles). K/V tiles of 64 tokens stream through a
// two-stage cp.async pipeline into XOR-swizzled shared memory; S = Q K^T and O += P V run on
// mma.sync m16n8k16 bf16 with ldmatrix(.trans) fragments; online softmax in the exp2 domain with
// fp32 row statistics; P is rounded to bf16 for the PV product (as FlashAttention does). KV tiles
// past the CTA's last query are never loaded; only the tiles crossing the diagonal are masked.
// CTAs are issued heaviest (last query tiles) first. Head dims 64 and 128.
//
// On compute capability 9.0 (H100/H200) head dim 128 runs a second kernel instead
// (attention_prefill_flash_sm90.cu): FlashAttention-3's structure, wgmma from shared-memory
// descriptors, a producer warpgroup feeding a 3-stage ring of 128-token K/V tiles, two consumer
// warpgroups. Same layouts, numerics and masking; `path` forces either kernel (tests, benchmarks).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace freekv::cuda {

// Which kernel runs: kAuto picks the sm_90a wgmma kernel for head dim 128 on compute capability
// 9.0 and the mma.sync kernel otherwise; kWgmma on a shape or device it does not support throws
// std::invalid_argument.
enum class FlashPrefillPath { kAuto, kMmaSync, kWgmma };

struct FlashPrefillParams {
  const __nv_bfloat16* q = nullptr;      // [n][q_heads][head_dim]
  const __nv_bfloat16* pages = nullptr;  // contiguous NHD pages holding tokens 0..start+n-1
  float* out_f32 = nullptr;              // [n][q_heads][head_dim]; exactly one of the two outputs
  __nv_bfloat16* out_bf16 = nullptr;
  int n = 0, start = 0;
  int q_heads = 0, kv_heads = 0, head_dim = 0, page_size = 0;
  float scale = 0.f;  // softmax scale; 0 means 1/sqrt(head_dim)
  FlashPrefillPath path = FlashPrefillPath::kAuto;
  // The sm_90a kernel's producer (attention_prefill_flash_sm90.cu): -1 the service's choice, 1
  // tile-invariant copy offsets where the page size allows, 0 the page walk for every page size,
  // 2 as 1 with two tiles in flight (the benchmark times them beside the default).
  int variant = -1;
};

// Throws std::invalid_argument on a bad shape and std::runtime_error on a CUDA error.
void LaunchFlashPrefillAttention(const FlashPrefillParams& p, cudaStream_t stream);

// Rounds fp32 queries to bf16 (round to nearest even) for the kernel: the engine's PrefillAttend
// receives fp32 q. n elements; y must hold n bf16.
void LaunchQueriesToBf16(const float* x, size_t n, __nv_bfloat16* y, cudaStream_t stream);

// Head dims the kernel takes (others use the per-row kernel of attention_prefill.cuh).
constexpr bool FlashPrefillSupports(int head_dim) { return head_dim == 64 || head_dim == 128; }

// Query tokens of a launch whose CTAs fill the current device's SMs once (as many CTAs per SM as
// fit, whole row tiles of one KV head each, the kernel this head dimension gets here): a prefill
// chunk of a multiple of it leaves no SM idle in its last wave, where a part of a wave costs
// nearly a whole wave's time. At least 1.
int FlashPrefillWaveTokens(int q_heads, int kv_heads, int head_dim);

// Rows of (query, head) per CTA and tokens per K/V tile of the mma.sync kernel (for callers sizing
// work; the sm_90a kernel uses 128 x 128).
constexpr int kFlashPrefillBlockM = 128;
constexpr int kFlashPrefillBlockN = 64;

}  // namespace freekv::cuda
