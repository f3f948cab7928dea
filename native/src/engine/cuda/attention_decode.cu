// Paged decode attention: the launcher of the warp-independent kernel (attention_decode_warp.cuh)
// and the combine pass that merges its splits.
//
// Why this kernel (native/src/engine/cuda/PERF.md has the measurements): decode attention reads
// every K/V byte once and does ~4 FLOP per byte (G = 4), so it must stream HBM. Each warp walks
// its own tiles with no block barrier in the token loop (4 warps a block; U tokens per token group
// and blocks per SM below). Long tables are split along the sequence (grid = splits x kv_heads x
// batch, one wave of resident blocks on an H200) and merged by the combine pass. It was the
// fastest of the measured kernels on every shape (PERF.md, "Attention variants").
#include <algorithm>
#include <string>

#include "attention_core.cuh"
#include "attention_decode.cuh"
#include "attention_decode_warp.cuh"
#include "cuda/cuda_check.cuh"

namespace freekv::cuda {
namespace {

constexpr int kSms = 132;  // H200

// Tokens per token group per warp tile, and resident blocks per SM (registers: q and the
// accumulators are 16 x G, the two K/V buffers 16 x U per lane). D 64 at G 3-4 with U = 4 has two
// softmax rounds (16-token warp tiles) and spills at 168 registers: U = 2 there.
constexpr int WarpU(int D, int G) { return G <= 2 || (G <= 4 && D > 64) ? 4 : 2; }
constexpr int WarpBlocksPerSm(int G) { return G <= 4 ? 3 : 2; }

// One block per (b, q head); threads over head_dim.
__global__ void DecodeCombineKernel(float* out, const float* ws_o, const float* ws_ml, int splits, int head_dim) {
  const size_t qh = blockIdx.x;
  const float* ml = ws_ml + qh * splits * 2;
  float M = kNegBig;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.f;
  for (int s = 0; s < splits; ++s) L += ml[2 * s + 1] * exp2f(ml[2 * s] - M);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float O = 0.f;
    for (int s = 0; s < splits; ++s) O += ws_o[(qh * splits + s) * head_dim + d] * exp2f(ml[2 * s] - M);
    out[qh * head_dim + d] = L > 0.f ? O / L : 0.f;
  }
}

struct DecodeLaunch {
  const DecodeAttentionParams& p;
  dim3 grid;
  int pps, splits;
  float* ws_o;
  float* ws_ml;
  cudaStream_t stream;
  template <int D, int MAXG>
  void operator()() const {
    decode_warp::DecodeAttentionWarpKernel<D, MAXG, 4, WarpU(D, MAXG), WarpBlocksPerSm(MAXG)>
        <<<grid, 128, 0, stream>>>(p, pps, splits, ws_o, ws_ml);
  }
};

int SplitsFor(const DecodeAttentionParams& p, int pps) { return std::max(1, (p.max_pages + pps - 1) / pps); }

int GroupBound(const DecodeAttentionParams& p) {
  const int G = p.kv_heads > 0 ? p.q_heads / p.kv_heads : 1;
  return G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8;  // the instantiation's group bound
}

}  // namespace

int DecodeAttentionPagesPerSplit(const DecodeAttentionParams& p) {
  if (p.pages_per_split > 0) return p.pages_per_split;
  // One full wave of resident blocks: a grid a little over one wave runs a second, nearly empty
  // one (measured on the H200: 544 blocks on 528 slots took 1.3x the time of 520 blocks for the
  // same bytes). At least 2 pages a split so that a block's fixed costs (q, final merge,
  // partials) stay small.
  const int gb = GroupBound(p);
  const int rows = std::max(1, p.batch * p.kv_heads);
  const int per_sm = WarpBlocksPerSm(gb);
  const int splits = std::max(1, kSms * per_sm / rows);
  const int pps = std::max(2, (p.max_pages + splits - 1) / splits);
  return std::max(1, std::min(pps, std::max(1, p.max_pages)));
}

size_t DecodeAttentionWorkspaceBytes(const DecodeAttentionParams& p) {
  const int splits = SplitsFor(p, DecodeAttentionPagesPerSplit(p));
  if (splits == 1) return 0;
  return (size_t)p.batch * p.q_heads * splits * (p.head_dim + 2) * sizeof(float);
}

void LaunchDecodeAttention(const DecodeAttentionParams& p, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  Require(p.batch > 0, "decode attention: batch must be > 0");
  Require(p.kv_heads > 0 && p.q_heads > 0 && p.q_heads % p.kv_heads == 0,
          "decode attention: q_heads must be a positive multiple of kv_heads");
  Require(p.page_size > 0 && p.max_pages > 0, "decode attention: page_size and max_pages must be > 0");
  Require(p.q && p.out && p.pools && p.page_slot && p.page_tokens && p.num_pages,
          "decode attention: a device pointer is null");
  const int G = p.q_heads / p.kv_heads;
  const int pps = DecodeAttentionPagesPerSplit(p);
  const int splits = SplitsFor(p, pps);
  const size_t need = DecodeAttentionWorkspaceBytes(p);
  Require(workspace_bytes >= need && (need == 0 || workspace),
          "decode attention: workspace of " + std::to_string(workspace_bytes) + " bytes, need " + std::to_string(need));
  float* ws_o = static_cast<float*>(workspace);
  float* ws_ml = ws_o ? ws_o + (size_t)p.batch * p.q_heads * splits * p.head_dim : nullptr;
  const dim3 grid(splits, p.kv_heads, p.batch);
  const bool ok =
      DispatchAttention(p.head_dim, G, DecodeLaunch{p, grid, pps, splits, ws_o, ws_ml, stream});
  Require(ok, "decode attention: unsupported head_dim " + std::to_string(p.head_dim) + " or group size " +
                  std::to_string(G) + " (head_dim 64/128/256, q_heads/kv_heads <= 8)");
  FKV_CUDA_CHECK_LAUNCH("DecodeAttentionKernel");
  if (splits > 1) {
    DecodeCombineKernel<<<p.batch * p.q_heads, std::min(p.head_dim, 256), 0, stream>>>(p.out, ws_o, ws_ml, splits,
                                                                                       p.head_dim);
    FKV_CUDA_CHECK_LAUNCH("DecodeCombineKernel");
  }
}

}  // namespace freekv::cuda
