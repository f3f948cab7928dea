// The CUDA backend of the FreeKV engine (Engine.h + DeviceEngine.h), built from the kernels of
// this folder. This header holds the engine class and its session/tier structs; the methods are
// split by concept: CudaEngine.cu (streams, lookups, statistics), CudaSession.cu (create, close,
// host registration), CudaValidate.cu, CudaBudget.h, CudaManifest.cu, CudaPrefill.cu, CudaDecode.cu
// (batched decode, speculative select-and-recall), CudaReattach.cu, CudaDeviceStep.cu.
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
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cuda/device_memory.cuh"
#include "cuda/step_graph.cuh"
#include "engine/DeviceEngine.h"
#include "engine/Engine.h"
#include "layer_counters.cuh"
#include "recall.cuh"
#include "shm/TeardownGate.h"

namespace freekv::cuda {

using bf16 = __nv_bfloat16;

constexpr int kGatherBlocks = 8;  // SMs an item-by-item recall uses (8 of 132 reach the PCIe link); the batched decode's recall runs in its residency diff

struct LayerTier {
  bool dense = false;      // attends every page
  bool keeps_all = false;  // every page in its pool slot p (dense, or resident_sparse)
  int64_t tokens = 0;
  int pool_slots = 0;
  PoolArray<bf16> pool;         // NHD [pool_slots][2][P][Hkv][D]: sink, window, then R selected slots
  PoolArray<__nv_bfloat16> summaries;  // [capacity][Hkv][2][D] (bf16 values: summary.cuh)
  PoolArray<__nv_bfloat16> groups;     // [ceil(capacity / 32)][Hkv][2][D] group bounds (hierarchical selection)
  PoolArray<unsigned long long> sel_ws;  // selection workspace (SelectionWorkspaceBytes at capacity)
  PoolArray<int> selected;      // [Hkv][K]
  PoolArray<int> selected_slot; // [Hkv][K]
  PoolArray<int> resident;      // [Hkv][R]: the page in each selected slot (-1: empty)
  PoolArray<int> slot_age;      // [Hkv][R]: selections since the slot's page was last chosen (engine/ResidentPool.h)
  PoolArray<int> flags;         // [Hkv]
  PoolArray<float> scratch;     // selection scratch
  PoolArray<RecallJob> jobs;    // [Hkv * K]
  PoolArray<int> job_count;     // [1 + Hkv]: [0] the per-item path's total, [1 + h] the batched path's per head
  PoolArray<float> q[2];        // [Hq][D]: q[cur] = latest query
  int qcur = 0;
  bool has_q = false;
  bool first_decode = true;
  bool selection_valid = false;   // `selected` holds a selection for the next attention
  uint32_t record_seq = 0;        // sequence number of the layer's manifest query records
  int last_candidates = 0;
  // The attention table of the latest decode (introspection: LastAttendedTokens).
  int table_rows = 0;
  PoolArray<int> t_slot, t_tokens, t_id, t_num;
  bool attended_valid = false;
  bool recall_pending = false;    // speculative recall queued (done when the engine's spec_done_[layer] is)
  uint64_t decodes = 0;
  uint64_t selections = 0;        // host-known per-layer counter (LayerStats::selections)
  // The selection attention read at the previous decode ([Hkv][K], written by the attention table
  // kernel), for the top-k overlap; valid when that decode attended a selection.
  PoolArray<int> prev_selected;
  bool prev_selected_valid = false;
  // Resident prefill context (CudaPrefill.cu): while a prompt is prefilled chunk by chunk, the
  // layer's whole context stays on the device as NHD pages [0, ceil(pctx_tokens / P)), so each
  // chunk attends to the earlier ones without gathering them back from the host store. Released
  // when the session decodes or closes, or when the engine's prefill-context budget is short.
  // pctx_tokens < 0: not held (or not valid).
  PoolArray<bf16> pctx;  // from the engine's pctx_pool_ when it has one, in main_'s order
  int64_t pctx_tokens = -1;
  // Device prefill (PrefillDevice): the manifest (tokens, query record) waits for the offload of
  // the layer's filled pages; FinishDevicePrefill writes it with q_last, the last prefilled query
  // [Hq][D] copied to pinned memory (the layer's row of Session::q_last).
  bool manifest_pending = false;
  float* q_last = nullptr;
  // Every device array above from `pool` in `stream`'s order (Session::BindPool).
  void BindPool(cudaMemPool_t mem, cudaStream_t stream) {
    for (auto* a : {&selected, &selected_slot, &resident, &slot_age, &flags, &job_count, &t_slot, &t_tokens, &t_id, &t_num, &prev_selected})
      *a = PoolArray<int>(mem, stream);
    pool = PoolArray<bf16>(mem, stream);
    summaries = PoolArray<__nv_bfloat16>(mem, stream);
    groups = PoolArray<__nv_bfloat16>(mem, stream);
    sel_ws = PoolArray<unsigned long long>(mem, stream);
    scratch = PoolArray<float>(mem, stream);
    jobs = PoolArray<RecallJob>(mem, stream);
    for (auto& x : q) x = PoolArray<float>(mem, stream);
  }
};

struct Session {
  Geometry geo;
  RetrievalConfig cfg;
  HostStore host;
  Layout layout;
  int P = 0, SP = 0, WP = 0, K = 0;
  // Selected slots of a group's pool: K, or more with FREEKV_RESIDENT_FACTOR (engine/Retrieval.h).
  int R = 0;
  size_t page_elems = 0;  // bf16 elements of one NHD page
  uint8_t* store_dev = nullptr;
  uint8_t* tail_dev = nullptr;
  uint8_t* manifest_dev = nullptr;  // the device's writes of query records (graphed steps)
  bool tail_registered = false, manifest_registered = false;
  // The store is registered per reservation (RegisterStore): each layer's reserved range, rounded
  // out to OS pages, as it grows. store_regs: the registrations this session made (unregistered
  // when it closes); store_cover: the merged OS-page ranges known to be registered (its own and any
  // found already registered), so a growth registers only what is new.
  std::vector<uint8_t*> store_regs;
  std::vector<std::pair<uintptr_t, uintptr_t>> store_cover;
  // Pages [0, registered_pages) of every layer are registered (EnsureRegistered); the device only
  // touches pages below it (offloads of pages that filled, recalls of earlier ones).
  int registered_pages = 0;
  // RegisterAhead's registration in the background (FREEKV_REGISTER_AHEAD=thread, the default):
  // pages [0, ahead_pages) once `ahead` is ready. While it runs it alone touches store_regs and
  // store_cover; everything else that does (EnsureRegistered, the destructor) waits for it first
  // (WaitAhead). A failed job leaves registered_pages as it was: the pages are registered inline
  // when needed, which throws the error then current.
  std::future<void> ahead;
  int ahead_pages = 0;
  // Where this session's registrations of the store begin (sorted): a DMA copy into the store must
  // not cross from one registration into the next (cudaMemcpyAsync refuses such a range), so the
  // prefill's offload copies are cut there. foreign_reg: some range was registered already by
  // someone else (bounds unknown), and dma_refused: a copy was refused anyway; either way the
  // session's offloads use the kernel. Guarded by reg_mu (RegisterStore may run on `ahead`).
  std::mutex reg_mu;
  std::vector<uintptr_t> reg_starts;
  bool foreign_reg = false;
  bool dma_refused = false;
  std::vector<std::unique_ptr<LayerTier>> layers;
  PoolArray<unsigned long long> counters;  // [layers][kLayerWords] (layer_counters.cuh)
  Stats host_stats;                          // host-known counters
  std::unique_ptr<DoubleBufferRecall> db;
  // The last prefilled query of every layer ([layers][Hq][D] floats, pinned; LayerTier::q_last
  // points at the layer's row), allocated at the first device prefill: one pinned allocation a
  // session instead of one a layer (each is an implicit synchronisation of the device).
  PinnedBuffer q_last;
  // FREEKV_SESSION_DEVICE_MEMORY=pool: the device arrays come from the engine's session pool in
  // free_stream's order (CudaEngine::session_pool_), and go back to it in that order when the
  // session is destroyed, after the work queued by then on free_after's streams (events, no host
  // wait): cudaFree synchronises the whole device, so a session's ~20 arrays a layer, freed one by
  // one, stalled every other session's queued work, as their cudaMalloc did at creation.
  cudaStream_t free_stream = nullptr;
  std::vector<cudaStream_t> free_after;
  // A fresh session's opening, from its creation to the end of its first prefill call (the first
  // chunk allocates every layer's resident context), its first decode step or its close
  // (FlushPrefill): other sessions' teardowns step aside meanwhile (shm/TeardownGate.h). Measured
  // on an H100: with only the creation marked, a previous 128K session's unregistration moved into
  // the next prompt's first chunk and made it 1.75 s instead of 0.38 (PERF.md).
  std::unique_ptr<teardown::Foreground> opening;
  ~Session() {
    if (ahead.valid()) ahead.wait();  // its error goes with the session: nothing used those pages
    if (free_stream)
      for (cudaStream_t st : free_after) {
        // The frees are queued after st's work through an event; where that cannot be arranged,
        // the host waits for st instead, before anything is freed.
        cudaEvent_t e = nullptr;
        const bool ordered = cudaEventCreateWithFlags(&e, cudaEventDisableTiming) == cudaSuccess &&
                             cudaEventRecord(e, st) == cudaSuccess && cudaStreamWaitEvent(free_stream, e, 0) == cudaSuccess;
        if (e) cudaEventDestroy(e);
        if (!ordered) cudaStreamSynchronize(st);
      }
    UnregisterStore(nullptr);
  }
  // Unregisters the session's host memory, its store a registration (<= 64 MiB) at a time; with a
  // pacer (CloseSession) waiting between registrations while the process opens a session or
  // registers a store (shm/TeardownGate.h). Nothing may use the memory any more.
  void UnregisterStore(teardown::Pacer* pacer) {
    if (ahead.valid()) ahead.wait();
    for (uint8_t* p : store_regs) {
      if (pacer) pacer->BetweenPieces();
      cudaHostUnregister(p);
    }
    store_regs.clear();
    store_cover.clear();
    registered_pages = 0;
    if (tail_registered) cudaHostUnregister(host.tail);
    if (manifest_registered) cudaHostUnregister(host.manifest);
    tail_registered = manifest_registered = false;
  }
  bool Retrieves(const LayerTier& L) const { return !L.dense && cfg.mode != Mode::SinkWindow && K > 0; }
  bool Speculates(const LayerTier& L) const {
    return Retrieves(L) && (cfg.mode == Mode::FreeKV || cfg.mode == Mode::Speculative);
  }
  unsigned long long* LayerCounters(int l) const { return counters.get() + (size_t)l * kLayerWords; }
  uint8_t* StoreLayerHost(int l) const { return host.store + layout.layer_stride * l; }
  uint8_t* StoreLayerDev(int l) const { return store_dev + layout.layer_stride * l; }
  uint8_t* TailLayerDev(int l) const { return tail_dev + layout.tail_layer_bytes * l; }
  // Pool slot of page p while it is a sink or window (partial included) page.
  // (A layer that keeps every page holds page p in slot p.)
  int WorkingSlot(const LayerTier& L, int p) const { return L.keeps_all || p < SP ? p : SP + p % WP; }
  RecallGeometry Recall() const {
    RecallGeometry g;
    g.kv_heads = geo.kv_heads;
    g.head_dim = geo.head_dim;
    g.page_size = P;
    g.src_page_stride = layout.page_bytes;
    return g;
  }
};


class CudaEngine final : public Engine, public DeviceEngine {
 public:
  explicit CudaEngine(const CudaEngineOptions& options);
  ~CudaEngine() override;

