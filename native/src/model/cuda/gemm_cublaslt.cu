// cuBLASLt bf16 GEMM opened with dlopen; see gemm_cublaslt.cuh for why and for the layout.
#include <dlfcn.h>
#include <library_types.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "gemm_cublaslt.cuh"

namespace freekv::cuda {
namespace {

// ---- the part of cublasLt.h we use, declared by hand (values from cuBLAS 12/13 headers) ----
using LtStatus = int;  // cublasStatus_t, 0 = CUBLAS_STATUS_SUCCESS
using LtHandle = void*;
using LtMatmulDesc = void*;
using LtLayout = void*;
using LtPref = void*;
struct LtAlgo {
  uint64_t data[8];
};
struct LtHeuristic {
  LtAlgo algo;
  size_t workspaceSize;
  LtStatus state;
  float wavesCount;
  int reserved[4];
};
constexpr int kComputeF32 = 68;             // CUBLAS_COMPUTE_32F
constexpr int kDescTransA = 3;              // CUBLASLT_MATMUL_DESC_TRANSA
constexpr int kDescTransB = 4;              // CUBLASLT_MATMUL_DESC_TRANSB
constexpr int kPrefMaxWorkspace = 1;        // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES
constexpr int kOpN = 0, kOpT = 1;           // CUBLAS_OP_N / CUBLAS_OP_T

struct Api {
  void* lib = nullptr;
  std::string reason;
  LtStatus (*create)(LtHandle*) = nullptr;
  LtStatus (*descCreate)(LtMatmulDesc*, int, cudaDataType_t) = nullptr;
  LtStatus (*descSet)(LtMatmulDesc, int, const void*, size_t) = nullptr;
  LtStatus (*descDestroy)(LtMatmulDesc) = nullptr;
  LtStatus (*layoutCreate)(LtLayout*, cudaDataType_t, uint64_t, uint64_t, int64_t) = nullptr;
  LtStatus (*layoutDestroy)(LtLayout) = nullptr;
  LtStatus (*prefCreate)(LtPref*) = nullptr;
  LtStatus (*prefSet)(LtPref, int, const void*, size_t) = nullptr;
  LtStatus (*prefDestroy)(LtPref) = nullptr;
  LtStatus (*heuristic)(LtHandle, LtMatmulDesc, LtLayout, LtLayout, LtLayout, LtLayout, LtPref, int,
                        LtHeuristic*, int*) = nullptr;
  LtStatus (*matmul)(LtHandle, LtMatmulDesc, const void*, const void*, LtLayout, const void*, LtLayout,
                     const void*, const void*, LtLayout, void*, LtLayout, const LtAlgo*, void*, size_t,
                     cudaStream_t) = nullptr;
  LtHandle handle = nullptr;
};

template <typename F>
bool Resolve(Api& a, F& fn, const char* name) {
  fn = reinterpret_cast<F>(dlsym(a.lib, name));
  if (!fn) a.reason = std::string("cuBLASLt unavailable: symbol ") + name + " not found";
  return fn != nullptr;
}

Api& Lt() {
  static Api api;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* names[] = {"libcublasLt.so.13", "/usr/local/cuda/lib64/libcublasLt.so.13",
                           "/usr/local/cuda/targets/x86_64-linux/lib/libcublasLt.so.13"};
    for (const char* n : names) {
      api.lib = dlopen(n, RTLD_NOW | RTLD_LOCAL);
      if (api.lib) break;
    }
    if (!api.lib) {
      const char* e = dlerror();
      api.reason = std::string("cuBLASLt unavailable: dlopen(libcublasLt.so.13) failed: ") + (e ? e : "?");
      return;
    }
    bool ok = Resolve(api, api.create, "cublasLtCreate") &&
              Resolve(api, api.descCreate, "cublasLtMatmulDescCreate") &&
              Resolve(api, api.descSet, "cublasLtMatmulDescSetAttribute") &&
              Resolve(api, api.descDestroy, "cublasLtMatmulDescDestroy") &&
              Resolve(api, api.layoutCreate, "cublasLtMatrixLayoutCreate") &&
              Resolve(api, api.layoutDestroy, "cublasLtMatrixLayoutDestroy") &&
              Resolve(api, api.prefCreate, "cublasLtMatmulPreferenceCreate") &&
              Resolve(api, api.prefSet, "cublasLtMatmulPreferenceSetAttribute") &&
              Resolve(api, api.prefDestroy, "cublasLtMatmulPreferenceDestroy") &&
              Resolve(api, api.heuristic, "cublasLtMatmulAlgoGetHeuristic") &&
              Resolve(api, api.matmul, "cublasLtMatmul");
    if (!ok) return;
    LtStatus s = api.create(&api.handle);
    if (s != 0) {
      api.reason = "cuBLASLt unavailable: cublasLtCreate returned status " + std::to_string(s);
      api.handle = nullptr;
    }
  });
  return api;
}

