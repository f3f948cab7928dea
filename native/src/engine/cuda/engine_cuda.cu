// The CUDA backend of the FreeKV engine (Engine.h), built from the kernels of this folder.
//
// Device tier of one (session, layer) (see residency.cuh): an NHD pool of sink slots, a window
// ring and the selected slots per KV head (or every page for a dense layer), the summaries of
// every full page, the selection and residency tables, and two query buffers (q_t, q_{t-1}).
// Host tier: the kvstore's shared segments, registered with cudaHostRegister(Mapped), so the
// offload and the gather recall read and write them straight from kernels.
//
// Streams and ordering (why no slot is overwritten while attention may read it):
//   main stream: per Decode(layer): [wait spec_done(layer)] -> inputs H2D -> descriptor table
//     H2D -> append (+ tail write-through) -> summary + offload when a page fills -> blocking
//     selection / correction (+ synchronous recall of the misses) -> attention table -> attention
//     -> outputs D2H. Each step is one launch for the whole batch (DecodeCore).
//   side stream: per Decode(layer), after `attended` (recorded on main right after the
//     attention kernel): speculative selection with q_t for step t+1 -> residency diff ->
//     recall into the selected slots -> record spec_done(layer).
//   * The speculative recall writes slots only after `attended`: the attention of step t that
//     reads them is complete (event order), and no other kernel of step t reads selected slots.
//   * The next Decode of the layer makes the main stream wait spec_done(layer) before anything
//     else, so step t+1's correction, table and attention see the finished recall, and the
//     correction's own recall (main stream) cannot overlap the speculative one. (spec_done is one
//     event per layer index, recorded after the layer's latest speculative work: the side stream
//     runs in order, so it also covers every earlier batch's recall of that layer.)
//   * Sink and window slots are written only by the main stream (append, prefill), which is also
//     the only stream reading them.
//   The whole step has a layer's worth of slack: the recall of layer l overlaps layers l+1.. of
//   step t and layers ..l-1 of step t+1.
//
// Host round trips: in the default (gather) mode, a Decode copies its inputs in and its outputs
// out; correction flags, selections, residency and recall job lists stay on the device, and the
// only host decisions (when a page fills, the candidate ranges) follow from the context length,
// which the host knows; the context-dependent values travel in the descriptor tables (device
// memory, filled from pinned host regions by one copy per layer). So a device step of the GPU
// runner (BeginDeviceStep .. EndDeviceStep) is recorded as an op list and its main-stream part
// replayed as one CUDA graph (step_graph.cuh): per layer the graph waits spec_done(layer) and
// records attended(layer) as external event nodes, and the side stream's speculative work is
// issued directly after the graph launch, so it overlaps as described above. In a graphed step
// the summary and offload lists always hold one item per session (null pages where no page
// fills), so their lengths, part of the graph's key, do not change. The double-buffer recall
// mode needs the job list on the host (one cudaMemcpyAsync per head-page): it synchronises once
// per recall, which is the paper's method and is kept to measure it against the gather; a step
// holding such a session is issued op by op.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "append.cuh"
#include "attention_decode.cuh"
#include "batch_copy.cuh"
#include "attention_prefill.cuh"
#include "correction.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/device_memory.cuh"
#include "engine/Engine.h"
#include "offload.cuh"
#include "recall.cuh"
#include "residency.cuh"
#include "selection.cuh"
#include "cuda/step_graph.cuh"
#include "summary.cuh"

namespace freekv {
namespace cuda {
namespace {

using bf16 = __nv_bfloat16;
using std::to_string;

constexpr int kGatherBlocks = 8;  // SMs the recall uses (8 of 132 reach the PCIe link)

// Counters kept on the device (atomics in the kernels), read by GetStats.
enum DeviceCounter { kSelected = 0, kHits = 1, kMisses = 2, kCorrections = 3, kNumCounters = 4 };

struct LayerTier {
  bool dense = false;
  int64_t tokens = 0;
  int pool_slots = 0;
  DeviceArray<bf16> pool;         // NHD [pool_slots][2][P][Hkv][D]
  DeviceArray<float> summaries;   // [capacity][Hkv][2][D]
  DeviceArray<int> selected;      // [Hkv][K]
  DeviceArray<int> selected_slot; // [Hkv][K]
  DeviceArray<int> resident;      // [Hkv][K]
  DeviceArray<int> flags;         // [Hkv]
  DeviceArray<float> scratch;     // selection scratch
  DeviceArray<RecallJob> jobs;    // [Hkv * K]
  DeviceArray<int> job_count;     // [1 + Hkv]: [0] the per-item path's total, [1 + h] the batched path's per head
  DeviceArray<float> q[2];        // [Hq][D]: q[cur] = latest query
  int qcur = 0;
  bool has_q = false;
  bool first_decode = true;
  bool selection_valid = false;   // `selected` holds a selection for the next attention
  uint32_t record_seq = 0;        // sequence number of the layer's manifest query records
  int last_candidates = 0;
  // The attention table of the latest decode (introspection: LastAttendedTokens).
  int table_rows = 0;
  DeviceArray<int> t_slot, t_tokens, t_id, t_num;
  bool attended_valid = false;
  bool recall_pending = false;    // speculative recall queued (done when the engine's spec_done_[layer] is)
  uint64_t decodes = 0;
};

struct Session {
  Geometry geo;
  RetrievalConfig cfg;
  HostStore host;
  Layout layout;
  int P = 0, SP = 0, WP = 0, K = 0;
  size_t page_elems = 0;  // bf16 elements of one NHD page
  uint8_t* store_dev = nullptr;
  uint8_t* tail_dev = nullptr;
  uint8_t* manifest_dev = nullptr;  // the device's writes of query records (graphed steps)
  bool store_registered = false, tail_registered = false, manifest_registered = false;
  std::vector<std::unique_ptr<LayerTier>> layers;
  DeviceArray<unsigned long long> counters;  // [kNumCounters]
  Stats host_stats;                          // host-known counters
  std::unique_ptr<DoubleBufferRecall> db;
  ~Session() {
    if (store_registered) cudaHostUnregister(host.store);
    if (tail_registered) cudaHostUnregister(host.tail);
    if (manifest_registered) cudaHostUnregister(host.manifest);
  }
  bool Retrieves(const LayerTier& L) const { return !L.dense && cfg.mode != Mode::SinkWindow && K > 0; }
  bool Speculates(const LayerTier& L) const {
    return Retrieves(L) && (cfg.mode == Mode::FreeKV || cfg.mode == Mode::Speculative);
  }
  uint8_t* StoreLayerHost(int l) const { return host.store + layout.layer_stride * l; }
  uint8_t* StoreLayerDev(int l) const { return store_dev + layout.layer_stride * l; }
  uint8_t* TailLayerDev(int l) const { return tail_dev + layout.tail_layer_bytes * l; }
  // Pool slot of page p while it is a sink or window (partial included) page.
  int WorkingSlot(const LayerTier& L, int p) const { return L.dense || p < SP ? p : SP + p % WP; }
  RecallGeometry Recall() const {
    RecallGeometry g;
    g.kv_heads = geo.kv_heads;
    g.head_dim = geo.head_dim;
    g.page_size = P;
    g.src_page_stride = layout.page_bytes;
    return g;
  }
};

// The selection of a layer's candidates [c0, c0 + n) with query q (all heads, or `head_mask`'s).
SelectionParams SelectionFor(const Session& s, const LayerTier& L, const float* q, int c0, int n, const int* head_mask) {
  SelectionParams sp;
  sp.q = q;
  sp.summaries = L.summaries.get();
  sp.first_page = c0;
  sp.num_candidates = n;
  sp.q_heads = s.geo.q_heads;
  sp.kv_heads = s.geo.kv_heads;
  sp.head_dim = s.geo.head_dim;
  sp.k = s.K;
  sp.combine = static_cast<int>(s.cfg.combine);
  sp.head_mask = head_mask;
  sp.scratch = L.scratch.get();
  sp.selected = L.selected.get();
  return sp;
}

// Page ranges of the budget for a layer holding `tokens` tokens (DESIGN.md section 2).
struct Ranges {
  int full, partial, sink_end, window_begin;  // middle (selectable): [sink_end, window_begin)
};
Ranges RangesFor(const Session& s, int64_t tokens) {
  Ranges r;
  r.full = static_cast<int>(tokens / s.P);
  r.partial = static_cast<int>(tokens % s.P);
  r.sink_end = std::min(s.SP, r.full);
  r.window_begin = std::max(r.sink_end, r.full - (s.WP - 1));
  return r;
}

// Registers a shared segment for mapped device access; an already registered range is used as is.
uint8_t* RegisterMapped(uint8_t* p, size_t bytes, bool& registered, const char* what) {
  registered = false;
  if (!p || bytes == 0) return nullptr;
  cudaError_t e = cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (e == cudaErrorHostMemoryAlreadyRegistered) {
    cudaGetLastError();
  } else {
    Check(e, what);
    registered = true;
  }
  void* d = nullptr;
  Check(cudaHostGetDevicePointer(&d, p, 0), what);
  return static_cast<uint8_t*>(d);
}

class CudaEngine final : public Engine {
 public:
  explicit CudaEngine(int device) : device_(device) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("no CUDA device: ") + cudaGetErrorString(e));
    }
    if (n == 0) throw std::runtime_error("no CUDA device: none found");
    if (device < 0 || device >= n)
      throw std::runtime_error("no CUDA device: options.device " + to_string(device) + " is out of range [0, " +
                               to_string(n) + ")");
    FKV_CUDA_CHECK(cudaSetDevice(device_));
    main_ = std::make_unique<Stream>();
    side_ = std::make_unique<Stream>();
    outputs_ = std::make_unique<Event>();
    attended_direct_ = std::make_unique<Event>();
  }

