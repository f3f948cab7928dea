// The CPU backend of the FreeKV engine (freekv::Engine). Orchestrates a decode step of a layer:
// wait for the layer's speculative recall, append the token (offload on page fill), blocking or
// corrective selection when needed, attention, then the next step's speculative selection and
// recall on the background thread.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>

#include "engine/Engine.h"
#include "engine/cpu/CpuSession.h"
#include "engine/cpu/HierSelection.h"
#include "engine/cpu/Recall.h"
#include "engine/cpu/SpeculativeWorker.h"

namespace freekv::cpu {

// The pages of one selection (chosen = hit + recalled), counted once its recall is done.
struct SelectionCounts {
  uint64_t selected = 0, hit = 0, recalled = 0;
};

class CpuEngine : public Engine {
 public:
  CpuEngine(int threads, int debug_recall_delay_us, int debug_attend_delay_us,
            HierarchicalSelection hier = HierarchicalSelection::Auto, int debug_recall_fail_every = 0);
  ~CpuEngine() override;
  void SetHierarchicalSelection(HierarchicalSelection mode) override { hier_.store(mode); }
  std::string backend() const override { return "cpu"; }
  int CreateSession(const Geometry& g, const RetrievalConfig& c, const HostStore& h, bool reattach) override;
  void CloseSession(int session) override;
  void ReserveStore(int session, int reserved_pages) override;
  void Prefill(int session, int layer, const float* k, const float* v, int n) override;
  void PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n, float* out,
                     int attend_rows = -1) override;
  void Decode(int layer, const std::vector<DecodeItem>& items) override;
  void Sync(int session) override;
  Stats GetStats(int session) const override;
  uint64_t ContextTokens(int session) const override;
  Geometry SessionGeometry(int session) const override;
  std::vector<int> LastAttendedTokens(int session, int layer, int kv_head) const override;

 private:
  std::shared_ptr<CpuSession> Find(int session) const;
  LayerState& CheckLayer(CpuSession& s, int layer) const;
  // Appends n tokens ([n][Hkv][D] k, v) to a layer: NHD rows, tail write-through, offload and
  // summary of every page that fills, manifest.
  void Append(CpuSession& s, int layer, const float* k, const float* v, int n);
  void OnPageFilled(CpuSession& s, int layer, int page, const uint8_t* nhd);
  static void StoreSummary(const PageGeometry& pg, LayerState& L, int page, const uint16_t* all_heads);
  void UpdateContext(CpuSession& s);
  void UpdateResident(CpuSession& s);
  void WriteQueryRecord(CpuSession& s, int layer);
  // Makes the chosen pages of head h resident (hits reused, misses planned into slots).
  void ApplySelection(CpuSession& s, LayerState& L, int h, const HeadSelection& sel, std::vector<RecallOp>& ops,
                      SelectionCounts& counts);
  // Adds a selection's pages to the layer's counters once its recall has been written: a recall
  // that failed counts none of its pages (its slots are forgotten, and the selection is made again).
  static void Count(LayerState& L, const SelectionCounts& c);
  // Head h's selection among pages [c0, c1): flat or through the group bounds (hier_).
  HeadSelection Select(CpuSession& s, LayerState& L, int h, const float* q, int c0, int c1) const;
  void RunRecall(CpuSession& s, int layer, const std::vector<RecallOp>& ops);
  // The speculative job: selection with q for the step after the current one, then (once the
  // current attention released the layer's slots) residency and recall.
  // `background`: run by the worker (debugRecallFailEvery applies only there).
  void SpeculativeJob(CpuSession& s, int layer, const std::vector<float>& q, bool background = false);
  void QueueSpeculative(const std::shared_ptr<CpuSession>& s, int layer, const float* q);
  // Waits for a layer's speculative recall (`waited`: whether it was still running). A failed one
  // is the session's alone and is not thrown: it is reported through the background failures
  // (`where` says what came of it) and the layer forgets which pages its slots hold (the recall
  // may have planned slots it never wrote), so the next selection recalls every page it picks.
  // Returns true after such a failure.
  bool WaitRecall(CpuSession& s, int layer, const char* where, bool* waited = nullptr);
  // Forgets which pages a layer's slots hold and marks its selection to be made again (reselect):
  // after a recall that may have planned slots it never wrote.
  static void ForgetSlots(LayerState& L);
  void Reattach(CpuSession& s);

  int threads_;
  int debug_recall_delay_us_;
  int debug_attend_delay_us_;
  int debug_recall_fail_every_;
  std::atomic<uint64_t> recalls_run_{0};
  std::atomic<HierarchicalSelection> hier_;
  std::mutex mu_;                 // serialises the engine's calls
  mutable std::mutex map_mu_;     // guards sessions_ (short lookups)
  std::map<int, std::shared_ptr<CpuSession>> sessions_;
  int next_id_ = 1;
  std::unique_ptr<SpeculativeWorker> worker_;
};

}  // namespace freekv::cpu
