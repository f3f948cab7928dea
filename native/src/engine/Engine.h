// The FreeKV engine contract shared by every backend (CPU in engine/cpu/, CUDA in engine/cuda/)
// and by every caller (the JS binding in AddonEngine.cpp, the model runner in model/).
//
// Terms (DESIGN.md section 2): page = P tokens; sink = first S/P pages; window = the partial page
// plus the W/P - 1 most recent full pages; the selected pages are the top sel/P of the full pages
// in between, per KV head. Device tier = NHD budget cache + summaries of every page; host tier =
// the kvstore's shared-memory HND page store.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace freekv {
namespace cuda {
class StepGraph;
}

enum class DType : int { F32 = 1, BF16 = 2, F16 = 3 };
enum class SummaryKind : int { MaxMin = 1, CuboidMean = 2 };
enum class GroupCombine : int { SoftmaxMean = 1, Mean = 2, Max = 3 };
enum class Mode : int { FreeKV = 1, Dense = 2, Oracle = 3, Speculative = 4, SinkWindow = 5 };
enum class RecallMode : int { Gather = 1, DoubleBuffer = 2 };

inline size_t DTypeBytes(DType t) { return t == DType::F32 ? 4 : 2; }

struct Geometry {
  int layers = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  DType kv_dtype = DType::F32;  // storage type of K/V (device tier and host store)
};

struct RetrievalConfig {
  int page_size = 32;
  int sink_tokens = 512;
  int window_tokens = 512;
  int select_tokens = 1024;
  float tau = 0.9f;
  SummaryKind summary = SummaryKind::MaxMin;
  GroupCombine combine = GroupCombine::SoftmaxMean;
  Mode mode = Mode::FreeKV;
  RecallMode recall = RecallMode::Gather;
  std::vector<int> dense_layers;
};

// The host tier of one session: the kvstore's shared segments, mapped in this process.
// Layout (bytes), matching freekv.v1.SegmentLayout:
//   store:    [layers][capacity_pages] HND pages; page = [kv_heads][2 (K,V)][page_size][head_dim]
//   staging:  two buffers of staging_buffer_bytes (double-buffered recall)
//   tail:     [layers] NHD partial page = [page_size][2 (K,V)][kv_heads][head_dim], written
//             through every step so a restarted compute loses nothing
//   manifest: ManifestHeader then per layer uint32 committed full pages, uint32 tail tokens;
//             then (at Layout::manifest_query_offset) per layer two ManifestQueryRecords of
//             Layout::manifest_query_record_bytes each (record header + float q[q_heads][head_dim]).
//             The engine writes all of it; the kvstore only initialises the header and reads.
struct HostStore {
  uint8_t* store = nullptr;
  size_t store_bytes = 0;
  uint8_t* staging = nullptr;
  size_t staging_bytes = 0;
  uint8_t* tail = nullptr;
  size_t tail_bytes = 0;
  uint8_t* manifest = nullptr;
  size_t manifest_bytes = 0;
  int capacity_pages = 0;
};

struct ManifestHeader {
  uint32_t magic;  // 'FKV1' = 0x31564b46
  uint32_t layers;
  uint64_t context_tokens;  // tokens appended to every layer so far
};
constexpr uint32_t kManifestMagic = 0x31564b46u;

// The committed full pages of `layer` in a manifest: the pages every backend has offloaded to the
// store, written before the call that filled them returns (what the compute tier may commit).
inline uint32_t ManifestCommittedPages(const uint8_t* manifest, int layer) {
  return reinterpret_cast<const uint32_t*>(manifest + sizeof(ManifestHeader))[2 * layer];
}

// The query state a re-attaching process needs to continue with identical outputs: the last
// query of a layer (for the speculative selection that was in flight and for the correction's
// cosine) and whether the next decode is the first after a prefill. Two records per layer are
// written alternately, so a process that died in the middle of a step still finds the record
// that matches the context every layer completed.
struct ManifestQueryRecord {
  uint64_t tokens;  // the layer's tokens after the call that wrote this record
  uint32_t flags;   // kQueryValid | kFirstDecodePending
  uint32_t seq;     // write sequence number of this layer's records
  // followed by float q[q_heads * head_dim]
};
constexpr uint32_t kQueryValid = 1u;
constexpr uint32_t kFirstDecodePending = 2u;