  ~CudaEngine() override {
    cudaSetDevice(device_);
    if (main_) cudaStreamSynchronize(main_->get());
    if (side_) cudaStreamSynchronize(side_->get());
    sessions_.clear();
  }

  std::string backend() const override { return "cuda"; }

  int CreateSession(const Geometry& g, const RetrievalConfig& c, const HostStore& h, bool reattach) override {
    auto lock = LockOutsideStep("createSession");
    FKV_CUDA_CHECK(cudaSetDevice(device_));
    Validate(g, c, h);
    auto s = std::make_unique<Session>();
    s->geo = g;
    s->cfg = c;
    s->host = h;
    s->layout = ComputeLayout(g, c, h.capacity_pages);
    s->P = c.page_size;
    s->SP = c.sink_tokens / c.page_size;
    s->WP = c.window_tokens / c.page_size;
    s->K = c.select_tokens / c.page_size;
    s->page_elems = (size_t)2 * s->P * g.kv_heads * g.head_dim;
    s->store_dev = RegisterMapped(h.store, h.store_bytes, s->store_registered, "cudaHostRegister(host.store)");
    s->tail_dev = RegisterMapped(h.tail, h.tail_bytes, s->tail_registered, "cudaHostRegister(host.tail)");
    s->manifest_dev =
        RegisterMapped(h.manifest, h.manifest_bytes, s->manifest_registered, "cudaHostRegister(host.manifest)");
    // Initial contents are written on the main stream (the legacy default stream does not order
    // against the engine's non-blocking streams), then waited for once.
    cudaStream_t st = main_->get();
    s->counters.Resize(kNumCounters);
    FKV_CUDA_CHECK(cudaMemsetAsync(s->counters.get(), 0, s->counters.bytes(), st));
    const int Hkv = g.kv_heads, D = g.head_dim, cap = h.capacity_pages, K = s->K;
    for (int l = 0; l < g.layers; ++l) {
      auto L = std::make_unique<LayerTier>();
      L->dense = c.mode == Mode::Dense ||
                 std::find(c.dense_layers.begin(), c.dense_layers.end(), l) != c.dense_layers.end();
      L->pool_slots = L->dense ? cap + 1 : s->SP + s->WP + K;
      L->pool.Resize(std::max(1, L->pool_slots) * s->page_elems);
      if (!L->dense) L->summaries.Resize((size_t)cap * Hkv * 2 * D);
      if (s->Retrieves(*L)) {
        L->selected.Resize((size_t)Hkv * K);
        L->selected_slot.Resize((size_t)Hkv * K);
        L->resident.Resize((size_t)Hkv * K);
        FKV_CUDA_CHECK(cudaMemsetAsync(L->resident.get(), 0xff, L->resident.bytes(), st));  // -1: empty
        FKV_CUDA_CHECK(cudaMemsetAsync(L->selected.get(), 0xff, L->selected.bytes(), st));
        FKV_CUDA_CHECK(cudaMemsetAsync(L->selected_slot.get(), 0xff, L->selected_slot.bytes(), st));
        L->flags.Resize(Hkv);
        SelectionParams sp;
        sp.q_heads = g.q_heads;
        sp.kv_heads = Hkv;
        sp.num_candidates = cap;
        L->scratch.Resize(SelectionScratchBytes(sp) / sizeof(float));
        L->jobs.Resize((size_t)Hkv * K);
        L->job_count.Resize(1 + Hkv);
      }
      for (auto& q : L->q) q.Resize((size_t)g.q_heads * D);
      L->table_rows = L->dense ? cap + 1 : s->SP + K + s->WP;
      L->t_slot.Resize((size_t)Hkv * L->table_rows);
      L->t_tokens.Resize((size_t)Hkv * L->table_rows);
      L->t_id.Resize((size_t)Hkv * L->table_rows);
      L->t_num.Resize(Hkv);
      s->layers.push_back(std::move(L));
    }
    if (c.recall == RecallMode::DoubleBuffer)
      s->db = std::make_unique<DoubleBufferRecall>(s->Recall().HeadPageBytes(), DoubleBufferRecall::kMaxChunk);
    FKV_CUDA_CHECK(cudaStreamSynchronize(st));
    if (reattach) {
      Reattach(*s);
    } else {
      // A fresh manifest: header, no pages, no query records (the kvstore only initialised it).
      InitManifest(*s);
    }
    const int id = next_id_++;
    sessions_[id] = std::move(s);
    return id;
  }