  std::string backend() const override { return "cuda"; }
  DeviceEngine* device() override { return this; }
  void SetHierarchicalSelection(HierarchicalSelection mode) override { hier_.store(mode); }

  // Engine (CudaSession.cu, CudaPrefill.cu, CudaDecode.cu, CudaEngine.cu).
  int CreateSession(const Geometry& g, const RetrievalConfig& c, const HostStore& h, bool reattach) override;
  void CloseSession(int session) override;
  void ReserveStore(int session, int reserved_pages) override;
  void Prefill(int session, int layer, const float* k, const float* v, int n) override;
  void PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n,
                     float* out, int attend_rows = -1) override;
  bool PrefillDevice(int session, int layer, const float* q, const float* k, const float* v, int n, float* out,
                     bool tensor_cores, void* out_bf16, const void* q_bf16 = nullptr,
                     int attend_rows = -1) override;
  bool PrefillTakesBf16Queries(int head_dim) const override;
  int PrefillWaveTokens(int q_heads, int kv_heads, int head_dim) const override;
  void FinishDevicePrefill(int session) override;
  void RegisterAhead(int session, int64_t tokens) override;
  void Decode(int layer, const std::vector<DecodeItem>& items) override;
  void Sync(int session) override;
  Stats GetStats(int session) const override;
  uint64_t ContextTokens(int session) const override;
  Geometry SessionGeometry(int session) const override;
  std::vector<int> LastAttendedTokens(int session, int layer, int kv_head) const override;

