// The CUDA engine itself: device and streams, session lookup, synchronisation and statistics.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "CudaBudget.h"
#include "CudaEngine.h"
#include "cuda/cuda_check.cuh"

namespace freekv::cuda {

using std::to_string;

namespace {
// A stream-ordered pool of device memory on `device` that keeps up to `keep` bytes of freed memory
// (the release threshold) for the next allocations instead of returning it to the driver.
cudaMemPool_t MakeDevicePool(int device, uint64_t keep) {
  cudaMemPoolProps props = {};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  cudaMemPool_t pool = nullptr;
  FKV_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
  const cudaError_t e = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
  if (e != cudaSuccess) {
    cudaMemPoolDestroy(pool);
    FKV_CUDA_CHECK(e);
  }
  return pool;
}
}  // namespace

CudaEngine::CudaEngine(const CudaEngineOptions& options)
    : device_(options.device), graphs_(options.graphs), hier_(options.hierarchical), graph_(options.side_timing) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("no CUDA device: ") + cudaGetErrorString(e));
  }
  if (n == 0) throw std::runtime_error("no CUDA device: none found");
  if (device_ < 0 || device_ >= n)
    throw std::runtime_error("no CUDA device: options.device " + to_string(device_) + " is out of range [0, " +
                             to_string(n) + ")");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  main_ = std::make_unique<Stream>();
  side_ = std::make_unique<Stream>();
  offload_ = std::make_unique<Stream>();
  init_ = std::make_unique<Stream>();
  offload_done_ = std::make_unique<Event>();
  appended_ = std::make_unique<Event>();
  for (auto& e : stage_free_) e = std::make_unique<Event>();
  if (const char* e = std::getenv("FREEKV_PREFILL_OFFLOAD"); e && *e) {
    const std::string v = e;
    if (v != "copy" && v != "kernel")
      throw std::runtime_error("FREEKV_PREFILL_OFFLOAD must be copy or kernel, got '" + v + "'");
    offload_by_copy_ = v == "copy";
  }
  CheckEngineSwitches();
  fold_mean_ = FoldMeanSelection();
  teardown::YieldBudgetMs();  // a malformed FREEKV_TEARDOWN_YIELD_MS is an error here, not a silent 0
  pctx_limit_ = options.prefill_context_bytes;
  if (pctx_limit_ == 0) {
    size_t free_b = 0, total_b = 0;
    FKV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    pctx_limit_ = total_b / 4;
  }
  if (const char* e = std::getenv("FREEKV_PREFILL_CONTEXT_MEMORY"); e && *e && std::string(e) != "malloc") {
    if (std::string(e) != "pool")
      throw std::runtime_error("FREEKV_PREFILL_CONTEXT_MEMORY must be malloc or pool, got '" + std::string(e) + "'");
    pctx_pool_ = MakeDevicePool(device_, pctx_limit_);
  }
  if (const char* e = std::getenv("FREEKV_SESSION_DEVICE_MEMORY"); e && *e && std::string(e) != "malloc") {
    if (std::string(e) != "pool")
      throw std::runtime_error("FREEKV_SESSION_DEVICE_MEMORY must be malloc or pool, got '" + std::string(e) + "'");
    size_t free_b = 0, total_b = 0;
    FKV_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    session_pool_ = MakeDevicePool(device_, total_b / 32);  // closed sessions' arrays kept for the next ones (4.4 GB on an H200)
  }
  outputs_ = std::make_unique<Event>();
  attended_direct_ = std::make_unique<Event>();
}

CudaEngine::~CudaEngine() {
  cudaSetDevice(device_);
  if (main_) cudaStreamSynchronize(main_->get());
  if (side_) cudaStreamSynchronize(side_->get());
  if (offload_) cudaStreamSynchronize(offload_->get());
  sessions_.clear();
  if (pctx_pool_) {
    if (main_) cudaStreamSynchronize(main_->get());  // the contexts' frees, queued there
    cudaMemPoolDestroy(pctx_pool_);
  }
  if (session_pool_) {
    if (init_) cudaStreamSynchronize(init_->get());  // the sessions' frees, queued there
    cudaMemPoolDestroy(session_pool_);
  }
}

Session& CudaEngine::Find(int session) const {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) throw std::invalid_argument("session " + to_string(session) + " is not open");
  return *it->second;
}

void CudaEngine::CheckLayer(const Session& s, int layer) {
  if (layer < 0 || layer >= s.geo.layers)
    throw std::invalid_argument("layer " + to_string(layer) + " is out of range [0, " + to_string(s.geo.layers) +
                                ")");
}

uint64_t CudaEngine::Context(const Session& s) {
  int64_t m = INT64_MAX;
  for (const auto& L : s.layers) m = std::min(m, L->tokens);
  return s.layers.empty() ? 0 : (uint64_t)m;
}