  void CloseSession(int session) override {
    auto lock = LockOutsideStep("closeSession");
    FKV_CUDA_CHECK(cudaSetDevice(device_));
    Find(session);
    // Queued work may still use the session's memory and registered segments.
    FKV_CUDA_CHECK(cudaStreamSynchronize(side_->get()));
    FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));
    sessions_.erase(session);
  }

  void Prefill(int session, int layer, const float* k, const float* v, int n) override {
    auto lock = LockOutsideStep("prefill");
    FKV_CUDA_CHECK(cudaSetDevice(device_));
    Session& s = Find(session);
    CheckLayer(s, layer);
    if (n < 1) throw std::invalid_argument("n must be >= 1");
    if (!k || !v) throw std::invalid_argument("k and v must not be null");
    DoPrefill(s, layer, nullptr, k, v, n, nullptr);
    LayerTier& L = *s.layers[layer];
    L.has_q = false;
    L.first_decode = true;
    L.selection_valid = false;
    WriteQueryRecord(s, layer, nullptr);
  }

  void PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n,
                     float* out) override {
    auto lock = LockOutsideStep("prefillAttend");
    FKV_CUDA_CHECK(cudaSetDevice(device_));
    Session& s = Find(session);
    CheckLayer(s, layer);
    if (n < 1) throw std::invalid_argument("n must be >= 1");
    if (!q || !k || !v || !out) throw std::invalid_argument("q, k, v and out must not be null");
    DoPrefill(s, layer, q, k, v, n, out);
    LayerTier& L = *s.layers[layer];
    const size_t qs = (size_t)s.geo.q_heads * s.geo.head_dim;
    FKV_CUDA_CHECK(cudaMemcpy(L.q[L.qcur].get(), q + (size_t)(n - 1) * qs, qs * sizeof(float),
                              cudaMemcpyHostToDevice));
    L.has_q = true;
    L.first_decode = true;
    L.selection_valid = false;
    WriteQueryRecord(s, layer, q + (size_t)(n - 1) * qs);
  }

  void Decode(int layer, const std::vector<DecodeItem>& items) override;
  void BeginDeviceStep(const std::vector<int>& sessions) override;
  void DecodeDevice(int layer, const float* q, const float* k, const float* v, float* out) override;
  void EndDeviceStep() override;
  void* DeviceStream() override;
  StepGraph* DeviceStepGraph() override { return &graph_; }
  DeviceStepStats GetDeviceStepStats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return graph_.counters();
  }

  void Sync(int session) override {
    auto lock = LockOutsideStep("sync");
    FKV_CUDA_CHECK(cudaSetDevice(device_));
    Find(session);
    FKV_CUDA_CHECK(cudaStreamSynchronize(side_->get()));
    FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));
  }

  Stats GetStats(int session) const override {
    std::lock_guard<std::mutex> lock(mu_);
    FKV_CUDA_CHECK(cudaSetDevice(device_));
    const Session& s = Find(session);
    FKV_CUDA_CHECK(cudaStreamSynchronize(side_->get()));
    FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));
    unsigned long long c[kNumCounters];
    FKV_CUDA_CHECK(cudaMemcpy(c, s.counters.get(), sizeof(c), cudaMemcpyDeviceToHost));
    Stats st = s.host_stats;
    st.pages_selected = c[kSelected];
    st.pages_hit = c[kHits];
    st.pages_recalled = c[kMisses];
    st.recall_bytes = c[kMisses] * s.Recall().HeadPageBytes();
    st.corrections = c[kCorrections];
    st.context_tokens = Context(s);
    uint64_t resident = 0;
    for (const auto& L : s.layers) {
      const Ranges r = RangesFor(s, L->tokens);
      const uint64_t partial = r.partial > 0 ? 1 : 0;
      if (L->dense) {
        resident += (uint64_t)s.geo.kv_heads * (r.full + partial);
      } else {
        resident += (uint64_t)s.geo.kv_heads * (r.sink_end + (r.full - r.window_begin) + partial);
        if (s.Retrieves(*L) && L->selection_valid) resident += (uint64_t)s.geo.kv_heads * std::min(s.K, L->last_candidates);
      }
    }
    st.resident_pages = resident;
    return st;
  }

  uint64_t ContextTokens(int session) const override {
    std::lock_guard<std::mutex> lock(mu_);
    return Context(Find(session));
  }

  std::vector<int> LastAttendedTokens(int session, int layer, int kv_head) const override {
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

 private:
  Session& Find(int session) const {
    auto it = sessions_.find(session);
    if (it == sessions_.end()) throw std::invalid_argument("session " + to_string(session) + " is not open");
    return *it->second;
  }
  static void CheckLayer(const Session& s, int layer) {
    if (layer < 0 || layer >= s.geo.layers)
      throw std::invalid_argument("layer " + to_string(layer) + " is out of range [0, " + to_string(s.geo.layers) +
                                  ")");
  }
  static uint64_t Context(const Session& s) {
    int64_t m = INT64_MAX;
    for (const auto& L : s.layers) m = std::min(m, L->tokens);
    return s.layers.empty() ? 0 : (uint64_t)m;
  }

  static void Validate(const Geometry& g, const RetrievalConfig& c, const HostStore& h) {
    if (g.layers < 1) throw std::invalid_argument("geometry.layers must be >= 1");
    if (g.kv_heads < 1 || g.q_heads < 1 || g.q_heads % g.kv_heads != 0)
      throw std::invalid_argument("geometry.qHeads must be a positive multiple of geometry.kvHeads");
    if (g.q_heads / g.kv_heads > 8)
      throw std::invalid_argument("geometry: the CUDA backend supports at most 8 query heads per KV head");
    if (g.head_dim != 64 && g.head_dim != 128 && g.head_dim != 256)
      throw std::invalid_argument("geometry.headDim must be 64, 128 or 256 on the CUDA backend");
    if (g.kv_dtype != DType::BF16)
      throw std::invalid_argument("geometry.kvDtype: the CUDA backend stores K/V in bf16 (KvDType.BF16)");
    if (c.page_size < 1) throw std::invalid_argument("retrieval.pageSize must be >= 1");
    if (c.sink_tokens < 0 || c.sink_tokens % c.page_size)
      throw std::invalid_argument("retrieval.sinkTokens must be a non-negative multiple of retrieval.pageSize");
    if (c.select_tokens < 0 || c.select_tokens % c.page_size)
      throw std::invalid_argument("retrieval.selectTokens must be a non-negative multiple of retrieval.pageSize");
    if (c.window_tokens < c.page_size || c.window_tokens % c.page_size)
      throw std::invalid_argument("retrieval.windowTokens must be a positive multiple of retrieval.pageSize");
    if (c.select_tokens / c.page_size > 1024)
      throw std::invalid_argument("retrieval.selectTokens: at most 1024 selected pages on the CUDA backend");
    if (c.summary != SummaryKind::MaxMin && c.summary != SummaryKind::CuboidMean)
      throw std::invalid_argument("retrieval.summary is unknown");
    if (h.capacity_pages < 1) throw std::invalid_argument("host.capacityPages must be >= 1");
    if (h.capacity_pages > kMaxSelectionCandidates)
      throw std::invalid_argument("host.capacityPages: at most " + to_string(kMaxSelectionCandidates) +
                                  " pages per layer on the CUDA backend");
    for (int l : c.dense_layers)
      if (l < 0 || l >= g.layers) throw std::invalid_argument("retrieval.denseLayers has layer " + to_string(l) + " out of range");
    const Layout lay = ComputeLayout(g, c, h.capacity_pages);
    if (!h.store || h.store_bytes < lay.store_bytes)
      throw std::invalid_argument("host.store is smaller than the layout's storeBytes (" + to_string(lay.store_bytes) + ")");
    if (!h.tail || h.tail_bytes < lay.tail_bytes)
      throw std::invalid_argument("host.tail is smaller than the layout's tailBytes (" + to_string(lay.tail_bytes) + ")");
    if (!h.manifest || h.manifest_bytes < lay.manifest_bytes)
      throw std::invalid_argument("host.manifest is smaller than the layout's manifestBytes (" +
                                  to_string(lay.manifest_bytes) + ")");
  }

  static void InitManifest(Session& s) {
    std::memset(s.host.manifest, 0, s.layout.manifest_bytes);
    auto* hdr = reinterpret_cast<ManifestHeader*>(s.host.manifest);
    hdr->magic = kManifestMagic;
    hdr->layers = (uint32_t)s.geo.layers;
    hdr->context_tokens = 0;
  }
  static uint32_t* LayerWords(const Session& s, int layer) {
    return reinterpret_cast<uint32_t*>(s.host.manifest + sizeof(ManifestHeader)) + 2 * layer;
  }
  static ManifestQueryRecord* QueryRecord(const Session& s, int layer, int r) {
    return reinterpret_cast<ManifestQueryRecord*>(s.host.manifest + s.layout.manifest_query_offset +
                                                  (2 * (size_t)layer + r) * s.layout.manifest_query_record_bytes);
  }
  // The query state a re-attaching process needs (Engine.h, ManifestQueryRecord): written after
  // every call of a layer, alternating between the layer's two records. q: host, [Hq][D] or null.
  static void WriteQueryRecord(Session& s, int layer, const float* q) {
    LayerTier& L = *s.layers[layer];
    const uint32_t seq = ++L.record_seq;
    ManifestQueryRecord* rec = QueryRecord(s, layer, (int)(seq % 2));
    if (q) std::memcpy(rec + 1, q, sizeof(float) * s.geo.q_heads * s.geo.head_dim);
    rec->tokens = (uint64_t)L.tokens;
    rec->seq = seq;
    rec->flags = (L.has_q ? kQueryValid : 0u) | (L.first_decode ? kFirstDecodePending : 0u);
  }
  static const ManifestQueryRecord* FindQueryRecord(const Session& s, int layer, uint64_t tokens) {
    const ManifestQueryRecord* best = nullptr;
    for (int r = 0; r < 2; ++r) {
      const ManifestQueryRecord* rec = QueryRecord(s, layer, r);
      if (rec->flags != 0 && rec->tokens == tokens && (!best || rec->seq > best->seq)) best = rec;
    }
    return best;
  }
  void Reattach(Session& s);
  // Called once the main stream has completed the layer's offloads.
  static void WriteManifest(Session& s, int layer) {
    const LayerTier& L = *s.layers[layer];
    uint32_t* w = reinterpret_cast<uint32_t*>(s.host.manifest + sizeof(ManifestHeader)) + 2 * layer;
    w[0] = (uint32_t)(L.tokens / s.P);
    w[1] = (uint32_t)(L.tokens % s.P);
    reinterpret_cast<ManifestHeader*>(s.host.manifest)->context_tokens = Context(s);
    s.host_stats.context_tokens = Context(s);
  }

  std::vector<Session*> CheckBatch(int layer, const std::vector<int>& ids) const;
  static int BatchRows(const std::vector<Session*>& ss, int layer);
  void SizeBatchBuffers(const Session& s0, int B, int rows);
  void SizeDescTables(int B, int layers, int pinned_regions);
  // `region`: the pinned descriptor region the host writes this layer's table into (a region must
  // not be rewritten before the copy out of it has run: see SizeDescTables).
  void DecodeCore(int layer, const std::vector<Session*>& ss, const float* dq, const float* dk, const float* dv,
                  float* dout, const bf16* const* dpools, int region);
  struct DescTable;
  struct PerItemSelect;
  // Queues a selection (heads_mask or all heads, query q, candidates [c0, c1)) with its residency
  // diff and recall into the batched lists, or, for a double-buffer session, into `per_item`.
  static void QueueSelectAndRecall(Session& s, int layer, const float* q, int c0, int c1, const int* head_mask,
                                   DescTable& t, bool speculative, std::vector<PerItemSelect>& per_item);

  void DoPrefill(Session& s, int layer, const float* q, const float* k, const float* v, int n, float* out);
  // Selection for `heads_mask` (or all heads) with query `q` over [c0, c1), then the residency
  // diff and the recall of the misses, all on `stream`.
  void SelectAndRecall(Session& s, int layer, const float* q, int c0, int c1, const int* head_mask,
                       cudaStream_t stream);

  int device_;
  mutable std::mutex mu_;
  std::map<int, std::unique_ptr<Session>> sessions_;
  int next_id_ = 1;
  std::unique_ptr<Stream> main_, side_;
  std::unique_ptr<Event> outputs_;
  // Recorded on the main stream right after an attention of a direct (not graphed) decode; the
  // side stream's speculative work of that call waits for it.
  std::unique_ptr<Event> attended_direct_;
  // The device step's op list and its cached CUDA graphs (step_graph.cuh).
  StepGraph graph_;
  // Per-call buffers of the main stream (reused; grown on demand after a main-stream sync).
  PinnedBuffer pin_in_, pin_out_, pin_jobs_;
  DeviceArray<uint8_t> dev_in_;
  DeviceArray<float> dev_out_;
  DeviceArray<uint8_t> workspace_;
  DeviceArray<int> batch_table_;
  DeviceArray<bf16> prefill_pages_;
  DeviceArray<float> prefill_f32_;
  DeviceArray<RecallJob> prefill_jobs_;
  DeviceArray<int> prefill_job_count_;
  // The open device step (BeginDeviceStep .. EndDeviceStep): its sessions, the layers queued so
  // far, and its pointer table on the device: the pools of every (layer, item), then the payloads
  // of the manifest query records each layer's queries are scattered into (mapped host memory;
  // the host writes the records' headers after the step's wait).
  bool step_open_ = false;
  std::thread::id step_thread_;
  // Engine calls from other threads wait here while a step is open (LockOutsideStep).
  mutable std::condition_variable step_cv_;
  // Locks the engine outside an open device step: calls from another thread wait for the step to
  // end (their work would otherwise run before the step's queued work, or free memory it uses);
  // from the step's own thread the wait would never end, so that is an error.
  std::unique_lock<std::mutex> LockOutsideStep(const char* what) const {
    std::unique_lock<std::mutex> lock(mu_);
    if (step_open_ && step_thread_ == std::this_thread::get_id())
      throw std::logic_error(std::string(what) + ": a device step is open (BeginDeviceStep without EndDeviceStep)");
    step_cv_.wait(lock, [&] { return !step_open_; });
    return lock;
  }
  std::vector<int> step_sessions_;
  int step_layers_done_ = 0;
  PinnedBuffer step_ptrs_pin_;
  DeviceArray<uint8_t> step_ptrs_;
  // Descriptor tables of the batched launches (DescTable): pinned regions the host fills (one per
  // layer of a device step; region 0 for Decode) and one device region per layer index, each of
  // desc_bytes_ for batches of up to desc_cap_ items.
  int desc_cap_ = 0;
  size_t desc_bytes_ = 0;
  PinnedBuffer desc_pin_;
  DeviceArray<uint8_t> desc_dev_;
  // Per layer index: recorded on the side stream after the layer's latest speculative work. The
  // next decode of the layer waits for it (the recalls, and the side-stream readers of the
  // layer's device descriptor region, are then done).
  std::vector<std::unique_ptr<Event>> spec_done_;
  // Per layer index, graphed steps only: recorded (an external event node) right after the
  // layer's attention; the side stream's speculative work of the layer, issued after the graph
  // launch, waits for it (one per layer: the graph records all of them before that work is
  // issued).
  std::vector<std::unique_ptr<Event>> attended_;
  std::vector<char> spec_recorded_;
};