  // DeviceEngine (CudaDeviceStep.cu).
  void BeginDeviceStep(const std::vector<int>& sessions) override;
  void DecodeDevice(int layer, const float* q, const float* k, const float* v, float* out) override;
  void EndDeviceStep() override;
  void* DeviceStream() override;
  StepGraph* DeviceStepGraph() override { return &graph_; }
  DeviceStepStats GetDeviceStepStats() const override;

 private:
  Session& Find(int session) const;
  // CreateSession's work, under the engine lock.
  int CreateSessionLocked(const Geometry& g, const RetrievalConfig& c, const HostStore& h, bool reattach);
  static void CheckLayer(const Session& s, int layer);
  static uint64_t Context(const Session& s);
  // Waits for both streams' queued work (CudaEngine.cu).
  void SyncStreams() const;
  // The CUDA backend's limits on a session's geometry, retrieval config and host store
  // (CudaValidate.cu). Throws std::invalid_argument naming the field.
  static void Validate(const Geometry& g, const RetrievalConfig& c, const HostStore& h);

  // The manifest (Engine.h, HostStore; CudaManifest.cu).
  static void InitManifest(Session& s);
  static uint32_t* LayerWords(const Session& s, int layer);
  static ManifestQueryRecord* QueryRecord(const Session& s, int layer, int r);
  // The query state a re-attaching process needs (Engine.h, ManifestQueryRecord): written after
  // every call of a layer, alternating between the layer's two records. q: host, [Hq][D] or null.
  static void WriteQueryRecord(Session& s, int layer, const float* q);
  static const ManifestQueryRecord* FindQueryRecord(const Session& s, int layer, uint64_t tokens);
  // Called once the main stream has completed the layer's offloads.
  static void WriteManifest(Session& s, int layer);
  void Reattach(Session& s);

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
  // `reuse_heads`: heads whose rows of `selected` already hold this very selection (the step's
  // correction, same query and candidates): the selection leaves them out; the residency diff and
  // recall still cover every head (batched lists only).
  void QueueSelectAndRecall(Session& s, int layer, const float* q, int c0, int c1, const int* head_mask,
                            DescTable& t, bool speculative, std::vector<PerItemSelect>& per_item,
                            const int* reuse_heads = nullptr);