void CudaEngine::SyncStreams() const {
  FKV_CUDA_CHECK(cudaStreamSynchronize(offload_->get()));
  FKV_CUDA_CHECK(cudaStreamSynchronize(side_->get()));
  FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));
}

void CudaEngine::Sync(int session) {
  auto lock = LockOutsideStep("sync");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  FlushPrefill(Find(session));
  SyncStreams();
}

Stats CudaEngine::GetStats(int session) const {
  std::lock_guard<std::mutex> lock(mu_);
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  const Session& s = Find(session);
  SyncStreams();
  const int layers = s.geo.layers;
  std::vector<unsigned long long> c((size_t)layers * kLayerWords);
  FKV_CUDA_CHECK(cudaMemcpy(c.data(), s.counters.get(), c.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  Stats st = s.host_stats;
  for (int l = 0; l < layers; ++l) {
    const unsigned long long* w = c.data() + (size_t)l * kLayerWords;
    LayerStats ls;
    ls.selections = s.layers[l]->selections;
    ls.corrections = w[kCorrections];
    ls.pages_selected = w[kSelected];
    ls.pages_hit = w[kHits];
    ls.pages_recalled = w[kMisses];
    ls.cosine_samples = w[kCosSamples];
    ls.cosine_below_tau = w[kCosBelowTau];
    std::memcpy(&ls.cosine_sum, &w[kCosSum], sizeof(double));
    std::memcpy(&ls.cosine_sum_sq, &w[kCosSumSq], sizeof(double));
    ls.cosine_min = CosineMinOf(w[kCosMin]);
    for (int b = 0; b < kCosineBuckets; ++b) ls.cosine_hist[b] = w[kCosHist + b];
    ls.overlap_pages = w[kOverlapPages];
    ls.overlap_base = w[kOverlapBase];
    st.layers.push_back(ls);
  }
  st.SumLayers(s.Recall().HeadPageBytes());
  st.context_tokens = Context(s);
  uint64_t resident = 0;
  for (const auto& L : s.layers) {
    const Ranges r = RangesFor(s, L->tokens);
    const uint64_t partial = r.partial > 0 ? 1 : 0;
    if (L->keeps_all) {
      resident += (uint64_t)s.geo.kv_heads * (r.full + partial);
    } else {
      resident += (uint64_t)s.geo.kv_heads * (r.sink_end + (r.full - r.window_begin) + partial);
      if (s.Retrieves(*L) && L->selection_valid) resident += (uint64_t)s.geo.kv_heads * std::min(s.K, L->last_candidates);
    }
  }
  st.resident_pages = resident;
  return st;
}

uint64_t CudaEngine::ContextTokens(int session) const {
  std::lock_guard<std::mutex> lock(mu_);
  return Context(Find(session));
}

Geometry CudaEngine::SessionGeometry(int session) const {
  std::lock_guard<std::mutex> lock(mu_);
  return Find(session).geo;
}

std::vector<int> CudaEngine::LastAttendedTokens(int session, int layer, int kv_head) const {
  std::lock_guard<std::mutex> lock(mu_);
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  const Session& s = Find(session);
  CheckLayer(s, layer);
  if (kv_head < 0 || kv_head >= s.geo.kv_heads)
    throw std::invalid_argument("kvHead " + to_string(kv_head) + " is out of range [0, " +
                                to_string(s.geo.kv_heads) + ")");
  const LayerTier& L = *s.layers[layer];
  std::vector<int> out;
  if (!L.attended_valid) return out;
  FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));
  int num = 0;
  std::vector<int> ids(L.table_rows), toks(L.table_rows);
  FKV_CUDA_CHECK(cudaMemcpy(&num, L.t_num.get() + kv_head, sizeof(int), cudaMemcpyDeviceToHost));
  num = std::min(num, L.table_rows);
  if (num > 0) {
    FKV_CUDA_CHECK(cudaMemcpy(ids.data(), L.t_id.get() + (size_t)kv_head * L.table_rows, num * sizeof(int),
                              cudaMemcpyDeviceToHost));
    FKV_CUDA_CHECK(cudaMemcpy(toks.data(), L.t_tokens.get() + (size_t)kv_head * L.table_rows, num * sizeof(int),
                              cudaMemcpyDeviceToHost));
  }
  for (int i = 0; i < num; ++i)
    for (int t = 0; t < toks[i]; ++t) out.push_back(ids[i] * s.P + t);
  std::sort(out.begin(), out.end());
  return out;
}

DeviceStepStats CudaEngine::GetDeviceStepStats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return graph_.counters();
}

}  // namespace freekv::cuda

namespace freekv {

std::unique_ptr<Engine> MakeCudaEngine(const CudaEngineOptions& options) {
  return std::make_unique<cuda::CudaEngine>(options);
}

}  // namespace freekv