// The per-layer descriptor table of a batched decode: one array of launch parameters per batched
// operation, each holding the items that need it (so a batch may mix sessions whose pages fill or
// not, first decodes and later ones, and retrieval modes). Laid out for batches of up to B items
// at fixed offsets; the host fills the lists in a pinned region and the whole region goes to the
// layer's device region in one copy.
template <class T>
struct DescList {
  T* host = nullptr;       // pinned
  const T* dev = nullptr;  // the same slots in the device region
  int n = 0, cap = 0;
  void Add(const T& x) {
    if (n >= cap) throw std::logic_error("descriptor table: list overflow");
    host[n++] = x;
  }
};

struct CudaEngine::DescTable {
  DescList<CopyItem> q;
  DescList<AppendParams> append;
  DescList<PageSummaryItem> summary;
  DescList<OffloadItem> offload;
  DescList<CorrectionItem> correction;
  DescList<SelectionParams> select, spec_select;
  DescList<ResidencyParams> residency, spec_residency;
  DescList<RecallBatchItem> recall, spec_recall;
  DescList<AttendTableParams> table;  // two per item: the batch's rows and the layer's own
  size_t bytes = 0;

  // Lays the lists out for B items over host (may be null: sizes only) and dev.
  DescTable(int B, uint8_t* host, uint8_t* dev) {
    auto place = [&](auto& list, int cap) {
      using T = std::remove_reference_t<decltype(*list.host)>;
      list.host = host ? reinterpret_cast<T*>(host + bytes) : nullptr;
      list.dev = dev ? reinterpret_cast<const T*>(dev + bytes) : nullptr;
      list.cap = cap;
      bytes += ((size_t)cap * sizeof(T) + 255) / 256 * 256;
    };
    place(q, B);
    place(append, B);
    place(summary, B);
    place(offload, B);
    place(correction, B);
    place(select, B);
    place(residency, B);
    place(recall, B);
    place(table, 2 * B);
    place(spec_select, B);
    place(spec_residency, B);
    place(spec_recall, B);
  }
};

// A selection + recall of a double-buffer session, issued item by item (SelectAndRecall).
struct CudaEngine::PerItemSelect {
  Session* s;
  const float* q;
  int c0, c1;
  const int* head_mask;
};

void CudaEngine::QueueSelectAndRecall(Session& s, int layer, const float* q, int c0, int c1, const int* head_mask,
                                      DescTable& t, bool speculative, std::vector<PerItemSelect>& per_item) {
  LayerTier& L = *s.layers[layer];
  const int num_candidates = std::max(0, c1 - c0);
  L.last_candidates = num_candidates;
  L.selection_valid = true;
  if (s.cfg.recall != RecallMode::Gather) {
    per_item.push_back(PerItemSelect{&s, q, c0, c1, head_mask});
    return;
  }
  (speculative ? t.spec_select : t.select).Add(SelectionFor(s, L, q, c0, num_candidates, head_mask));
  ResidencyParams rp;
  rp.selected = L.selected.get();
  rp.resident = L.resident.get();
  rp.selected_slot = L.selected_slot.get();
  rp.jobs = L.jobs.get();
  rp.job_count = L.job_count.get() + 1;  // per head (LaunchResidencyDiffBatch)
  rp.kv_heads = s.geo.kv_heads;
  rp.k = s.K;
  rp.selected_base = s.SP + s.WP;
  rp.head_mask = head_mask;
  rp.counters = s.counters.get();
  (speculative ? t.spec_residency : t.residency).Add(rp);
  RecallBatchItem ri;
  ri.src = s.StoreLayerDev(layer);
  ri.src_page_stride = s.Recall().src_page_stride;
  ri.jobs = L.jobs.get();
  ri.head_counts = L.job_count.get() + 1;
  ri.pool = L.pool.get();
  ri.k = s.K;
  ri.pad = 0;
  (speculative ? t.spec_recall : t.recall).Add(ri);
}

void CudaEngine::SelectAndRecall(Session& s, int layer, const float* q, int c0, int c1, const int* head_mask,
                                 cudaStream_t stream) {
  LayerTier& L = *s.layers[layer];
  const SelectionParams sp = SelectionFor(s, L, q, c0, std::max(0, c1 - c0), head_mask);
  LaunchSelection(sp, stream);
  L.last_candidates = sp.num_candidates;
  ResidencyParams rp;
  rp.selected = L.selected.get();
  rp.resident = L.resident.get();
  rp.selected_slot = L.selected_slot.get();
  rp.jobs = L.jobs.get();
  rp.job_count = L.job_count.get();
  rp.kv_heads = s.geo.kv_heads;
  rp.k = s.K;
  rp.selected_base = s.SP + s.WP;
  rp.head_mask = head_mask;
  rp.counters = s.counters.get();
  LaunchResidencyDiff(rp, stream);
  const RecallGeometry rg = s.Recall();
  if (s.cfg.recall == RecallMode::Gather) {
    LaunchRecallGather(s.StoreLayerDev(layer), rg, L.jobs.get(), L.job_count.get(), s.geo.kv_heads * s.K,
                       L.pool.get(), kGatherBlocks, stream);
  } else {
    // The paper's method: the job list comes to the host, one copy call per head-page.
    const int max_jobs = s.geo.kv_heads * s.K;
    pin_jobs_.Resize(16 + max_jobs * sizeof(RecallJob));
    int* count = reinterpret_cast<int*>(pin_jobs_.get());
    RecallJob* jobs = reinterpret_cast<RecallJob*>(pin_jobs_.get() + 16);
    FKV_CUDA_CHECK(cudaMemcpyAsync(count, L.job_count.get(), sizeof(int), cudaMemcpyDeviceToHost, stream));
    FKV_CUDA_CHECK(cudaMemcpyAsync(jobs, L.jobs.get(), max_jobs * sizeof(RecallJob), cudaMemcpyDeviceToHost, stream));
    FKV_CUDA_CHECK(cudaStreamSynchronize(stream));
    s.db->Run(s.StoreLayerHost(layer), rg, jobs, std::min(*count, max_jobs), L.pool.get(), stream);
  }
  L.selection_valid = true;
}