void Check(LtStatus s, const char* what) {
  if (s != 0) throw std::runtime_error(std::string("cuBLASLt: ") + what + " failed with status " + std::to_string(s));
}

// One cached plan per (M, N, K, beta != 0): descriptors and the heuristic's algorithm.
struct Plan {
  LtMatmulDesc desc = nullptr;
  LtLayout a = nullptr, b = nullptr, c = nullptr;
  LtAlgo algo{};
  size_t workspace = 0;
};

std::mutex g_mu;
// FREEKV_GEMM_AUTOTUNE=1 starts with autotuning on (SetGemmAutotune changes it): each new shape
// whose rows are a multiple of kTuneMinRows (full prefill chunks, which repeat; a prompt's odd
// last chunk and decode batches keep the heuristic's first choice: tuning costs ~0.1 s a shape,
// and graph capture cannot time) times the heuristic's candidates once.
bool g_autotune = [] {
  const char* e = std::getenv("FREEKV_GEMM_AUTOTUNE");
  return e && *e && std::strcmp(e, "0") != 0;
}();
constexpr int kTuneMinRows = 256;
uint64_t g_plan_epoch = 0;  // bumped whenever the cached plans are dropped (graphs key on it)
std::map<std::tuple<int, int, int, bool, int, int>, Plan> g_plans;
std::map<cudaStream_t, void*> g_workspaces;  // one workspace per stream: concurrent GEMMs never share one

// Times each candidate algorithm on the real operands (scratch output); returns the fastest's
// index, or 0 when timing is impossible (e.g. inside a capture).
int Tune(Api& api, Plan& p, const LtHeuristic* h, int n, const void* x, const void* w, int M, int N, size_t out_bytes,
         void* ws, cudaStream_t stream) {
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  if (n < 2 || cudaStreamIsCapturing(stream, &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone) return 0;
  void* scratch = nullptr;
  cudaEvent_t a = nullptr, b = nullptr;
  int best = 0;
  float best_ms = 1e30f;
  if (cudaMalloc(&scratch, size_t(M) * N * out_bytes) != cudaSuccess) return 0;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const float one = 1.0f, zero = 0.0f;
  for (int i = 0; i < n; ++i) {
    bool ok = true;
    for (int r = 0; r < 2 && ok; ++r)
      ok = api.matmul(api.handle, p.desc, &one, w, p.a, x, p.b, &zero, scratch, p.c, scratch, p.c, &h[i].algo, ws,
                      h[i].workspaceSize, stream) == 0;
    if (!ok) continue;
    cudaEventRecord(a, stream);
    for (int r = 0; r < 5; ++r)
      api.matmul(api.handle, p.desc, &one, w, p.a, x, p.b, &zero, scratch, p.c, scratch, p.c, &h[i].algo, ws,
                 h[i].workspaceSize, stream);
    cudaEventRecord(b, stream);
    float ms = 1e30f;
    if (cudaEventSynchronize(b) == cudaSuccess && cudaEventElapsedTime(&ms, a, b) == cudaSuccess && ms < best_ms) {
      best_ms = ms;
      best = i;
    }
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaFree(scratch);
  cudaGetLastError();
  return best;
}

cudaDataType_t LtType(GemmType t) { return t == GemmType::F32 ? CUDA_R_32F : CUDA_R_16BF; }
size_t TypeBytes(GemmType t) { return t == GemmType::F32 ? 4 : 2; }

Plan& GetPlan(Api& api, int M, int N, int K, bool accumulate, GemmType in, GemmType out, const void* x, const void* w,
              void* ws, cudaStream_t stream) {
  auto key = std::make_tuple(M, N, K, accumulate, static_cast<int>(in), static_cast<int>(out));
  auto it = g_plans.find(key);
  if (it != g_plans.end()) return it->second;
  Plan p;
  // Row-major Y[M][N] = X[M][K] W[N][K]^T is column-major Y^T[N][M] = W^T... i.e.
  // D(N x M, ld N) = op_T(A = W as col-major K x N, ld K) * (B = X as col-major K x M, ld K).
  Check(api.descCreate(&p.desc, kComputeF32, CUDA_R_32F), "MatmulDescCreate");
  int ta = kOpT, tb = kOpN;
  Check(api.descSet(p.desc, kDescTransA, &ta, sizeof ta), "set TRANSA");
  Check(api.descSet(p.desc, kDescTransB, &tb, sizeof tb), "set TRANSB");
  Check(api.layoutCreate(&p.a, LtType(in), K, N, K), "layout A");
  Check(api.layoutCreate(&p.b, LtType(in), K, M, K), "layout B");
  Check(api.layoutCreate(&p.c, LtType(out), N, M, N), "layout C");
  LtPref pref = nullptr;
  Check(api.prefCreate(&pref), "PreferenceCreate");
  size_t ws_max = kCublasLtWorkspaceBytes;
  Check(api.prefSet(pref, kPrefMaxWorkspace, &ws_max, sizeof ws_max), "set max workspace");
  LtHeuristic h[8];
  int n = 0;
  const bool tune = g_autotune && M % kTuneMinRows == 0;
  LtStatus s = api.heuristic(api.handle, p.desc, p.a, p.b, p.c, p.c, pref, tune ? 8 : 1, h, &n);
  api.prefDestroy(pref);
  Check(s, "AlgoGetHeuristic");
  if (n < 1)
    throw std::runtime_error(std::string("cuBLASLt: no algorithm for ") + (in == GemmType::F32 ? "f32" : "bf16") + " GEMM M=" + std::to_string(M) + " N=" +
                             std::to_string(N) + " K=" + std::to_string(K));
  const int pick = tune ? Tune(api, p, h, n, x, w, M, N, TypeBytes(out), ws, stream) : 0;
  p.algo = h[pick].algo;
  p.workspace = h[pick].workspaceSize;
  return g_plans.emplace(key, p).first->second;
}

}  // namespace

uint64_t GemmPlanEpoch() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_plan_epoch;
}

