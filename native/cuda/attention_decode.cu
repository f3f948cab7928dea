#include <algorithm>
#include <string>

#include "attention_core.cuh"
#include "attention_decode.cuh"
#include "cuda_check.cuh"

namespace freekv::cuda {
namespace {

// grid (splits, kv_heads, batch). With one split the block writes the normalised output;
// otherwise it writes (m, l, O) partials into the workspace for the combine pass.
template <int D, int MAXG>
__global__ void __launch_bounds__(kAttnThreads) DecodeAttentionKernel(DecodeAttentionParams p, int pps, int splits,
                                                                      float* ws_o, float* ws_ml) {
  __shared__ AttnSmem<D, MAXG> sm;
  __shared__ float s_m[MAXG], s_l[MAXG];
  __shared__ float s_o[MAXG * D];
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int G = p.q_heads / p.kv_heads;
  const int row = b * p.kv_heads + h;
  const int npages = min(p.num_pages[row], p.max_pages);
  const int first = split * pps;
  const int last = min(npages, first + pps);
  const int P = p.page_size;
  const int len = last > first ? (last - first) * P : 0;
  const int* slots = p.page_slot + (size_t)row * p.max_pages;
  const int* toks = p.page_tokens + (size_t)row * p.max_pages;
  const __nv_bfloat16* pool = p.pools[b];
  const size_t kv_stride = (size_t)P * p.kv_heads * D;  // K -> V within a page
  const size_t tok_stride = (size_t)p.kv_heads * D;
  auto token = [&](int i, const __nv_bfloat16*& kp, const __nv_bfloat16*& vp) -> bool {
    const int pg = first + i / P, t = i % P;
    if (t >= toks[pg]) return false;
    kp = pool + (size_t)slots[pg] * 2 * kv_stride + t * tok_stride + (size_t)h * D;
    vp = kp + kv_stride;
    return true;
  };
  const float* q = p.q + ((size_t)b * p.q_heads + (size_t)h * G) * D;
  AttendRange<D, MAXG>(q, G, p.scale, len, token, sm, s_m, s_l, s_o);
  if (splits == 1) {
    float* out = p.out + ((size_t)b * p.q_heads + (size_t)h * G) * D;
    for (int x = threadIdx.x; x < G * D; x += blockDim.x) {
      const float L = s_l[x / D];
      out[x] = L > 0.f ? s_o[x] / L : 0.f;
    }
  } else {
    for (int x = threadIdx.x; x < G * D; x += blockDim.x) {
      const int g = x / D, d = x % D;
      const size_t qh = (size_t)b * p.q_heads + (size_t)h * G + g;
      ws_o[(qh * splits + split) * D + d] = s_o[x];
    }
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
      const size_t qh = (size_t)b * p.q_heads + (size_t)h * G + g;
      ws_ml[(qh * splits + split) * 2] = s_m[g];
      ws_ml[(qh * splits + split) * 2 + 1] = s_l[g];
    }
  }
}

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
    DecodeAttentionKernel<D, MAXG><<<grid, kAttnThreads, 0, stream>>>(p, pps, splits, ws_o, ws_ml);
  }
};

int SplitsFor(const DecodeAttentionParams& p, int pps) { return std::max(1, (p.max_pages + pps - 1) / pps); }

}  // namespace

int DecodeAttentionPagesPerSplit(const DecodeAttentionParams& p) {
  if (p.pages_per_split > 0) return p.pages_per_split;
  // Aim at about 2 blocks per SM of an H200 (132 SMs), at least 4 pages a split so that the
  // combine pass stays cheap.
  const int rows = std::max(1, p.batch * p.kv_heads);
  int splits = std::max(1, (264 + rows - 1) / rows);
  int pps = std::max(4, (p.max_pages + splits - 1) / splits);
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
  const bool ok = DispatchAttention(p.head_dim, G, DecodeLaunch{p, grid, pps, splits, ws_o, ws_ml, stream});
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
