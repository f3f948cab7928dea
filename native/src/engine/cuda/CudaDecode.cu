// Decode on the CUDA engine: batch checks, the per-call buffers and descriptor tables, DecodeCore
// (one layer's step for a batch, on the device), Decode (host pointers), and the speculative and
// blocking select-and-recall.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "CudaBudget.h"
#include "CudaEngine.h"
#include "append.cuh"
#include "attention_decode.cuh"
#include "batch_copy.cuh"
#include "correction.cuh"
#include "cuda/cuda_check.cuh"
#include "offload.cuh"
#include "residency.cuh"
#include "selection.cuh"
#include "summary.cuh"

namespace freekv::cuda {

using std::to_string;

namespace {

// The selection of a layer's candidates [c0, c0 + n) with query q (all heads, or `head_mask`'s);
// through the layer's group bounds when `hier`.
SelectionParams SelectionFor(const Session& s, const LayerTier& L, const float* q, int c0, int n, const int* head_mask,
                             bool hier, bool fold_mean) {
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
  sp.groups = hier ? L.groups.get() : nullptr;
  sp.workspace = L.sel_ws.get();
  sp.fold_mean = fold_mean ? 1 : 0;
  return sp;
}

}  // namespace

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
    place(table, 2 * B);
    place(spec_select, B);
    place(spec_residency, B);
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
                                      DescTable& t, bool speculative, std::vector<PerItemSelect>& per_item,
                                      const int* reuse_heads) {
  LayerTier& L = *s.layers[layer];
  const int num_candidates = std::max(0, c1 - c0);
  L.last_candidates = num_candidates;
  L.selection_valid = true;
  if (L.keeps_all) {
    // Every page is in its slot: the selection is all (the attention table reads it in place).
    (speculative ? t.spec_select : t.select)
        .Add(SelectionFor(s, L, q, c0, num_candidates, head_mask, Hierarchical(s, num_candidates), fold_mean_));
    return;
  }
  if (s.cfg.recall != RecallMode::Gather) {
    per_item.push_back(PerItemSelect{&s, q, c0, c1, head_mask});
    return;
  }
  SelectionParams sp = SelectionFor(s, L, q, c0, num_candidates, head_mask, Hierarchical(s, num_candidates), fold_mean_);
  if (reuse_heads) {
    if (head_mask) throw std::logic_error("decode: a selection cannot both mask and reuse heads");
    sp.head_mask = reuse_heads;
    sp.invert_mask = 1;
  }
  (speculative ? t.spec_select : t.select).Add(sp);
  ResidencyParams rp;
  rp.selected = L.selected.get();
  rp.resident = L.resident.get();
  rp.age = L.slot_age.get();
  rp.slots = s.R;
  rp.selected_slot = L.selected_slot.get();
  rp.jobs = L.jobs.get();
  rp.job_count = L.job_count.get() + 1;  // per head (LaunchResidencyDiffBatch)
  rp.kv_heads = s.geo.kv_heads;
  rp.k = s.K;
  rp.selected_base = s.SP + s.WP;
  rp.head_mask = head_mask;
  rp.counters = s.LayerCounters(layer);
  // The recall in the diff's own launch: each (item, head) block copies its misses once its diff
  // is done (cuda/residency.cuh), instead of a gather launch that reads the job lists back.
  const RecallGeometry rg = s.Recall();
  rp.src = s.StoreLayerDev(layer);
  rp.src_page_stride = rg.src_page_stride;
  rp.pool = L.pool.get();
  rp.head_dim = rg.head_dim;
  rp.page_size = rg.page_size;
  (speculative ? t.spec_residency : t.residency).Add(rp);
}