// Rebuilds the device tier from the host store: every layer continues from the context all
// layers completed (a process that died inside a step left some layers one call ahead). Full
// pages come back HND -> NHD (gather), are summarised, and the sink and window pages are placed
// in their slots; the partial page comes from the tail (or from the store when the layer had
// already committed it); the query records restore q_{t-1} and the first-decode flag; and the
// speculative selection + recall the previous process had in flight is done again.
void CudaEngine::Reattach(Session& s) {
  const auto* hdr = reinterpret_cast<const ManifestHeader*>(s.host.manifest);
  if (hdr->magic != kManifestMagic)
    throw std::invalid_argument("host.manifest does not hold a FreeKV manifest (bad magic): nothing to re-attach");
  if (hdr->layers != (uint32_t)s.geo.layers)
    throw std::invalid_argument("host.manifest has " + to_string(hdr->layers) + " layers, geometry.layers is " +
                                to_string(s.geo.layers));
  const int P = s.P, Hkv = s.geo.kv_heads, D = s.geo.head_dim;
  int64_t ctx = INT64_MAX;
  for (int l = 0; l < s.geo.layers; ++l) {
    const uint32_t* w = LayerWords(s, l);
    if (w[0] > (uint32_t)s.host.capacity_pages || w[1] >= (uint32_t)P)
      throw std::invalid_argument("host.manifest layer " + to_string(l) + " is inconsistent with the layout");
    ctx = std::min<int64_t>(ctx, (int64_t)w[0] * P + w[1]);
  }
  cudaStream_t st = main_->get();
  const Ranges r = RangesFor(s, ctx);
  const size_t kvrow = (size_t)Hkv * D;
  for (int l = 0; l < s.geo.layers; ++l) {
    LayerTier& L = *s.layers[l];
    const uint32_t committed = LayerWords(s, l)[0];
    FKV_CUDA_CHECK(cudaStreamSynchronize(st));
    prefill_pages_.Resize((size_t)(r.full + 1) * s.page_elems);
    bf16* pages = prefill_pages_.get();
    if (r.full > 0) {
      const int njobs = r.full * Hkv;
      pin_jobs_.Resize(sizeof(RecallJob) * njobs + 16);
      int* count = reinterpret_cast<int*>(pin_jobs_.get());
      RecallJob* jobs = reinterpret_cast<RecallJob*>(pin_jobs_.get() + 16);
      *count = njobs;
      for (int p = 0, j = 0; p < r.full; ++p)
        for (int h = 0; h < Hkv; ++h, ++j) jobs[j] = RecallJob{p, h, p, 0};
      prefill_jobs_.Resize(njobs);
      prefill_job_count_.Resize(1);
      FKV_CUDA_CHECK(cudaMemcpyAsync(prefill_jobs_.get(), jobs, sizeof(RecallJob) * njobs, cudaMemcpyHostToDevice, st));
      FKV_CUDA_CHECK(cudaMemcpyAsync(prefill_job_count_.get(), count, sizeof(int), cudaMemcpyHostToDevice, st));
      LaunchRecallGather(s.StoreLayerDev(l), s.Recall(), prefill_jobs_.get(), prefill_job_count_.get(), njobs, pages,
                         32, st);
      if (!L.dense)
        LaunchPageSummary(pages, r.full, L.summaries.get(), Hkv, D, P, static_cast<int>(s.cfg.summary), st);
    }
    if (r.partial > 0) {
      // The partial page's rows as fp32 (exact: they are bf16), re-appended with write-through.
      std::vector<float> k((size_t)r.partial * kvrow), v((size_t)r.partial * kvrow);
      auto bf = [](const uint8_t* p) {
        uint16_t h;
        std::memcpy(&h, p, 2);
        uint32_t u = (uint32_t)h << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
      };
      const size_t e = 2;
      if (committed > (uint32_t)r.full) {
        const uint8_t* hp = s.StoreLayerHost(l) + (size_t)r.full * s.layout.page_bytes;  // HND [Hkv][2][P][D]
        for (int i = 0; i < r.partial; ++i)
          for (int h = 0; h < Hkv; ++h)
            for (int d = 0; d < D; ++d) {
              const size_t base = (size_t)h * s.layout.head_page_bytes;
              k[i * kvrow + h * D + d] = bf(hp + base + ((size_t)i * D + d) * e);
              v[i * kvrow + h * D + d] = bf(hp + base + ((size_t)(P + i) * D + d) * e);
            }
      } else {
        const uint8_t* tl = s.host.tail + s.layout.tail_layer_bytes * l;  // [P][2][Hkv][D]
        for (int i = 0; i < r.partial; ++i)
          for (size_t x = 0; x < kvrow; ++x) {
            k[i * kvrow + x] = bf(tl + (((size_t)i * 2) * kvrow + x) * e);
            v[i * kvrow + x] = bf(tl + (((size_t)i * 2 + 1) * kvrow + x) * e);
          }
      }
      prefill_f32_.Resize(2 * k.size());
      FKV_CUDA_CHECK(cudaMemcpyAsync(prefill_f32_.get(), k.data(), k.size() * sizeof(float), cudaMemcpyHostToDevice, st));
      FKV_CUDA_CHECK(cudaMemcpyAsync(prefill_f32_.get() + k.size(), v.data(), v.size() * sizeof(float),
                                     cudaMemcpyHostToDevice, st));
      AppendParams ap;
      ap.k = prefill_f32_.get();
      ap.v = prefill_f32_.get() + k.size();
      ap.n = r.partial;
      ap.pages = pages + (size_t)r.full * s.page_elems;
      ap.offset = 0;
      ap.kv_heads = Hkv;
      ap.head_dim = D;
      ap.page_size = P;
      ap.tail = s.TailLayerDev(l);
      ap.tail_from = 0;
      LaunchAppend(ap, st);
      FKV_CUDA_CHECK(cudaStreamSynchronize(st));  // k, v are pageable host vectors
    }
    const int last = r.partial > 0 ? r.full : r.full - 1;
    for (int p = 0; p <= last; ++p) {
      if (!(L.dense || p < s.SP || p >= r.window_begin)) continue;
      FKV_CUDA_CHECK(cudaMemcpyAsync(L.pool.get() + (size_t)s.WorkingSlot(L, p) * s.page_elems,
                                     pages + (size_t)p * s.page_elems, s.page_elems * sizeof(bf16),
                                     cudaMemcpyDeviceToDevice, st));
    }
    L.tokens = ctx;
    LayerWords(s, l)[0] = (uint32_t)r.full;
    LayerWords(s, l)[1] = (uint32_t)r.partial;
    const ManifestQueryRecord* rec = FindQueryRecord(s, l, (uint64_t)ctx);
    if (rec) {
      L.has_q = (rec->flags & kQueryValid) != 0;
      L.first_decode = (rec->flags & kFirstDecodePending) != 0;
      if (L.has_q)
        FKV_CUDA_CHECK(cudaMemcpyAsync(L.q[L.qcur].get(), rec + 1, sizeof(float) * s.geo.q_heads * D,
                                       cudaMemcpyHostToDevice, st));
      L.record_seq = rec->seq;
    } else {
      L.has_q = false;
      L.first_decode = true;
      L.record_seq = std::max(QueryRecord(s, l, 0)->seq, QueryRecord(s, l, 1)->seq);
    }
    FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  }
  reinterpret_cast<ManifestHeader*>(s.host.manifest)->context_tokens = (uint64_t)ctx;
  s.host_stats.context_tokens = (uint64_t)ctx;
  // The speculative recall the previous process had in flight for each layer, done again now.
  for (int l = 0; l < s.geo.layers; ++l) {
    LayerTier& L = *s.layers[l];
    if (!(s.Speculates(L) && !L.first_decode && L.has_q)) continue;
    const Ranges now = RangesFor(s, L.tokens), next = RangesFor(s, L.tokens + 1);
    SelectAndRecall(s, l, L.q[L.qcur].get(), next.sink_end, std::min(next.window_begin, now.full), nullptr, st);
  }
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
}

void CudaEngine::DoPrefill(Session& s, int layer, const float* q, const float* k, const float* v, int n,
                           float* out) {
  LayerTier& L = *s.layers[layer];
  const int P = s.P, Hkv = s.geo.kv_heads, D = s.geo.head_dim, Hq = s.geo.q_heads;
  if ((L.tokens + n) / P > s.host.capacity_pages)
    throw std::invalid_argument("prefill of " + to_string(n) + " tokens would exceed the store's capacity of " +
                                to_string(s.host.capacity_pages) + " pages");
  cudaStream_t st = main_->get();
  if (L.recall_pending) FKV_CUDA_CHECK(cudaStreamWaitEvent(st, spec_done_[layer]->get(), 0));
  L.recall_pending = false;
  const int64_t c = L.tokens;
  const int first = (int)(c / P), last = (int)((c + n - 1) / P);
  const int base = q ? 0 : first;  // PrefillAttend needs every page of the context
  const int npg = last - base + 1;
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));  // the scratch below may be in use by queued work
  prefill_pages_.Resize((size_t)npg * s.page_elems);
  const size_t kvn = (size_t)n * Hkv * D;
  const size_t qn = q ? (size_t)n * Hq * D : 0;
  prefill_f32_.Resize(2 * kvn + 2 * qn);
  float* dk = prefill_f32_.get();
  float* dv = dk + kvn;
  float* dq = dv + kvn;
  float* dout = dq + qn;
  FKV_CUDA_CHECK(cudaMemcpyAsync(dk, k, kvn * sizeof(float), cudaMemcpyHostToDevice, st));
  FKV_CUDA_CHECK(cudaMemcpyAsync(dv, v, kvn * sizeof(float), cudaMemcpyHostToDevice, st));
  if (q) FKV_CUDA_CHECK(cudaMemcpyAsync(dq, q, qn * sizeof(float), cudaMemcpyHostToDevice, st));
  bf16* pages = prefill_pages_.get();
  bf16* newp = pages + (size_t)(first - base) * s.page_elems;
  // The partial page so far, from its slot.
  if (c % P)
    FKV_CUDA_CHECK(cudaMemcpyAsync(newp, L.pool.get() + (size_t)s.WorkingSlot(L, first) * s.page_elems,
                                   s.page_elems * sizeof(bf16), cudaMemcpyDeviceToDevice, st));
  AppendParams ap;
  ap.k = dk;
  ap.v = dv;
  ap.n = n;
  ap.pages = newp;
  ap.offset = (int)(c % P);
  ap.kv_heads = Hkv;
  ap.head_dim = D;
  ap.page_size = P;
  ap.tail = s.TailLayerDev(layer);
  ap.tail_from = (int)std::max<int64_t>(0, (int64_t)last * P - c);
  LaunchAppend(ap, st);
  const int64_t t_new = c + n;
  const int nfull = (int)(t_new / P) - first;  // pages of this run that are now full
  if (nfull > 0) {
    if (!L.dense)
      LaunchPageSummary(newp, nfull, L.summaries.get() + (size_t)first * Hkv * 2 * D, Hkv, D, P,
                        static_cast<int>(s.cfg.summary), st);
    LaunchOffloadHnd(newp, nfull, s.StoreLayerDev(layer) + (size_t)first * s.layout.page_bytes, s.layout.page_bytes,
                     Hkv, D, P, st);
    s.host_stats.pages_offloaded += nfull;
    s.host_stats.offload_bytes += (uint64_t)nfull * s.layout.page_bytes;
  }
  // Place the run's pages in their working slots (every page of a dense layer; sink pages; the
  // window pages of the new context).
  const Ranges r = RangesFor(s, t_new);
  for (int p = first; p <= last; ++p) {
    const bool keep = L.dense || p < s.SP || p >= r.window_begin;
    if (!keep) continue;
    FKV_CUDA_CHECK(cudaMemcpyAsync(L.pool.get() + (size_t)s.WorkingSlot(L, p) * s.page_elems,
                                   newp + (size_t)(p - first) * s.page_elems, s.page_elems * sizeof(bf16),
                                   cudaMemcpyDeviceToDevice, st));
  }
  if (q) {
    // Earlier full pages come back from the host store (HND -> NHD) into the contiguous run.
    if (first > 0) {
      const int njobs = first * Hkv;
      pin_jobs_.Resize(sizeof(RecallJob) * njobs + 16);
      RecallJob* jobs = reinterpret_cast<RecallJob*>(pin_jobs_.get() + 16);
      int* count = reinterpret_cast<int*>(pin_jobs_.get());
      *count = njobs;
      for (int p = 0, j = 0; p < first; ++p)
        for (int h = 0; h < Hkv; ++h, ++j) jobs[j] = RecallJob{p, h, p, 0};
      prefill_jobs_.Resize(njobs);
      prefill_job_count_.Resize(1);
      FKV_CUDA_CHECK(cudaMemcpyAsync(prefill_jobs_.get(), jobs, sizeof(RecallJob) * njobs, cudaMemcpyHostToDevice, st));
      FKV_CUDA_CHECK(cudaMemcpyAsync(prefill_job_count_.get(), count, sizeof(int), cudaMemcpyHostToDevice, st));
      LaunchRecallGather(s.StoreLayerDev(layer), s.Recall(), prefill_jobs_.get(), prefill_job_count_.get(), njobs,
                         pages, 32, st);
    }
    PrefillAttentionParams pp;
    pp.q = dq;
    pp.out = dout;
    pp.pages = pages;
    pp.n = n;
    pp.start = (int)c;
    pp.q_heads = Hq;
    pp.kv_heads = Hkv;
    pp.head_dim = D;
    pp.page_size = P;
    pp.scale = 1.f / std::sqrt((float)D);
    FKV_CUDA_CHECK(cudaMemsetAsync(dout, 0xff, qn * sizeof(float), st));  // poison: NaN
    LaunchPrefillAttention(pp, st);
    FKV_CUDA_CHECK(cudaMemcpyAsync(out, dout, qn * sizeof(float), cudaMemcpyDeviceToHost, st));
  }
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  L.tokens = t_new;
  L.attended_valid = false;
  WriteManifest(s, layer);
}