  // One prefill run of a layer (CudaPrefill.cu). device_io: q, k, v and out are device pointers
  // and nothing waits (the manifest is left pending); otherwise host pointers, and the call
  // returns with out written and the manifest committed.
  // out_bf16 (device_io only): PrefillDevice's; returns whether the output went there.
  // q_bf16, attend_rows (device_io only): PrefillDevice's.
  bool DoPrefill(Session& s, int layer, const float* q, const float* k, const float* v, int n, float* out,
                 bool tensor_cores, bool device_io, void* out_bf16 = nullptr, const void* q_bf16 = nullptr,
                 int attend_rows = -1);
  // Queues the HND offload of `count` full NHD pages at `pages` to the store's pages from `first`
  // on offload_ (after what main has queued so far), as offload_by_copy_ says.
  void QueueOffload(Session& s, int layer, const bf16* pages, int first, int count);
  // The layer's resident prefill context with room for `pages` pages (grown, its pages kept), or
  // null when the prefill-context budget (or the device's memory) cannot hold it.
  bf16* ResidentContext(Session& s, LayerTier& L, int pages);
  void ReleaseContext(LayerTier& L);
  // Writes the pending manifests of a device prefill (after both streams' work is done).
  void FlushPrefill(Session& s);
  // FlushPrefill, then frees every layer's resident prefill context (the session decodes or closes).
  void EndPrefill(Session& s);
  // Selection for `heads_mask` (or all heads) with query `q` over [c0, c1), then the residency
  // diff and the recall of the misses, all on `stream`.
  void SelectAndRecall(Session& s, int layer, const float* q, int c0, int c1, const int* head_mask,
                       cudaStream_t stream);