// Per-session counters (summed over layers). Mirrors freekv.v1.RetrievalStats.
struct Stats {
  uint64_t decode_steps = 0;
  // One per (layer, KV head) of a retrieval layer per decode step: the selection that step's
  // attention used (speculative, blocking or corrected); correction_rate = corrections / selections.
  uint64_t selections = 0;
  uint64_t corrections = 0;  // of which re-selected with q_t and recalled synchronously
  // Every selection performed (speculative ones included): pages chosen = hits + recalled.
  uint64_t pages_selected = 0;
  uint64_t pages_hit = 0;
  uint64_t pages_recalled = 0;
  uint64_t recall_bytes = 0;  // pages_recalled * head-page bytes ([2][P][D] of one KV head)
  uint64_t pages_offloaded = 0;
  uint64_t offload_bytes = 0;
  uint64_t context_tokens = 0;
  // Resident head-pages of the device tier right now, summed over layers and KV heads
  // (sink + window + selected slots in use; every page of a dense layer).
  uint64_t resident_pages = 0;
  // Decode calls whose attention had to wait for its layer's in-flight speculative recall.
  uint64_t recall_waits = 0;
  // Speculative recalls that had to wait for the current attention to release the slots before
  // writing them (the selection runs during that attention; the writes may not).
  uint64_t guard_waits = 0;
};

// How the device steps of an engine were issued (CUDA backend; see native/src/cuda/step_graph.cuh).
struct DeviceStepStats {
  uint64_t steps = 0;     // device steps
  uint64_t direct = 0;    // issued op by op (graphs off, a step with a host round trip, a new shape)
  uint64_t captures = 0;  // captured into a new CUDA graph
  uint64_t updates = 0;   // captured and updated into a cached graph of the same op sequence
  uint64_t replays = 0;   // one launch of a cached graph
  uint64_t ops = 0;       // stream operations of the last step
  double capture_ms = 0;  // host time of all captures and updates
  // Per step, summed: host time from BeginDeviceStep until the step is issued (the host's own
  // work, plus the launches themselves when direct), and the device time from the step's first
  // operation to its last on the main stream (when direct, device idle time waiting for the host's
  // launches included).
  double host_ms = 0;
  double device_ms = 0;
  // Host time after the graph launch, summed per step: issuing the side stream's speculative work
  // (graphed steps), the step's one wait for the main stream, and the bookkeeping after that wait
  // (manifest words and query records).
  double side_issue_ms = 0;
  double wait_ms = 0;
  double finish_ms = 0;
  // Host time copying each step's results (logits) out of the pinned buffer the device wrote.
  double result_ms = 0;
  // With FREEKV_SIDE_TIMING=1 only (a diagnostic: the host then waits for the previous step's
  // side-stream work before issuing the next): device time of each graphed step's side-stream
  // work, from its issue (the side stream idle) until its last op, summed, and the steps timed.
  double side_ms = 0;
  uint64_t side_steps = 0;
};

// One session's input to a batched decode step of one layer. Pointers are in the backend's
// memory space for `*Device` calls and in host memory otherwise; all float32.
struct DecodeItem {
  int session = -1;
  const float* q = nullptr;  // [q_heads][head_dim]
  const float* k = nullptr;  // [kv_heads][head_dim], appended before attention
  const float* v = nullptr;  // [kv_heads][head_dim]
  float* out = nullptr;      // [q_heads][head_dim]
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string backend() const = 0;

  // Creates a session over an attached host store. With `reattach`, the committed pages and the
  // tail in the store are loaded back (summaries rebuilt, window and sink made resident) and the
  // session continues where the previous process left off. Throws std::invalid_argument on bad
  // geometry/config. Returns the session handle.
  virtual int CreateSession(const Geometry& g, const RetrievalConfig& c, const HostStore& h, bool reattach) = 0;
  virtual void CloseSession(int session) = 0;

  // Appends n tokens of (post-RoPE) keys and values to a layer: k, v are [n][kv_heads][head_dim].
  // Filled pages are summarised and offloaded (NHD -> HND) to the host store.
  virtual void Prefill(int session, int layer, const float* k, const float* v, int n) = 0;