void CudaEngine::SelectAndRecall(Session& s, int layer, const float* q, int c0, int c1, const int* head_mask,
                                 cudaStream_t stream) {
  LayerTier& L = *s.layers[layer];
  const int n = std::max(0, c1 - c0);
  const SelectionParams sp = SelectionFor(s, L, q, c0, n, head_mask, Hierarchical(s, n), fold_mean_);
  LaunchSelection(sp, stream);
  L.last_candidates = sp.num_candidates;
  ResidencyParams rp;
  rp.selected = L.selected.get();
  rp.resident = L.resident.get();
  rp.age = L.slot_age.get();
  rp.slots = s.R;
  rp.selected_slot = L.selected_slot.get();
  rp.jobs = L.jobs.get();
  rp.job_count = L.job_count.get();
  rp.kv_heads = s.geo.kv_heads;
  rp.k = s.K;
  rp.selected_base = s.SP + s.WP;
  rp.head_mask = head_mask;
  rp.counters = s.LayerCounters(layer);
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

// When Auto selects through the group bounds on the CUDA engine. Measured on the H200 (PERF.md
// "A top-k over many blocks", bench/results/gpu-visit-20261204/selection-0434.*; one layer, 28 query / 4 KV
// heads, us flat / hierarchical, drifting keys): with the flat top-k ranked in chunks the mean
// combine's loose group bounds never pay (1M tokens: 91 / 130; 512K: 61 / 99), while the max
// combine's prune most pages (2252 of 32736 scored at 1M): 1M 89 / 65, 512K 60 / 56, 128K 32 / 56.
// So Auto goes hierarchical for the max combine (and softmax-mean with one query head per KV
// head, which ranks by the raw scores as max does) above 16384 candidates (512K tokens of
// 32-token pages), and never for the mean.
constexpr int kCudaHierarchicalMinPages = kMaxSharedCandidates + 1;

bool CudaEngine::Hierarchical(const Session& s, int n) const {
  const HierarchicalSelection mode = hier_.load();
  if (mode == HierarchicalSelection::Off || n < 2) return false;
  const int combine = static_cast<int>(s.cfg.combine);
  if (!HierarchicalCombine(combine, s.geo.q_heads, s.geo.kv_heads)) return false;
  if (mode == HierarchicalSelection::On) return true;
  return combine != kCombineMean && n >= kCudaHierarchicalMinPages;
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
    if ((ss[i]->layers[layer]->tokens + 1) / ss[i]->P > ss[i]->host.reserved_pages)
      throw std::invalid_argument(at + ": session " + to_string(ids[i]) + ": " +
                                  ReservationExceeded(ss[i]->host.reserved_pages, ss[i]->host.capacity_pages));
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
    SyncStreams();
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
// selection, residency diff with the recall, attention tables, attention; then on the side stream
// the speculative selection and residency diff with its recall. Items are independent (each has its own pool,
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
  std::vector<char> attends_selection(B, 0);
  // Items whose flagged groups this step re-select with the new query (the correction): its
  // candidate range, else {-1, -1}.
  std::vector<std::pair<int, int>> corrected_range(B, {-1, -1});
  const bool reuse_corrected = ReuseCorrectedSelections();
  fold_mean_ = FoldMeanSelection();

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
                                      L.groups.get() + (size_t)(page / kSelGroupPages) * Hkv * 2 * D,
                                      static_cast<int>(s.cfg.summary), page % kSelGroupPages == 0 ? 1 : 0});
      if (page >= s.registered_pages) EnsureRegistered(s, page + 1 + kRegisterAheadPages);
      t.offload.Add(OffloadItem{slot, s.StoreLayerDev(layer) + (size_t)page * s.layout.page_bytes});
      s.host_stats.pages_offloaded += 1;
      s.host_stats.offload_bytes += s.layout.page_bytes;
    } else if (graphed) {
      // Items without a page keep the lists' lengths (part of the graph's key) the same on every step.
      if (!L.dense) t.summary.Add(PageSummaryItem{nullptr, nullptr, nullptr, 0, 0});
      t.offload.Add(OffloadItem{nullptr, nullptr});
    }
    const int64_t t_new = c + 1;
    const Ranges r = RangesFor(s, t_new);
    // Blocking selections: the first decode after a prefill (freekv with the current query,
    // speculative with the prompt's last: SelectsCurrentAt), oracle, and corrections. Every
    // decode but the first after a prefill samples the group cosines (engine/RetrievalStats.h):
    // with the correction check on a correcting layer, else with a check that flags nothing.
    unsigned long long* lc = s.LayerCounters(layer);
    unsigned long long* cosine_stats = L.has_q && !L.first_decode ? lc : nullptr;
    if (s.Retrieves(L)) {
      L.selections += Hkv;
      if (SelectsCurrentAt(s.cfg.mode, L.first_decode)) {
        QueueSelectAndRecall(s, layer, L.q[qnew].get(), r.sink_end, r.window_begin, nullptr, t, false, per_item);
      } else if (L.first_decode || !L.selection_valid) {
        QueueSelectAndRecall(s, layer, L.has_q ? L.q[L.qcur].get() : L.q[qnew].get(), r.sink_end, r.window_begin,
                             nullptr, t, false, per_item);
      } else if (s.cfg.mode == Mode::FreeKV) {
        t.correction.Add(CorrectionItem{L.q[qnew].get(), L.q[L.qcur].get(), L.flags.get(), lc + kCorrections,
                                        cosine_stats, s.cfg.tau, 0});
        cosine_stats = nullptr;  // sampled by this check
        QueueSelectAndRecall(s, layer, L.q[qnew].get(), r.sink_end, r.window_begin, L.flags.get(), t, false,
                             per_item);
        corrected_range[i] = {r.sink_end, r.window_begin};
      }
    }
    if (cosine_stats) t.correction.Add(CorrectionItem{L.q[qnew].get(), L.q[L.qcur].get(), nullptr, nullptr, cosine_stats, s.cfg.tau, 0});
    // The attention table: into the batch's rows and the layer's own (introspection; it also
    // keeps the selection for the next step's top-k overlap).
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
    tp.in_place = L.keeps_all && !L.dense;
    tp.selected = sel ? L.selected.get() : nullptr;
    tp.selected_slot = sel && !tp.in_place ? L.selected_slot.get() : nullptr;
    tp.max_pages = rows;
    tp.page_slot = tb_slot + (size_t)i * Hkv * rows;
    tp.page_tokens = tb_tokens + (size_t)i * Hkv * rows;
    tp.page_id = tb_id + (size_t)i * Hkv * rows;
    tp.num_pages = tb_num + (size_t)i * Hkv;
    t.table.Add(tp);
    attends_selection[i] = sel;
    tp.prev_selected = sel ? L.prev_selected.get() : nullptr;
    tp.overlap = sel && !L.first_decode && L.prev_selected_valid ? lc + kOverlapPages : nullptr;
    static_assert(kHits == kSelected + 1, "the in-place table counts selected and hit pages as a pair");
    tp.hits = sel && tp.in_place ? lc + kSelected : nullptr;
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
    const int c0 = next.sink_end, c1 = std::min(next.window_begin, now.full);
    // A group the correction re-selected this step already holds this selection: the same query
    // (the new one) over the same candidates, unless the window moved past a page. Its scoring
    // is left out; the residency diff and recall still run for every group (they find its pages
    // resident), so the pages, the counters and the outputs are the same either way.
    const int* reuse = reuse_corrected && corrected_range[i] == std::make_pair(c0, c1) ? L.flags.get() : nullptr;
    QueueSelectAndRecall(s, layer, L.q[1 - L.qcur].get(), c0, c1, nullptr, t, true, per_item_spec, reuse);
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
  if (graphed && !(per_item.empty() && per_item_spec.empty()))
    throw std::logic_error("decode: a graphed step cannot hold double-buffer sessions");
  for (const PerItemSelect& x : per_item) SelectAndRecall(*x.s, layer, x.q, x.c0, x.c1, x.head_mask, st);
  G.Op(st, LaunchAttendTableBatch, t.table.dev, static_cast<const AttendTableParams*>(t.table.host), t.table.n);

  // 4. Attention for the whole batch.
  DecodeAttentionParams dp;
  std::memset(&dp, 0, sizeof dp);  // padding too: the params are part of a graph's key
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
    L.prev_selected_valid = attends_selection[i] != 0;
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
  for (Session* s : ss) EndPrefill(*s);  // decoding: the prefill context is no longer needed
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

}  // namespace freekv::cuda