  int device_;
  bool graphs_;  // device steps become CUDA graphs (CudaEngineOptions::graphs)
  std::atomic<HierarchicalSelection> hier_;  // CudaEngineOptions::hierarchical
  // Whether a selection among n candidate pages of session s goes through the group bounds.
  bool Hierarchical(const Session& s, int n) const;
  mutable std::mutex mu_;
  std::map<int, std::unique_ptr<Session>> sessions_;
  int next_id_ = 1;
  std::unique_ptr<Stream> main_, side_;
  // A new session's initial device contents (CreateSession): waited for on their own, not behind
  // the work other sessions have queued on main_ (a prompt's chunk: up to a second at 128K).
  std::unique_ptr<Stream> init_;
  // Prefill offload (HND pages to the host store) of device prefills, overlapping the next
  // layers' work on the main stream; offload_done_ is recorded after each.
  std::unique_ptr<Stream> offload_;
  std::unique_ptr<Event> offload_done_, appended_;
  // How a device prefill's filled pages reach the host store (CudaPrefill.cu, FREEKV_PREFILL_OFFLOAD):
  // copy (the default): the main stream transposes them to HND in a device staging slot and the
  // copy stream moves the slot with one DMA copy, so no SM waits on PCIe writes; kernel: the
  // offload kernel writes the mapped host store from the SMs on the copy stream.
  bool offload_by_copy_ = true;
  // FREEKV_MEAN_FOLD as the current decode read it (SelectionParams::fold_mean).
  bool fold_mean_ = false;
  static constexpr int kStageSlots = 4;
  static constexpr size_t kMaxStageBytes = size_t(64) << 20;
  DeviceArray<uint8_t> stage_[kStageSlots];
  std::unique_ptr<Event> stage_free_[kStageSlots];  // recorded after the slot's copy to the host
  int stage_next_ = 0;
  // The resident prefill contexts of every session (bytes), and their budget.
  size_t pctx_bytes_ = 0, pctx_limit_ = 0;
  // Where the resident contexts come from with FREEKV_PREFILL_CONTEXT_MEMORY=pool (opt-in, not
  // yet measured on the H200; the default `malloc` is cudaMalloc/cudaFree as before): a memory
  // pool that keeps up to pctx_limit_ of freed memory, so a prompt after a prompt reuses its
  // predecessor's context memory, and a session creation short of memory trims it and tries once
  // more. Meant for the first-chunk penalty of a prompt after another request (0.7-1.1 s instead
  // of ~0.35 s at 8B shapes, bench/results/gpu-visit-20261204-2126/), whose cause, the 17 GB
  // cudaFree of the previous 128K prompt's contexts and the next one's cudaMalloc, is not
  // confirmed; PERF.md says how it is measured.
  cudaMemPool_t pctx_pool_ = nullptr;
  // FREEKV_SESSION_DEVICE_MEMORY=pool (opt-in until measured on the H200; `malloc`, the default, is
  // cudaMalloc / cudaFree per array as before): every session's device arrays (Session::free_stream)
  // come from this pool in init_'s order and go back to it without a device-wide synchronisation;
  // it keeps up to 1/32 of the device's memory of closed sessions' arrays for the next ones, and a
  // session creation short of memory trims it and tries once more.
  cudaMemPool_t session_pool_ = nullptr;
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

// Registers a shared segment for mapped device access; an already registered range is used as is.
uint8_t* RegisterMapped(uint8_t* p, size_t bytes, bool& registered, const char* what);
// Registers pages [0, reserved_pages) of every layer of the session's store for mapped access
// (only the OS pages not registered yet); the device uses the host addresses (checked).
void RegisterStore(Session& s, int reserved_pages);
// Registers pages [0, min(pages, reserved)) of every layer unless they already are (one integer
// compare on the common path).
void EnsureRegistered(Session& s, int pages);
// Pages a session registers beyond what it needs when it has to register (per layer): a fresh
// session starts with this many, and a decode that reaches the end of the registered pages
// registers this many more, so registration is rare and a 128K-token reservation is not pinned
// whole before its prompt's first chunk (at 8B shapes that took ~6 s of a 24 s time to first token).
constexpr int kRegisterAheadPages = 64;

}  // namespace freekv::cuda
