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
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/Budget.h"
#include "engine/Hierarchy.h"
#include "engine/Layout.h"
#include "engine/Manifest.h"
#include "engine/Retrieval.h"
#include "engine/RetrievalStats.h"

namespace freekv {
class DeviceEngine;

// The host tier of one session: the kvstore's shared segments, mapped in this process, laid
// out as engine/Layout.h and engine/Manifest.h define. The engine writes all of them; the kvstore
// only initialises the manifest and reads it.
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
  // Pages of each layer's store the kvstore has committed memory for (its reservation): the
  // store keeps its full [layers][capacity_pages] addressing, but only pages [0, reserved_pages)
  // of a layer are backed by memory, so an append that would fill a page at or past it throws
  // (it would touch memory nobody accounted for). 0 <= reserved_pages <= capacity_pages; it only
  // grows (Engine::ReserveStore).
  int reserved_pages = 0;
};

// The message of an append refused by the reservation (both backends).
std::string ReservationExceeded(int reserved_pages, int capacity_pages);
// Checks a new reservation for Engine::ReserveStore: in [h.reserved_pages, h.capacity_pages].
void CheckReservation(const HostStore& h, int reserved_pages);

// The checks every backend makes of a new session (engine/Validate.cpp), each throwing
// std::invalid_argument that names the field; a backend adds its own limits (dtype, head dims)
// between them. The geometry's common ranges:
void ValidateGeometry(const Geometry& g);
// The host segments against the layout: capacityPages >= 1 and each segment at least its layout
// size (the staging buffers only where the backend uses them).
void ValidateHostStore(const HostStore& h, const Layout& layout, bool uses_staging);

// Per-session counters. Mirrors freekv.v1.RetrievalStats. The retrieval counters (selections
// .. recall_bytes) are the sums over `layers` (SumLayers).
struct Stats {
  uint64_t decode_steps = 0;
  // One per (layer, KV head) of a retrieval layer per decode step: the selection that step's
  // attention used (speculative, blocking or corrected); correction_rate = corrections / selections.
  uint64_t selections = 0;
  uint64_t corrections = 0;  // of which re-selected with q_t and recalled synchronously
  // Every selection performed (speculative ones included): pages chosen = hits + recalled. A
  // selection whose recall failed counts none (its pages were not copied; it is made again).
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
  // Decode calls whose attention had to wait for its layer's in-flight speculative recall (one
  // that then failed included).
  uint64_t recall_waits = 0;
  // Speculative recalls that had to wait for the current attention to release the slots before
  // writing them (the selection runs during that attention; the writes may not).
  uint64_t guard_waits = 0;
  // Per layer (engine/RetrievalStats.h): counters and the adjacent-query / top-k dynamics.
  std::vector<LayerStats> layers;

  // Sets selections .. recall_bytes to the sums over `layers`; head_page_bytes: one recalled
  // head-page ([2][P][D] of one KV head in the storage type).
  void SumLayers(uint64_t head_page_bytes) {
    selections = corrections = pages_selected = pages_hit = pages_recalled = 0;
    for (const LayerStats& l : layers) {
      selections += l.selections;
      corrections += l.corrections;
      pages_selected += l.pages_selected;
      pages_hit += l.pages_hit;
      pages_recalled += l.pages_recalled;
    }
    recall_bytes = pages_recalled * head_page_bytes;
  }
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

// An input check of a model call that failed before anything was appended to any session (the
// binding marks its error `refused`: the call may run again, and the sessions are as they were).
// Any other error of a model call may have come after some layers appended.
class Refused : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// A failure of an engine's background work that no call was answered with (a registration ahead
// of a prompt whose pages were never needed, a recall of a session that closed): kept until the
// binding takes it (Engine.takeBackgroundFailures), so that the service logs and counts it.
struct BackgroundFailure {
  int session = -1;
  std::string what;
};

// What BackgroundFailures::Take returns: the failures kept, and how many more were not kept.
struct BackgroundFailureList {
  std::vector<BackgroundFailure> failures;
  uint64_t dropped = 0;
};

// The engines' record of those failures: the newest kMax are kept, the others only counted.
class BackgroundFailures {
 public:
  static constexpr size_t kMax = 64;
  void Add(int session, std::string what) {
    std::lock_guard<std::mutex> lock(mu_);
    if (list_.size() == kMax) {
      list_.pop_front();
      ++dropped_;
    }
    list_.push_back({session, std::move(what)});
  }
  // The failures since the last call.
  BackgroundFailureList Take() {
    std::lock_guard<std::mutex> lock(mu_);
    BackgroundFailureList out{{list_.begin(), list_.end()}, dropped_};
    list_.clear();
    dropped_ = 0;
    return out;
  }