  // Like Prefill, and also computes exact causal attention for the n new queries over the whole
  // context (earlier tokens included): q, out are [n][q_heads][head_dim]. Scale 1/sqrt(head_dim).
  // The last query is kept for the first decode step's blocking selection.
  virtual void PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n,
                             float* out) = 0;

  // One decode step of one layer for a batch of sessions (each appears at most once). Appends
  // each item's k/v, then attends with the session's mode; in freekv/speculative modes it starts
  // the speculative selection + recall for the next step of this layer before returning or in the
  // background. Items' sessions must all have geometry compatible with the batch (same shapes).
  virtual void Decode(int layer, const std::vector<DecodeItem>& items) = 0;

  // The GPU model runner's decode step (CUDA backend; the CPU backend throws std::logic_error):
  // BeginDeviceStep(sessions) sizes the step's buffers; then DecodeDevice(layer, ...) for every
  // layer in order, with q [B][q_heads][head_dim], k, v [B][kv_heads][head_dim] and out
  // [B][q_heads][head_dim] fp32 in device memory (B = sessions.size(), in that order); each call
  // only queues work on DeviceStream() and returns: no host round trip inside the step.
  // EndDeviceStep() waits for the stream once and then writes the manifests (tokens, query
  // records), so the host store never claims work the device has not finished.
  virtual void BeginDeviceStep(const std::vector<int>& sessions) { NoDeviceStep(); }
  virtual void DecodeDevice(int layer, const float* q, const float* k, const float* v, float* out) { NoDeviceStep(); }
  virtual void EndDeviceStep() {}
  // The stream a device step is ordered on (a cudaStream_t), or null on backends without one.
  virtual void* DeviceStream() { return nullptr; }
  // While a step is open, the runner queues its own stream work through this (so the whole step,
  // the runner's GEMMs and kernels included, becomes one CUDA graph); null without device steps.
  // Graphs are on unless FREEKV_CUDA_GRAPH=0 (read at every BeginDeviceStep).
  virtual cuda::StepGraph* DeviceStepGraph() { return nullptr; }
  virtual DeviceStepStats GetDeviceStepStats() const { return {}; }

  // Waits for all background work (recalls) of a session; needed before CloseSession or before
  // reading the host store from another process.
  virtual void Sync(int session) = 0;

  virtual Stats GetStats(int session) const = 0;
  virtual uint64_t ContextTokens(int session) const = 0;

  // For tests and the fidelity harness: for (layer, kv head), the token positions attended at the
  // most recent decode step (sink + selected + window, sorted).
  virtual std::vector<int> LastAttendedTokens(int session, int layer, int kv_head) const = 0;

 private:
  [[noreturn]] void NoDeviceStep() const {
    throw std::logic_error("the " + backend() + " backend has no device decode step");
  }
};

// Factories. `threads` <= 0 means all cores but one (the CPU engine's background recall thread
// selects and recalls on that one). Test hooks: `debug_recall_delay_us`
// makes every background recall sleep before it writes the slots (so the next step finds it in
// flight); `debug_attend_delay_us` makes every decode sleep while it holds its layer's slots,
// before reading them (so a recall that did not wait would overwrite them under attention).
std::unique_ptr<Engine> MakeCpuEngine(int threads, int debug_recall_delay_us = 0, int debug_attend_delay_us = 0);
#ifdef FREEKV_WITH_CUDA
// Throws std::runtime_error("no CUDA device: ...") when no device is usable.
std::unique_ptr<Engine> MakeCudaEngine(int device);
#endif

// Layout helpers shared by the kvstore sizing (TS mirrors these in services/kvstore/layout.ts).
struct Layout {
  size_t head_page_bytes;  // [2][P][D]
  size_t page_bytes;       // [Hkv][2][P][D]
  size_t layer_stride;     // capacity_pages * page_bytes
  size_t store_bytes;
  size_t staging_buffer_bytes;
  size_t tail_layer_bytes;  // [P][2][Hkv][D]
  size_t tail_bytes;
  size_t manifest_bytes;
  size_t manifest_query_offset;        // first ManifestQueryRecord (layer 0, record 0)
  size_t manifest_query_record_bytes;  // one record incl. its q; layer l record r at offset + (2l + r) * this
};
Layout ComputeLayout(const Geometry& g, const RetrievalConfig& c, int capacity_pages);

}  // namespace freekv