std::vector<Session*> CudaEngine::CheckBatch(int layer, const std::vector<int>& ids) const {
  const int B = static_cast<int>(ids.size());
  std::vector<Session*> ss(B);
  for (int i = 0; i < B; ++i) {
    const std::string at = "items[" + to_string(i) + "]";
    ss[i] = &Find(ids[i]);
    CheckLayer(*ss[i], layer);
    for (int j = 0; j < i; ++j)
      if (ids[j] == ids[i])
        throw std::invalid_argument(at + ": session " + to_string(ids[i]) + " appears twice in the batch");
    const Geometry& g0 = ss[0]->geo;
    const Geometry& g = ss[i]->geo;
    if (g.q_heads != g0.q_heads || g.kv_heads != g0.kv_heads || g.head_dim != g0.head_dim ||
        ss[i]->P != ss[0]->P)
      throw std::invalid_argument(at + ": session " + to_string(ids[i]) +
                                  " has a geometry different from the batch's first session");
    if ((ss[i]->layers[layer]->tokens + 1) / ss[i]->P > ss[i]->host.capacity_pages)
      throw std::invalid_argument(at + ": session " + to_string(ids[i]) + " is at the store's capacity of " +
                                  to_string(ss[i]->host.capacity_pages) + " pages");
  }
  return ss;
}

int CudaEngine::BatchRows(const std::vector<Session*>& ss, int layer) {
  int rows = 1;
  for (Session* s : ss) rows = std::max(rows, s->layers[layer]->table_rows);
  return rows;
}

// Sizes the batch table and the attention workspace for `rows` (grown only after a main-stream
// sync: callers call this before queueing work that uses them).
void CudaEngine::SizeBatchBuffers(const Session& s0, int B, int rows) {
  const int Hkv = s0.geo.kv_heads;
  batch_table_.Resize((size_t)3 * B * Hkv * rows + (size_t)B * Hkv);
  DecodeAttentionParams dp;
  dp.batch = B;
  dp.q_heads = s0.geo.q_heads;
  dp.kv_heads = Hkv;
  dp.head_dim = s0.geo.head_dim;
  dp.page_size = s0.P;
  dp.max_pages = rows;
  workspace_.Resize(DecodeAttentionWorkspaceBytes(dp));
}

// Sizes the descriptor tables for batches of up to B items: `pinned_regions` host regions and a
// device region for every layer index below `layers`. A pinned region is reused only after the
// main stream has run the copy out of it (Decode synchronises first and uses region 0; a device
// step has a region per layer and synchronises at its next BeginDeviceStep). A device region is
// rewritten only after the side-stream work that reads it (DecodeCore waits spec_done_[layer]).
// Growing reallocates, so both streams are drained first.
void CudaEngine::SizeDescTables(int B, int layers, int pinned_regions) {
  if (B > desc_cap_ || (size_t)layers * desc_bytes_ > desc_dev_.size()) {
    FKV_CUDA_CHECK(cudaStreamSynchronize(side_->get()));
    FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));
    desc_cap_ = std::max(desc_cap_, B);
    desc_bytes_ = DescTable(desc_cap_, nullptr, nullptr).bytes;
    desc_dev_.Resize((size_t)layers * desc_bytes_);
  }
  desc_pin_.Resize((size_t)pinned_regions * desc_bytes_);
  if ((int)spec_done_.size() < layers) {
    while ((int)spec_done_.size() < layers) spec_done_.push_back(std::make_unique<Event>());
    while ((int)attended_.size() < layers) attended_.push_back(std::make_unique<Event>());
    spec_recorded_.resize(layers, 0);
  }
}

