// One session of the CPU backend: its geometry, host store, and per-layer device tier.
//   Device tier of a layer (host memory standing in for GPU memory, the CUDA backend's layout):
//   sink slots, the window ring (the partial page + the most recent full pages), the selected
//   slots per KV head, and the summaries of every full page. A dense layer keeps every page; so
//   does a layer of a resident_sparse session (it attends a selection of them, read in place).
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "engine/Engine.h"
#include "engine/Manifest.h"
#include "engine/cpu/HierSelection.h"
#include "engine/cpu/PageGeometry.h"
#include "engine/cpu/SpeculativeWorker.h"

namespace freekv::cpu {

struct SelectedPage {
  int page;
  int slot;
};

// One layer's counters (engine/RetrievalStats.h). The selection counters are atomics (the
// speculative selection runs on the background thread); the cosine and overlap accumulators are
// written by the decode under `mu` and read by GetStats under it.
struct LayerCounters {
  std::atomic<uint64_t> selections{0}, corrections{0}, pages_selected{0}, pages_hit{0}, pages_recalled{0};
  mutable std::mutex mu;
  LayerStats dynamics;  // cosine_* and overlap_* only
};

struct LayerState {
  bool dense = false;      // attends every page
  bool keeps_all = false;  // keeps every page in dense_pages (dense, or resident_sparse)
  int64_t tokens = 0;
  // Device tier.
  std::vector<std::unique_ptr<uint8_t[]>> dense_pages;  // keeps_all: every page, NHD
  std::vector<uint8_t> ring;                             // window_pages NHD pages; page p at p % window_pages
  std::vector<uint8_t> sink;                             // sink_pages NHD pages
  // The selected pages' slots: select_pages NHD pages, or more with FREEKV_RESIDENT_FACTOR
  // (engine/Retrieval.h ResidentSlots), per head: slot_page.
  std::vector<uint8_t> slots;
  std::vector<std::vector<int>> slot_page;               // [Hkv][slots] page held, -1 = empty
  std::vector<std::vector<int>> slot_age;                // [Hkv][slots] selections since last chosen (engine/ResidentPool.h)
  std::vector<std::vector<SelectedPage>> selected;       // [Hkv] current selection, by page
  std::atomic<int> selected_count{0};                    // sum of selected[h].size()
  std::vector<std::vector<uint16_t>> summaries;          // [Hkv][full pages][2][D] bf16 (Summary.h)
  std::vector<std::vector<uint16_t>> group_summaries;    // [Hkv][groups][2][D] bf16 (HierSelection.h)
  // Query state (the correction's q_{t-1}; the first decode's selection query).
  std::vector<float> q_prev;
  bool has_q = false;
  bool first_decode = true;
  // The layer's speculative recall failed and its slots were forgotten: the next decode makes the
  // speculative selection itself (with q_prev), blocking, where no correction replaces it.
  bool reselect = false;
  // The heads this step's correction selected with q_t, kept for the speculative job of the same
  // step, which selects with the same q_t: where its candidates are the correction's (the window
  // did not move past a page) it takes them instead of scoring again (FREEKV_SPEC_REUSE).
  // reused_range[h] = {c0, c1} of reused[h]; {-1, -1}: none. Written by the decode before the job
  // is queued, read by the job; the next decode of the layer waits for the job first.
  std::vector<HeadSelection> reused;
  std::vector<std::pair<int, int>> reused_range;
  uint32_t record_seq = 0;
  uint64_t decodes = 0;
  // What the latest decode attended (guarded by CpuSession::attended_mu).
  std::vector<std::vector<int>> attended_pages;  // [Hkv] pages, ascending
  int64_t attended_tokens = 0;
  bool attended_all = false;
  bool attended_valid = false;
  // The selection attention read at the previous decode, per KV head (pages, ascending), for the
  // top-k overlap; valid when that decode attended a selection.
  std::vector<std::vector<int>> prev_selected;
  bool prev_selected_valid = false;
  // The speculative recall in flight for the next step, and the slot read guard.
  LayerRecall recall;
  LayerCounters counters;
};

// Session-wide counters (the per-layer ones are in LayerState::counters).
struct Counters {
  std::atomic<uint64_t> decode_steps{0}, pages_offloaded{0}, offload_bytes{0}, context_tokens{0}, resident_pages{0},
      recall_waits{0}, guard_waits{0};
};

struct CpuSession {
  int id = -1;
  Geometry geo;
  RetrievalConfig cfg;
  HostStore host;
  Layout layout{};
  PageGeometry pg;
  std::vector<std::unique_ptr<LayerState>> layers;
  std::unique_ptr<Manifest> manifest;
  std::mutex staging_mu;   // the two staging buffers are one session-wide resource
  mutable std::mutex attended_mu;
  Counters counters;

  uint8_t* StoreLayer(int layer) const { return host.store + static_cast<size_t>(layer) * layout.layer_stride; }
  uint8_t* TailLayer(int layer) const { return host.tail + static_cast<size_t>(layer) * layout.tail_layer_bytes; }
  bool Retrieves(const LayerState& L) const { return !L.dense && cfg.mode != Mode::SinkWindow; }
  bool Speculates(const LayerState& L) const {
    return !L.dense && (cfg.mode == Mode::FreeKV || cfg.mode == Mode::Speculative);
  }
  // The NHD page that holds page `page` while it is the partial (or a window) page.
  uint8_t* WorkingPage(LayerState& L, int page);
};

// Validates geometry/config/host store (std::invalid_argument naming the field) and builds the
// PageGeometry.
PageGeometry MakePageGeometry(const Geometry& g, const RetrievalConfig& c);
void ValidateSession(const Geometry& g, const RetrievalConfig& c, const HostStore& h, const Layout& layout);

}  // namespace freekv::cpu