void SetGemmAutotune(bool on) {
  std::lock_guard<std::mutex> lock(g_mu);
  Api& api = Lt();
  if (on == g_autotune) return;
  g_autotune = on;
  ++g_plan_epoch;
  for (auto& kv : g_plans) {
    if (api.layoutDestroy) {
      api.layoutDestroy(kv.second.a);
      api.layoutDestroy(kv.second.b);
      api.layoutDestroy(kv.second.c);
    }
    if (api.descDestroy) api.descDestroy(kv.second.desc);
  }
  g_plans.clear();
}

bool CublasLtAvailable(std::string* reason) {
  Api& api = Lt();
  if (reason) *reason = api.reason;
  return api.handle != nullptr;
}

void Gemm(const void* x, const void* w, void* y, int M, int N, int K, GemmType in, GemmType out,
          cudaStream_t stream, float alpha, float beta) {
  if (M <= 0 || N <= 0 || K <= 0)
    throw std::invalid_argument("Gemm: M, N, K must be positive (got " + std::to_string(M) + ", " +
                                std::to_string(N) + ", " + std::to_string(K) + ")");
  if (in == GemmType::F32 && out != GemmType::F32)
    throw std::invalid_argument("Gemm: f32 operands need an f32 output");
  const int mult = in == GemmType::F32 ? 4 : 8;  // 16-byte rows
  if (K % mult || N % mult)
    throw std::invalid_argument("Gemm: K and N must be multiples of " + std::to_string(mult) + " (got K=" +
                                std::to_string(K) + ", N=" + std::to_string(N) + ")");
  if (!x || !w || !y) throw std::invalid_argument("Gemm: null pointer for x, w or y");
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(y)) & 15)
    throw std::invalid_argument("Gemm: x, w and y must be 16-byte aligned");
  Api& api = Lt();
  if (!api.handle) throw std::runtime_error(api.reason);
  std::lock_guard<std::mutex> lock(g_mu);
  void*& ws = g_workspaces[stream];
  if (!ws) {
    cudaError_t e = cudaMalloc(&ws, kCublasLtWorkspaceBytes);
    if (e != cudaSuccess) {
      ws = nullptr;
      throw std::runtime_error(std::string("Gemm: workspace cudaMalloc failed: ") + cudaGetErrorString(e));
    }
  }
  Plan& p = GetPlan(api, M, N, K, beta != 0.0f, in, out, x, w, ws, stream);
  Check(api.matmul(api.handle, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &p.algo, ws, p.workspace,
                   stream),
        "Matmul");
}

void GemmBf16(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int M, int N, int K,
              cudaStream_t stream, float alpha, float beta) {
  Gemm(x, w, y, M, N, K, GemmType::BF16, GemmType::BF16, stream, alpha, beta);
}

}  // namespace freekv::cuda