 private:
  std::mutex mu_;
  std::deque<BackgroundFailure> list_;
  uint64_t dropped_ = 0;
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string backend() const = 0;
  // Switches hierarchical page selection (engine/Hierarchy.h) for the selections from now on.
  virtual void SetHierarchicalSelection(HierarchicalSelection mode) = 0;

  // Creates a session over an attached host store. With `reattach`, the committed pages and the
  // tail in the store are loaded back (summaries rebuilt, window and sink made resident) and the
  // session continues where the previous process left off. Throws std::invalid_argument on bad
  // geometry/config. Returns the session handle.
  virtual int CreateSession(const Geometry& g, const RetrievalConfig& c, const HostStore& h, bool reattach) = 0;
  virtual void CloseSession(int session) = 0;
  // The kvstore committed memory for more of the session's store: pages [0, reserved_pages) of
  // every layer may now be written (the CUDA backend registers the new range for mapped access).
  // Throws std::invalid_argument when reserved_pages is below the current reservation or above
  // capacity_pages; the same value again does nothing.
  virtual void ReserveStore(int session, int reserved_pages) = 0;

  // Appends n tokens of (post-RoPE) keys and values to a layer: k, v are [n][kv_heads][head_dim].
  // Filled pages are summarised and offloaded (NHD -> HND) to the host store.
  virtual void Prefill(int session, int layer, const float* k, const float* v, int n) = 0;

  // Like Prefill, and also computes exact causal attention for the n new queries over the whole
  // context (earlier tokens included): q, out are [n][q_heads][head_dim]. Scale 1/sqrt(head_dim).
  // The last query is kept for the first decode step's blocking selection in speculative mode
  // (freekv makes it with the decode's own query: Retrieval.h, SelectsCurrentAt).
  // attend_rows (-1: all n): only the last attend_rows queries are attended and only those rows of
  // out are written; every token's k and v are appended as always (a model's last layer needs the
  // attention of no row but the one whose logits are read).
  virtual void PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n,
                             float* out, int attend_rows = -1) = 0;
  // The rows a call of n queries attends for attend_rows (the last m); std::invalid_argument when it
  // is neither -1 nor in [0, n]. Every implementation of PrefillAttend / PrefillDevice uses it.
  static int AttendedRows(int attend_rows, int n) {
    if (attend_rows < -1 || attend_rows > n)
      throw std::invalid_argument("attend_rows must be -1 (all) or in [0, n], got " + std::to_string(attend_rows));
    return attend_rows < 0 ? n : attend_rows;
  }

  // One decode step of one layer for a batch of sessions (each appears at most once). Appends
  // each item's k/v, then attends with the session's mode; in freekv/speculative modes it starts
  // the speculative selection + recall for the next step of this layer before returning or in the
  // background. Items' sessions must all have geometry compatible with the batch (same shapes).
  virtual void Decode(int layer, const std::vector<DecodeItem>& items) = 0;

  // The device-step interface of a backend with its own device and streams (DeviceEngine.h),
  // or null (CPU).
  virtual DeviceEngine* device() { return nullptr; }

  // Waits for all background work (recalls) of a session; needed before CloseSession or before
  // reading the host store from another process.
  virtual void Sync(int session) = 0;

  virtual Stats GetStats(int session) const = 0;
  virtual uint64_t ContextTokens(int session) const = 0;
  // The geometry the session was created with (a model call checks it against the model's).
  virtual Geometry SessionGeometry(int session) const = 0;
  // Failures of background work since the last call (BackgroundFailures).
  virtual BackgroundFailureList TakeBackgroundFailures() { return failures_.Take(); }

  // For tests and the fidelity harness: for (layer, kv head), the token positions attended at the
  // most recent decode step (sink + selected + window, sorted).
  virtual std::vector<int> LastAttendedTokens(int session, int layer, int kv_head) const = 0;

 protected:
  BackgroundFailures failures_;
};

// Factories. `threads` <= 0 means all cores but one (the CPU engine's background recall thread
// selects and recalls on that one). Test hooks: `debug_recall_delay_us`
// makes every background recall sleep before it writes the slots (so the next step finds it in
// flight); `debug_attend_delay_us` makes every decode sleep while it holds its layer's slots,
// before reading them (so a recall that did not wait would overwrite them under attention);
// `debug_recall_fail_every` k > 0: every k-th background recall fails after it planned its slots
// and before it wrote them (the state a recall that failed half-way leaves).
// `hier`: hierarchical page selection (engine/Hierarchy.h).
std::unique_ptr<Engine> MakeCpuEngine(int threads, int debug_recall_delay_us = 0, int debug_attend_delay_us = 0,
                                      HierarchicalSelection hier = HierarchicalSelection::Auto, int debug_recall_fail_every = 0);
// MakeCudaEngine: DeviceEngine.h.

}  // namespace freekv