// The device work of one layer's decode for a batch whose inputs are on the device:
//   dq [B][Hq*D], dk, dv [B][Hkv*D] fp32; dpools [B] device array of the items' pools;
//   dout [B][Hq*D] fp32 (written by the attention).
// Queued on the main stream (and the speculative part on the side stream) without waiting; the
// host-side state of each layer (tokens, query slot, flags) advances here. Manifests are not
// written: the caller does that once the main stream has completed the work.
// Every operation is one launch for the whole batch (items listed in the layer's DescTable), in
// this order on the main stream: table copy, query copy, append, summary, offload, correction,
// selection, residency diff, recall, attention tables, attention; then on the side stream the
// speculative selection, residency diff and recall. Items are independent (each has its own pool,
// tables, scratch and counters), so grouping by operation changes no result. Double-buffer sessions
// still select and recall item by item (their job lists go through the host).
void CudaEngine::DecodeCore(int layer, const std::vector<Session*>& ss, const float* dq, const float* dk,
                            const float* dv, float* dout, const bf16* const* dpools, int region) {
  const int B = static_cast<int>(ss.size());
  const Geometry& g = ss[0]->geo;
  const int Hq = g.q_heads, Hkv = g.kv_heads, D = g.head_dim, P = ss[0]->P;
  const size_t qs = (size_t)Hq * D, ks = (size_t)Hkv * D;
  cudaStream_t st = main_->get(), side = side_->get();
  const int rows = BatchRows(ss, layer);
  SizeBatchBuffers(*ss[0], B, rows);  // no-op when already large enough (see callers)
  if (B > desc_cap_ || (int)spec_done_.size() <= layer || (size_t)(layer + 1) * desc_bytes_ > desc_dev_.size())
    throw std::logic_error("decode: descriptor tables not sized for this batch");

  // 1. The layer's speculative work queued last (the batch's recalls from the previous step among
  // it) completes first; that also frees the layer's device descriptor region. (In a graphed
  // step this is an external event wait node: the side-stream work is outside the graph.)
  const bool graphed = graph_.deferred();
  if (spec_recorded_[layer]) {
    // Still running now? (For a graphed step: before the step is issued; the graph waits for it.)
    const bool busy = cudaEventQuery(spec_done_[layer]->get()) == cudaErrorNotReady;
    cudaGetLastError();
    for (int i = 0; i < B; ++i) {
      LayerTier& L = *ss[i]->layers[layer];
      if (!L.recall_pending) continue;
      if (busy) ss[i]->host_stats.recall_waits += 1;
      L.recall_pending = false;
    }
    graph_.Op(st, graphed ? WaitExternalOp : WaitOp, spec_done_[layer]->get());
  }

  uint8_t* host_region = desc_pin_.get() + (size_t)region * desc_bytes_;
  uint8_t* dev_region = desc_dev_.get() + (size_t)layer * desc_bytes_;
  DescTable t(B, host_region, dev_region);
  std::vector<PerItemSelect> per_item, per_item_spec;

  int* tb_slot = batch_table_.get();
  int* tb_tokens = tb_slot + (size_t)B * Hkv * rows;
  int* tb_id = tb_tokens + (size_t)B * Hkv * rows;
  int* tb_num = tb_id + (size_t)B * Hkv * rows;

  // 2. The host decides, item by item, what each needs (all from the context length and flags).
  for (int i = 0; i < B; ++i) {
    Session& s = *ss[i];
    LayerTier& L = *s.layers[layer];
    const int qnew = 1 - L.qcur;
    t.q.Add(CopyItem{dq + i * qs, L.q[qnew].get()});
    // Append (with write-through of the tail); summary + offload when the page fills.
    const int64_t c = L.tokens;
    const int page = (int)(c / P), row = (int)(c % P);
    bf16* slot = L.pool.get() + (size_t)s.WorkingSlot(L, page) * s.page_elems;
    AppendParams ap;
    ap.k = dk + i * ks;
    ap.v = dv + i * ks;
    ap.n = 1;
    ap.pages = slot;
    ap.offset = row;
    ap.kv_heads = Hkv;
    ap.head_dim = D;
    ap.page_size = P;
    ap.tail = s.TailLayerDev(layer);
    ap.tail_from = 0;
    t.append.Add(ap);
    if (row == P - 1) {
      if (!L.dense)
        t.summary.Add(PageSummaryItem{slot, L.summaries.get() + (size_t)page * Hkv * 2 * D,
                                      static_cast<int>(s.cfg.summary), 0});
      t.offload.Add(OffloadItem{slot, s.StoreLayerDev(layer) + (size_t)page * s.layout.page_bytes});
      s.host_stats.pages_offloaded += 1;
      s.host_stats.offload_bytes += s.layout.page_bytes;
    } else if (graphed) {
      // Items without a page keep the lists' lengths (part of the graph's key) the same on every step.
      if (!L.dense) t.summary.Add(PageSummaryItem{nullptr, nullptr, 0, 0});
      t.offload.Add(OffloadItem{nullptr, nullptr});
    }
    const int64_t t_new = c + 1;
    const Ranges r = RangesFor(s, t_new);
    // Blocking selections: the first decode after a prefill, oracle, and corrections.
    if (s.Retrieves(L)) {
      s.host_stats.selections += Hkv;
      if (s.cfg.mode == Mode::Oracle) {
        QueueSelectAndRecall(s, layer, L.q[qnew].get(), r.sink_end, r.window_begin, nullptr, t, false, per_item);
      } else if (L.first_decode || !L.selection_valid) {
        QueueSelectAndRecall(s, layer, L.has_q ? L.q[L.qcur].get() : L.q[qnew].get(), r.sink_end, r.window_begin,
                             nullptr, t, false, per_item);
      } else if (s.cfg.mode == Mode::FreeKV) {
        t.correction.Add(CorrectionItem{L.q[qnew].get(), L.q[L.qcur].get(), L.flags.get(),
                                        s.counters.get() + kCorrections, s.cfg.tau, 0});
        QueueSelectAndRecall(s, layer, L.q[qnew].get(), r.sink_end, r.window_begin, L.flags.get(), t, false,
                             per_item);
      }
    }
    // The attention table: into the batch's rows and the layer's own (introspection).
    AttendTableParams tp;
    tp.context = (int)t_new;
    tp.page_size = P;
    tp.sink_pages = s.SP;
    tp.window_pages = s.WP;
    tp.kv_heads = Hkv;
    tp.dense = L.dense;
    tp.window_base = s.SP;
    tp.selected_base = s.SP + s.WP;
    const bool sel = s.Retrieves(L) && L.selection_valid;
    tp.k = sel ? s.K : 0;
    tp.selected = sel ? L.selected.get() : nullptr;
    tp.selected_slot = sel ? L.selected_slot.get() : nullptr;
    tp.max_pages = rows;
    tp.page_slot = tb_slot + (size_t)i * Hkv * rows;
    tp.page_tokens = tb_tokens + (size_t)i * Hkv * rows;
    tp.page_id = tb_id + (size_t)i * Hkv * rows;
    tp.num_pages = tb_num + (size_t)i * Hkv;
    t.table.Add(tp);
    tp.max_pages = L.table_rows;
    tp.page_slot = L.t_slot.get();
    tp.page_tokens = L.t_tokens.get();
    tp.page_id = L.t_id.get();
    tp.num_pages = L.t_num.get();
    t.table.Add(tp);
  }
  // Speculative selection + recall for step t+1 (queued on the side stream below).
  bool speculate = false;
  for (int i = 0; i < B; ++i) {
    Session& s = *ss[i];
    LayerTier& L = *s.layers[layer];
    if (!s.Speculates(L)) continue;
    const Ranges now = RangesFor(s, L.tokens + 1), next = RangesFor(s, L.tokens + 2);
    QueueSelectAndRecall(s, layer, L.q[1 - L.qcur].get(), next.sink_end, std::min(next.window_begin, now.full),
                         nullptr, t, true, per_item_spec);
    L.recall_pending = true;
    speculate = true;
  }

  // 3. The table in one copy, then one launch per operation (through the step's op list: issued
  // now, or at the end of a graphed step).
  StepGraph& G = graph_;
  G.Op(st, MemcpyOp, static_cast<void*>(dev_region), static_cast<const void*>(host_region), t.bytes,
       cudaMemcpyHostToDevice);
  G.Op(st, LaunchCopyBatch, t.q.dev, t.q.n, (int)qs);
  G.Op(st, LaunchAppendBatch, t.append.dev, t.append.n, 1, Hkv, D);
  G.Op(st, LaunchPageSummaryBatch, t.summary.dev, t.summary.n, Hkv, D, P);
  G.Op(st, LaunchOffloadHndBatch, t.offload.dev, t.offload.n, Hkv, D, P);
  G.Op(st, LaunchCorrectionCheckBatch, t.correction.dev, t.correction.n, Hq, Hkv, D);
  // The batch launchers below also read their host lists (shapes, checks): the shapes are keyed.
  const SelectionBatchShape sel_shape = SelectionBatchShapeOf(t.select.host, t.select.n);
  G.Key(&sel_shape, sizeof sel_shape);
  G.Key(&Hkv, sizeof Hkv);
  G.Op(st, LaunchSelectionBatch, t.select.dev, static_cast<const SelectionParams*>(t.select.host), t.select.n);
  G.Op(st, LaunchResidencyDiffBatch, t.residency.dev, static_cast<const ResidencyParams*>(t.residency.host),
       t.residency.n);
  G.Op(st, LaunchRecallGatherBatch, t.recall.dev, t.recall.n, Hkv, D, P, kGatherBlocks);
  if (graphed && !(per_item.empty() && per_item_spec.empty()))
    throw std::logic_error("decode: a graphed step cannot hold double-buffer sessions");
  for (const PerItemSelect& x : per_item) SelectAndRecall(*x.s, layer, x.q, x.c0, x.c1, x.head_mask, st);
  G.Op(st, LaunchAttendTableBatch, t.table.dev, static_cast<const AttendTableParams*>(t.table.host), t.table.n);

  // 4. Attention for the whole batch.
  DecodeAttentionParams dp;
  std::memset(&dp, 0, sizeof dp);  // padding too: the params are part of a graph's key
  dp.variant = kDefaultDecodeAttentionVariant;
  dp.q = dq;
  dp.out = dout;
  dp.pools = dpools;
  dp.page_slot = tb_slot;
  dp.page_tokens = tb_tokens;
  dp.num_pages = tb_num;
  dp.batch = B;
  dp.q_heads = Hq;
  dp.kv_heads = Hkv;
  dp.head_dim = D;
  dp.page_size = P;
  dp.max_pages = rows;
  dp.scale = 1.f / std::sqrt((float)D);
  const size_t ws = DecodeAttentionWorkspaceBytes(dp);
  // Poison the outputs (NaN) so that an element the kernel fails to write cannot pass for a result.
  G.Op(st, MemsetOp, static_cast<void*>(dout), 0xff, (size_t)B * qs * sizeof(float));
  G.Op(st, [](DecodeAttentionParams p, void* w, size_t n, cudaStream_t s) { LaunchDecodeAttention(p, w, n, s); }, dp,
       static_cast<void*>(workspace_.get()), ws);
  cudaEvent_t attended = graphed ? attended_[layer]->get() : attended_direct_->get();
  G.Op(st, graphed ? RecordExternalOp : RecordOp, attended);

  // 5. Speculative selection + recall for step t+1, on the side stream after the attention.
  if (speculate) {
    G.Op(side, WaitOp, attended);
    G.Op(side, LaunchSelectionBatch, t.spec_select.dev, static_cast<const SelectionParams*>(t.spec_select.host),
         t.spec_select.n);
    G.Op(side, LaunchResidencyDiffBatch, t.spec_residency.dev,
         static_cast<const ResidencyParams*>(t.spec_residency.host), t.spec_residency.n);
    G.Op(side, LaunchRecallGatherBatch, t.spec_recall.dev, t.spec_recall.n, Hkv, D, P, kGatherBlocks);
    for (const PerItemSelect& x : per_item_spec) SelectAndRecall(*x.s, layer, x.q, x.c0, x.c1, x.head_mask, side);
    G.Op(side, RecordOp, spec_done_[layer]->get());
    spec_recorded_[layer] = 1;
  }

  // 6. Host-side state of the layer moves on (the queued work above used the old values).
  for (int i = 0; i < B; ++i) {
    Session& s = *ss[i];
    LayerTier& L = *s.layers[layer];
    L.tokens += 1;
    L.qcur = 1 - L.qcur;
    L.has_q = true;
    L.first_decode = false;
    L.attended_valid = true;
    L.decodes += 1;
    s.host_stats.decode_steps = std::max<uint64_t>(s.host_stats.decode_steps, L.decodes);
  }
}

void CudaEngine::Decode(int layer, const std::vector<DecodeItem>& items) {
  auto lock = LockOutsideStep("decode");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  const int B = static_cast<int>(items.size());
  if (B == 0) return;
  std::vector<int> ids(B);
  for (int i = 0; i < B; ++i) {
    if (!items[i].q || !items[i].k || !items[i].v || !items[i].out)
      throw std::invalid_argument("items[" + to_string(i) + "]: q, k, v and out must not be null");
    ids[i] = items[i].session;
  }
  const std::vector<Session*> ss = CheckBatch(layer, ids);
  const Geometry& g = ss[0]->geo;
  const size_t qs = (size_t)g.q_heads * g.head_dim, ks = (size_t)g.kv_heads * g.head_dim;
  cudaStream_t st = main_->get();
  // The main stream is idle here (every call ends with a wait on it); the side stream may still
  // be recalling. Growing the per-call buffers below is therefore safe.
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  graph_.Begin(false, st);  // host-pointer decodes are issued op by op
  SizeBatchBuffers(*ss[0], B, BatchRows(ss, layer));
  int layers = 0;
  for (const Session* s : ss) layers = std::max(layers, s->geo.layers);
  SizeDescTables(B, layers, 1);

  // Inputs in: one pinned staging area, one copy. Layout: q [B][Hq*D] | k [B][Hkv*D] |
  // v [B][Hkv*D] (fp32) | pools [B].
  const size_t f32_bytes = ((size_t)B * qs + 2 * (size_t)B * ks) * sizeof(float);
  const size_t ptr_off = (f32_bytes + 15) / 16 * 16;
  const size_t in_bytes = ptr_off + (size_t)B * sizeof(void*);
  pin_in_.Resize(in_bytes);
  dev_in_.Resize(in_bytes);
  pin_out_.Resize((size_t)B * qs * sizeof(float));
  dev_out_.Resize((size_t)B * qs);
  float* hq = reinterpret_cast<float*>(pin_in_.get());
  float* hk = hq + (size_t)B * qs;
  float* hv = hk + (size_t)B * ks;
  const bf16** hpools = reinterpret_cast<const bf16**>(pin_in_.get() + ptr_off);
  for (int i = 0; i < B; ++i) {
    std::memcpy(hq + i * qs, items[i].q, qs * sizeof(float));
    std::memcpy(hk + i * ks, items[i].k, ks * sizeof(float));
    std::memcpy(hv + i * ks, items[i].v, ks * sizeof(float));
    hpools[i] = ss[i]->layers[layer]->pool.get();
  }
  FKV_CUDA_CHECK(cudaMemcpyAsync(dev_in_.get(), pin_in_.get(), in_bytes, cudaMemcpyHostToDevice, st));
  const float* dq = reinterpret_cast<const float*>(dev_in_.get());
  DecodeCore(layer, ss, dq, dq + (size_t)B * qs, dq + (size_t)B * (qs + ks), dev_out_.get(),
             reinterpret_cast<const bf16* const*>(dev_in_.get() + ptr_off), 0);
  FKV_CUDA_CHECK(cudaMemcpyAsync(pin_out_.get(), dev_out_.get(), (size_t)B * qs * sizeof(float),
                                 cudaMemcpyDeviceToHost, st));
  FKV_CUDA_CHECK(cudaEventRecord(outputs_->get(), st));
  // Wait for the outputs only (the side stream keeps running).
  FKV_CUDA_CHECK(cudaEventSynchronize(outputs_->get()));
  const float* ho = reinterpret_cast<const float*>(pin_out_.get());
  for (int i = 0; i < B; ++i) {
    std::memcpy(items[i].out, ho + i * qs, qs * sizeof(float));
    WriteManifest(*ss[i], layer);
    WriteQueryRecord(*ss[i], layer, items[i].q);
  }
}

// ---- The GPU model runner's decode step: every layer's inputs and outputs stay on the device.
void CudaEngine::BeginDeviceStep(const std::vector<int>& sessions) {
  auto lock = LockOutsideStep("BeginDeviceStep");  // one open step per engine
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  if (sessions.empty()) throw std::invalid_argument("sessions must not be empty");
  std::vector<Session*> ss = CheckBatch(0, sessions);
  const Geometry& g = ss[0]->geo;
  for (int i = 0; i < (int)ss.size(); ++i)
    if (ss[i]->geo.layers != g.layers)
      throw std::invalid_argument("items[" + to_string(i) + "]: session " + to_string(sessions[i]) +
                                  " has a different number of layers from the batch's first session");
  const int B = (int)ss.size(), NL = g.layers;
  cudaStream_t st = main_->get();
  // Everything the step's layers use is sized here, once, while the main stream is idle.
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  int rows = 1;
  for (int l = 0; l < NL; ++l) rows = std::max(rows, BatchRows(ss, l));
  SizeBatchBuffers(*ss[0], B, rows);
  SizeDescTables(B, NL, NL);  // a pinned region per layer: the host does not wait between layers
  // The step's pointer table: [NL][B] pools, then [NL][B] query-record payloads (mapped manifest
  // memory) that the step's queries go to. Each payload is the layer's record that
  // WriteQueryRecord fills next, not the latest one, so a process that dies mid-step leaves the
  // record matching the committed context intact.
  step_ptrs_pin_.Resize((size_t)2 * NL * B * sizeof(void*));
  step_ptrs_.Resize((size_t)2 * NL * B * sizeof(void*));
  auto** hp = reinterpret_cast<const void**>(step_ptrs_pin_.get());
  for (int l = 0; l < NL; ++l)
    for (int i = 0; i < B; ++i) {
      const Session& s = *ss[i];
      const int next = (int)((s.layers[l]->record_seq + 1) % 2);
      hp[(size_t)l * B + i] = s.layers[l]->pool.get();
      hp[(size_t)(NL + l) * B + i] = s.manifest_dev + s.layout.manifest_query_offset +
                                     (2 * (size_t)l + next) * s.layout.manifest_query_record_bytes +
                                     sizeof(ManifestQueryRecord);
    }
  // Graphed unless turned off or a session's recall needs the host inside the step (double buffer).
  const char* env = std::getenv("FREEKV_CUDA_GRAPH");
  bool graphed = !(env && std::strcmp(env, "0") == 0);
  for (const Session* s : ss) graphed = graphed && s->cfg.recall == RecallMode::Gather;
  graph_.Begin(graphed, st);
  graph_.Op(st, MemcpyOp, static_cast<void*>(step_ptrs_.get()), static_cast<const void*>(step_ptrs_pin_.get()),
            (size_t)2 * NL * B * sizeof(void*), cudaMemcpyHostToDevice);
  step_sessions_ = sessions;
  step_layers_done_ = 0;
  step_open_ = true;
  step_thread_ = std::this_thread::get_id();
}

void CudaEngine::DecodeDevice(int layer, const float* q, const float* k, const float* v, float* out) {
  std::lock_guard<std::mutex> lock(mu_);
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  if (!step_open_ || step_thread_ != std::this_thread::get_id())
    throw std::logic_error("DecodeDevice: no device step is open on this thread (call BeginDeviceStep first)");
  if (layer != step_layers_done_)
    throw std::invalid_argument("DecodeDevice: layer " + to_string(layer) + " out of order (expected " +
                                to_string(step_layers_done_) + ")");
  if (!q || !k || !v || !out) throw std::invalid_argument("DecodeDevice: q, k, v and out must not be null");
  const std::vector<Session*> ss = CheckBatch(layer, step_sessions_);
  const int B = (int)ss.size();
  const size_t qs = (size_t)ss[0]->geo.q_heads * ss[0]->geo.head_dim;
  const auto* pools = reinterpret_cast<const bf16* const*>(step_ptrs_.get()) + (size_t)layer * B;
  DecodeCore(layer, ss, q, k, v, out, pools, layer);
  // This layer's queries, straight into the payloads of the manifest's next query records (their
  // headers are written at the end of the step, after the wait).
  const int NL = ss[0]->geo.layers;
  graph_.Op(main_->get(), LaunchScatterRows, q,
            reinterpret_cast<float* const*>(step_ptrs_.get()) + (size_t)(NL + layer) * B, B, (int)qs);
  step_layers_done_ = layer + 1;
}

void CudaEngine::EndDeviceStep() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!step_open_) return;
  if (step_thread_ != std::this_thread::get_id())
    throw std::logic_error("EndDeviceStep: the open device step belongs to another thread");
  step_open_ = false;
  struct Notify {  // other threads' calls waiting in LockOutsideStep go on, however this ends
    std::condition_variable& cv;
    ~Notify() { cv.notify_all(); }
  } notify{step_cv_};
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  cudaStream_t st = main_->get();
  const int B = (int)step_sessions_.size(), NL = step_layers_done_;
  std::vector<Session*> ss(B);
  for (int i = 0; i < B; ++i) ss[i] = &Find(step_sessions_[i]);
  // Everything queued for the step is issued now (one graph launch when its shape is cached).
  graph_.Flush();
  // The one wait of the step: the appends' tail write-through and the offloads are complete
  // before the manifest says so.
  const double w0 = StepGraph::NowMs();
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  const double w1 = StepGraph::NowMs();
  graph_.Finished();
  struct Account {  // the wait and the bookkeeping below, into the step statistics
    StepGraph& g;
    double w0, w1;
    ~Account() { g.AddAfterIssue(w1 - w0, StepGraph::NowMs() - w1); }
  } account{graph_, w0, w1};
  // The queries are in the records' payloads already (DecodeDevice); their headers go last.
  for (int l = 0; l < NL; ++l)
    for (int i = 0; i < B; ++i) {
      WriteManifest(*ss[i], l);
      WriteQueryRecord(*ss[i], l, nullptr);
    }
}

void* CudaEngine::DeviceStream() { return main_->get(); }

}  // namespace
}  // namespace cuda

std::unique_ptr<Engine> MakeCudaEngine(int device) { return std::make_unique<cuda::CudaEngine>(device); }

}  // namespace freekv
