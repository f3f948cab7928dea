#include "engine/cpu/CpuEngine.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "engine/cpu/Attention.h"
#include "engine/cpu/Correction.h"
#include "engine/cpu/KvElement.h"
#include "engine/cpu/Offload.h"
#include "engine/cpu/ParallelFor.h"
#include "engine/cpu/Residency.h"
#include "engine/cpu/Selection.h"
#include "engine/cpu/Summary.h"

namespace freekv {
std::unique_ptr<Engine> MakeCpuEngine(int threads, int debug_recall_delay_us, int debug_attend_delay_us,
                                      HierarchicalSelection hier, int debug_recall_fail_every) {
  return std::make_unique<cpu::CpuEngine>(threads, debug_recall_delay_us, debug_attend_delay_us, hier, debug_recall_fail_every);
}
}  // namespace freekv

namespace freekv::cpu {

using std::to_string;

CpuEngine::CpuEngine(int threads, int debug_recall_delay_us, int debug_attend_delay_us, HierarchicalSelection hier,
                     int debug_recall_fail_every)
    // By default one core is left to the background recall thread (selection + recall run there
    // while the calling thread's attention runs on the others).
    : threads_(threads > 0 ? threads : std::max(1, omp_get_num_procs() - 1)),
      debug_recall_delay_us_(std::max(0, debug_recall_delay_us)),
      debug_attend_delay_us_(std::max(0, debug_attend_delay_us)),
      debug_recall_fail_every_(std::max(0, debug_recall_fail_every)),
      hier_(hier),
      worker_(std::make_unique<SpeculativeWorker>()) {}

CpuEngine::~CpuEngine() { worker_.reset(); }  // drains the queued recalls first

std::shared_ptr<CpuSession> CpuEngine::Find(int session) const {
  std::lock_guard<std::mutex> l(map_mu_);
  auto it = sessions_.find(session);
  if (it == sessions_.end()) throw std::invalid_argument("session " + to_string(session) + " is not open");
  return it->second;
}

LayerState& CpuEngine::CheckLayer(CpuSession& s, int layer) const {
  if (layer < 0 || layer >= s.geo.layers)
    throw std::invalid_argument("layer " + to_string(layer) + " is out of range [0, " + to_string(s.geo.layers) + ")");
  return *s.layers[layer];
}

// ---------------------------------------------------------------------------------------------
// Sessions

int CpuEngine::CreateSession(const Geometry& g, const RetrievalConfig& c, const HostStore& h, bool reattach) {
  std::lock_guard<std::mutex> lock(mu_);
  if (c.page_size < 1) throw std::invalid_argument("retrieval.pageSize must be >= 1");
  if (h.capacity_pages < 1) throw std::invalid_argument("host.capacityPages must be >= 1");
  if (g.kv_heads < 1 || g.layers < 1) throw std::invalid_argument("geometry.kvHeads and geometry.layers must be >= 1");
  const Layout layout = ComputeLayout(g, c, h.capacity_pages);
  ValidateSession(g, c, h, layout);
  auto s = std::make_shared<CpuSession>();
  s->geo = g;
  s->cfg = c;
  s->host = h;
  s->layout = layout;
  s->pg = MakePageGeometry(g, c);
  s->manifest = std::make_unique<Manifest>(h.manifest, layout, g.layers, g.q_heads * g.head_dim);
  const auto& pg = s->pg;
  const int resident_factor = ResidentFactor();  // throws on a bad FREEKV_RESIDENT_FACTOR
  for (int l = 0; l < g.layers; ++l) {
    auto L = std::make_unique<LayerState>();
    L->dense = c.mode == Mode::Dense || std::find(c.dense_layers.begin(), c.dense_layers.end(), l) != c.dense_layers.end();
    L->keeps_all = L->dense || KeepsAllPages(c.mode);
    if (!L->dense) {
      // A budget larger than the store is never filled past it (page indices stay <= capacity,
      // so page % window_pages is the page itself there): the tier holds no more pages than the
      // store can, whatever sink, window and selection were asked for.
      const size_t cap = static_cast<size_t>(h.capacity_pages);
      L->ring.assign(std::min<size_t>(pg.window_pages, cap + 1) * pg.nhd_page_bytes, 0);
      L->sink.assign(std::min<size_t>(pg.sink_pages, cap + 1) * pg.nhd_page_bytes, 0);
      const int slot_pages = std::min(ResidentSlots(pg.select_pages, h.capacity_pages, resident_factor), h.capacity_pages);
      L->slots.assign(static_cast<size_t>(slot_pages) * pg.nhd_page_bytes, 0);
      L->slot_page.assign(pg.Hkv, std::vector<int>(slot_pages, -1));
      L->slot_age.assign(pg.Hkv, std::vector<int>(slot_pages, 0));
      L->selected.assign(pg.Hkv, {});
      L->prev_selected.assign(pg.Hkv, {});
    }
    // Every layer has a (possibly empty) row per KV head: a dense layer's stay empty.
    L->summaries.assign(pg.Hkv, {});
    L->group_summaries.assign(pg.Hkv, {});
    L->q_prev.assign(static_cast<size_t>(pg.Hq) * pg.D, 0.f);
    L->reused.assign(pg.Hkv, {});
    L->reused_range.assign(pg.Hkv, {-1, -1});
    L->attended_pages.assign(pg.Hkv, {});
    s->layers.push_back(std::move(L));
  }
  if (reattach)
    Reattach(*s);
  else
    s->manifest->Initialise();
  UpdateResident(*s);
  std::lock_guard<std::mutex> l(map_mu_);
  s->id = next_id_++;
  sessions_[s->id] = s;
  return s->id;
}

// The CPU backend reads and writes the store through the mapping: only the bound moves.
void CpuEngine::ReserveStore(int session, int reserved_pages) {
  std::lock_guard<std::mutex> lock(mu_);
  auto s = Find(session);
  CheckReservation(s->host, reserved_pages);
  s->host.reserved_pages = reserved_pages;
}

void CpuEngine::CloseSession(int session) {
  std::lock_guard<std::mutex> lock(mu_);
  auto s = Find(session);
  // A failed background recall does not keep a session from closing; it is reported.
  for (size_t l = 0; l < s->layers.size(); ++l) WaitRecall(*s, static_cast<int>(l), "before the session closed");
  std::lock_guard<std::mutex> l(map_mu_);
  sessions_.erase(session);
}

void CpuEngine::Sync(int session) {
  std::lock_guard<std::mutex> lock(mu_);
  auto s = Find(session);
  for (size_t l = 0; l < s->layers.size(); ++l) WaitRecall(*s, static_cast<int>(l), "the next selection recalls the layer's pages again");
}

// ---------------------------------------------------------------------------------------------
// Append, offload, manifest

void CpuEngine::Append(CpuSession& s, int layer, const float* k, const float* v, int n) {
  LayerState& L = *s.layers[layer];
  const auto& pg = s.pg;
  for (int t = 0; t < n; ++t) {
    const int page = static_cast<int>(L.tokens / pg.P);
    const int pos = static_cast<int>(L.tokens % pg.P);
    uint8_t* buf = s.WorkingPage(L, page);
    for (int h = 0; h < pg.Hkv; ++h) {
      const size_t src = (static_cast<size_t>(t) * pg.Hkv + h) * pg.D;
      StoreRow(pg.dtype, k + src, buf + pg.NhdK(pos, h), pg.D);
      StoreRow(pg.dtype, v + src, buf + pg.NhdV(pos, h), pg.D);
    }
    WriteTailRow(pg, s.TailLayer(layer), pos, buf);
    ++L.tokens;
    if (pos == pg.P - 1) OnPageFilled(s, layer, page, buf);
  }
  s.manifest->SetLayer(layer, static_cast<uint32_t>(L.tokens / pg.P), static_cast<uint32_t>(L.tokens % pg.P));
  UpdateContext(s);
}

void CpuEngine::OnPageFilled(CpuSession& s, int layer, int page, const uint8_t* nhd) {
  LayerState& L = *s.layers[layer];
  const auto& pg = s.pg;
  OffloadPage(pg, nhd, s.StoreLayer(layer) + static_cast<size_t>(page) * pg.hnd_page_bytes);
  s.manifest->SetLayer(layer, static_cast<uint32_t>(page + 1), 0);
  s.counters.pages_offloaded += 1;
  s.counters.offload_bytes += pg.hnd_page_bytes;
  if (L.dense) return;
  thread_local std::vector<uint16_t> all_heads;
  all_heads.resize(SummaryFloatsPerPage(pg));
  SummarisePage(pg, s.cfg.summary, nhd, all_heads.data());
  StoreSummary(pg, L, page, all_heads.data());
  if (page < pg.sink_pages) std::memcpy(L.sink.data() + static_cast<size_t>(page) * pg.nhd_page_bytes, nhd, pg.nhd_page_bytes);
}

// Appends page `page`'s summary (SummarisePage's [Hkv][2][D]) to each head's row of the layer and
// folds it into the head's group bounds. Pages arrive in order.
void CpuEngine::StoreSummary(const PageGeometry& pg, LayerState& L, int page, const uint16_t* all_heads) {
  const size_t row = SummaryRow(pg);
  for (int h = 0; h < pg.Hkv; ++h) {
    auto& mine = L.summaries[h];
    mine.resize(static_cast<size_t>(page + 1) * row);
    std::memcpy(mine.data() + static_cast<size_t>(page) * row, all_heads + static_cast<size_t>(h) * row, row * sizeof(uint16_t));
    FoldPageIntoGroup(pg, mine.data(), page, L.group_summaries[h]);
  }
}

void CpuEngine::UpdateContext(CpuSession& s) {
  int64_t m = std::numeric_limits<int64_t>::max();
  for (auto& L : s.layers) m = std::min(m, L->tokens);
  s.manifest->SetContext(static_cast<uint64_t>(m));
  s.counters.context_tokens = static_cast<uint64_t>(m);
}

void CpuEngine::UpdateResident(CpuSession& s) {
  uint64_t total = 0;
  for (auto& L : s.layers) {
    const auto r = RangesFor(s.pg, L->tokens);
    const uint64_t partial = r.partial > 0 ? 1 : 0;
    if (L->keeps_all) {
      total += static_cast<uint64_t>(s.pg.Hkv) * (r.full + partial);
    } else {
      total += static_cast<uint64_t>(s.pg.Hkv) * (r.sink_end + (r.full - r.window_begin) + partial);
      total += static_cast<uint64_t>(L->selected_count.load());
    }
  }
  s.counters.resident_pages = total;
}

void CpuEngine::WriteQueryRecord(CpuSession& s, int layer) {
  LayerState& L = *s.layers[layer];
  const uint32_t flags = (L.has_q ? kQueryValid : 0u) | (L.first_decode ? kFirstDecodePending : 0u);
  s.manifest->WriteQuery(layer, ++L.record_seq, static_cast<uint64_t>(L.tokens), flags, L.has_q ? L.q_prev.data() : nullptr);
}

// ---------------------------------------------------------------------------------------------
// Selection and recall

HeadSelection CpuEngine::Select(CpuSession& s, LayerState& L, int h, const float* q, int c0, int c1) const {
  const bool hier = UseHierarchical(hier_.load(), c1 - c0);
  return cpu::SelectHead(s.pg, s.cfg.combine, L.summaries[h].data(), hier ? L.group_summaries[h].data() : nullptr, h, q, c0, c1, hier);
}

void CpuEngine::Count(LayerState& L, const SelectionCounts& c) {
  L.counters.pages_selected += c.selected;
  L.counters.pages_hit += c.hit;
  L.counters.pages_recalled += c.recalled;
}

void CpuEngine::ApplySelection(CpuSession& s, LayerState& L, int h, const HeadSelection& selection, std::vector<RecallOp>& ops,
                               SelectionCounts& counts) {
  const auto& chosen = selection.chosen;
  if (L.keeps_all) {
    // Every page is already here: the selection is read in place (every page a hit, no recall).
    auto& sel = L.selected[h];
    const int before = static_cast<int>(sel.size());
    sel.clear();
    for (int p : chosen) sel.push_back({p, -1});
    std::sort(sel.begin(), sel.end(), [](const SelectedPage& a, const SelectedPage& b) { return a.page < b.page; });
    L.selected_count += static_cast<int>(sel.size()) - before;
    counts.selected += chosen.size();
    counts.hit += chosen.size();
    return;
  }
  auto& slot_page = L.slot_page[h];
  const auto plan = PlanResidency(slot_page, L.slot_age[h], chosen, s.pg.select_pages);
  for (const auto& m : plan.misses) ops.push_back({h, m.page, m.slot});
  std::unordered_map<int, int> where;
  for (int slot = 0; slot < static_cast<int>(slot_page.size()); ++slot)
    if (slot_page[slot] >= 0) where[slot_page[slot]] = slot;
  auto& sel = L.selected[h];
  const int before = static_cast<int>(sel.size());
  sel.clear();
  for (int p : chosen) sel.push_back({p, where.at(p)});
  std::sort(sel.begin(), sel.end(), [](const SelectedPage& a, const SelectedPage& b) { return a.page < b.page; });
  L.selected_count += static_cast<int>(sel.size()) - before;
  counts.selected += chosen.size();
  counts.hit += plan.hits;
  counts.recalled += plan.misses.size();
}

void CpuEngine::RunRecall(CpuSession& s, int layer, const std::vector<RecallOp>& ops) {
  if (ops.empty()) return;
  LayerState& L = *s.layers[layer];
  const uint8_t* store_layer = s.StoreLayer(layer);
  if (s.cfg.recall == RecallMode::DoubleBuffer) {
    std::lock_guard<std::mutex> l(s.staging_mu);
    RecallDoubleBuffer(s.pg, store_layer, L.slots.data(), ops, s.host.staging, s.layout.staging_buffer_bytes);
  } else {
    RecallGather(s.pg, store_layer, L.slots.data(), ops);
  }
}

void CpuEngine::SpeculativeJob(CpuSession& s, int layer, const std::vector<float>& q, bool background) {
  LayerState& L = *s.layers[layer];
  const int H = s.pg.Hkv;
  // The pages selectable at the next step: its middle range, among the pages full now.
  const auto now = RangesFor(s.pg, L.tokens);
  const auto next = RangesFor(s.pg, L.tokens + 1);
  const int c0 = next.sink_end, c1 = std::min(next.window_begin, now.full);
  // 1. Selection with q_t. It reads only the summaries, so it runs while this step's attention
  //    still reads the slots (heads in parallel: with a single layer it is on the critical path).
  std::vector<HeadSelection> chosen(H);
  const int group = s.pg.Hq / H;
  ParallelFor(H, threads_, [&](int h) {
    if (L.reused_range[h] == std::make_pair(c0, c1)) {
      // The correction's selection of this step: the same query over the same candidates.
      chosen[h] = std::move(L.reused[h]);
      chosen[h].q = q.data() + static_cast<size_t>(h) * group * s.pg.D;  // the same values, kept by this job
    } else {
      chosen[h] = Select(s, L, h, q.data(), c0, c1);
    }
    L.reused_range[h] = {-1, -1};
  });
  // 2. Residency and recall write the slots: only once no attention reads this layer's slots.
  //    The decode that queued this job holds a read of the layer until its attention returned.
  if (L.recall.WaitNoReaders()) s.counters.guard_waits += 1;
  if (debug_recall_delay_us_ > 0) std::this_thread::sleep_for(std::chrono::microseconds(debug_recall_delay_us_));
  std::vector<RecallOp> ops;
  SelectionCounts counts;
  for (int h = 0; h < H; ++h) ApplySelection(s, L, h, chosen[h], ops, counts);
  if (background && debug_recall_fail_every_ > 0 && ++recalls_run_ % debug_recall_fail_every_ == 0)
    throw std::runtime_error("injected recall failure (debugRecallFailEvery)");
  RunRecall(s, layer, ops);
  Count(L, counts);
}

bool CpuEngine::WaitRecall(CpuSession& s, int layer, const char* where, bool* waited) {
  LayerState& L = *s.layers[layer];
  std::string what;
  try {
    // Wait writes *waited before it rethrows: a failed recall the call had to wait for is a wait too.
    L.recall.Wait(waited);
    return false;
  } catch (const std::exception& e) {
    what = e.what();
  } catch (...) {
    what = "unknown error";
  }
  failures_.Add(s.id, "the speculative recall of layer " + to_string(layer) + " failed (" + where + "): " + what);
  ForgetSlots(L);
  UpdateResident(s);
  return true;
}

void CpuEngine::ForgetSlots(LayerState& L) {
  for (auto& row : L.slot_page) std::fill(row.begin(), row.end(), -1);
  for (auto& row : L.slot_age) std::fill(row.begin(), row.end(), 0);
  for (auto& sel : L.selected) sel.clear();
  L.selected_count = 0;
  L.reselect = true;
}

void CpuEngine::QueueSpeculative(const std::shared_ptr<CpuSession>& s, int layer, const float* q) {
  LayerState& L = *s->layers[layer];
  std::vector<float> qv(q, q + static_cast<size_t>(s->pg.Hq) * s->pg.D);
  worker_->Submit(&L.recall, [this, s, layer, qv = std::move(qv)] { SpeculativeJob(*s, layer, qv, true); });
}

// ---------------------------------------------------------------------------------------------
// Prefill

void CpuEngine::Prefill(int session, int layer, const float* k, const float* v, int n) {
  std::lock_guard<std::mutex> lock(mu_);
  auto s = Find(session);
  LayerState& L = CheckLayer(*s, layer);
  if (n < 1) throw std::invalid_argument("n must be >= 1");
  if (!k || !v) throw std::invalid_argument("k and v must not be null");
  if ((L.tokens + n) / s->pg.P > s->host.capacity_pages)
    throw std::invalid_argument("prefill of " + to_string(n) + " tokens would exceed the store's capacity of " +
                                to_string(s->host.capacity_pages) + " pages");
  if ((L.tokens + n) / s->pg.P > s->host.reserved_pages)
    throw std::invalid_argument(ReservationExceeded(s->host.reserved_pages, s->host.capacity_pages));
  WaitRecall(*s, layer, "the next selection recalls the layer's pages again");
  Append(*s, layer, k, v, n);
  L.has_q = false;
  L.first_decode = true;
  WriteQueryRecord(*s, layer);
  UpdateResident(*s);
}

void CpuEngine::PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n, float* out,
                              int attend_rows) {
  std::lock_guard<std::mutex> lock(mu_);
  auto s = Find(session);
  LayerState& L = CheckLayer(*s, layer);
  if (n < 1) throw std::invalid_argument("n must be >= 1");
  if (!q || !k || !v || !out) throw std::invalid_argument("q, k, v and out must not be null");
  const int m = AttendedRows(attend_rows, n);  // rows [n - m, n) are attended
  const auto& pg = s->pg;
  if ((L.tokens + n) / pg.P > s->host.capacity_pages)
    throw std::invalid_argument("prefill of " + to_string(n) + " tokens would exceed the store's capacity of " +
                                to_string(s->host.capacity_pages) + " pages");
  if ((L.tokens + n) / pg.P > s->host.reserved_pages)
    throw std::invalid_argument(ReservationExceeded(s->host.reserved_pages, s->host.capacity_pages));
  WaitRecall(*s, layer, "the next selection recalls the layer's pages again");
  const int start = static_cast<int>(L.tokens);
  Append(*s, layer, k, v, n);
  const int T = static_cast<int>(L.tokens);
  const auto r = RangesFor(pg, T);
  const int group = pg.Hq / pg.Hkv;
  const size_t qs = static_cast<size_t>(pg.Hq) * pg.D;
  const size_t ctx = m > 0 ? static_cast<size_t>(T) * pg.D : 0;  // nothing to read when no row is attended
  std::vector<float> K(ctx), V(ctx);
  const uint8_t* store = s->StoreLayer(layer);
  const uint8_t* partial = s->WorkingPage(L, r.full);
  // Row tiles: each task runs a tile of query rows (all heads of the group) against the context in
  // key tiles (AttendPrefillGroup), so a larger tile reads K and V fewer times; small enough that
  // there are several tiles per thread on short chunks, and the heavy (late, causal) tiles first.
  const int rows_per_task = std::clamp(m / (4 * std::max(1, threads_)), 8, 64);
  const int blocks = (m + rows_per_task - 1) / rows_per_task;
  const int skip = n - m;
  for (int h = 0; h < pg.Hkv && m > 0; ++h) {
    // The whole context of head h: full pages from the host store (HND rows are contiguous per
    // head), the partial page from the device tier.
    ParallelFor(r.full, threads_, [&](int p) {
      const uint8_t* hp = store + static_cast<size_t>(p) * pg.hnd_page_bytes;
      LoadRow(pg.dtype, hp + pg.HndK(0, h), K.data() + static_cast<size_t>(p) * pg.P * pg.D, pg.P * pg.D);
      LoadRow(pg.dtype, hp + pg.HndV(0, h), V.data() + static_cast<size_t>(p) * pg.P * pg.D, pg.P * pg.D);
    });
    for (int i = 0; i < r.partial; ++i) {
      const size_t t = static_cast<size_t>(r.full) * pg.P + i;
      LoadRow(pg.dtype, partial + pg.NhdK(i, h), K.data() + t * pg.D, pg.D);
      LoadRow(pg.dtype, partial + pg.NhdV(i, h), V.data() + t * pg.D, pg.D);
    }
    ParallelFor(blocks, threads_, [&](int b) {
      const int i0 = skip + (blocks - 1 - b) * rows_per_task, cnt = std::min(rows_per_task, n - i0);
      const size_t head_off = static_cast<size_t>(h) * group * pg.D;
      AttendPrefillGroup(pg.D, group, K.data(), V.data(), start + i0, cnt, q + i0 * qs + head_off, qs, out + i0 * qs + head_off, qs);
    });
  }
  std::copy(q + static_cast<size_t>(n - 1) * qs, q + static_cast<size_t>(n) * qs, L.q_prev.begin());
  L.has_q = true;
  L.first_decode = true;
  WriteQueryRecord(*s, layer);
  UpdateResident(*s);
}

// ---------------------------------------------------------------------------------------------
// Decode

void CpuEngine::Decode(int layer, const std::vector<DecodeItem>& items) {
  std::lock_guard<std::mutex> lock(mu_);
  const int n = static_cast<int>(items.size());
  std::vector<std::shared_ptr<CpuSession>> ss(n);
  std::unordered_set<int> seen;
  for (int i = 0; i < n; ++i) {
    const auto& it = items[i];
    ss[i] = Find(it.session);
    const std::string at = "items[" + to_string(i) + "]";
    CheckLayer(*ss[i], layer);
    if (!seen.insert(it.session).second) throw std::invalid_argument(at + ": session " + to_string(it.session) + " appears twice in the batch");
    if (!it.q || !it.k || !it.v || !it.out) throw std::invalid_argument(at + ": q, k, v and out must not be null");
    const LayerState& L = *ss[i]->layers[layer];
    if ((L.tokens + 1) / ss[i]->pg.P > ss[i]->host.capacity_pages)
      throw std::invalid_argument(at + ": session " + to_string(it.session) + " is at the store's capacity of " +
                                  to_string(ss[i]->host.capacity_pages) + " pages");
    if ((L.tokens + 1) / ss[i]->pg.P > ss[i]->host.reserved_pages)
      throw std::invalid_argument(at + ": session " + to_string(it.session) + ": " +
                                  ReservationExceeded(ss[i]->host.reserved_pages, ss[i]->host.capacity_pages));
  }
  // 1. The layer's speculative recall (issued at the previous step) must be complete. A failed
  // one is its session's alone: the session's earlier layers of this step are already appended,
  // and so are every other session's, so failing the call would leave every session of the batch
  // half a step ahead. The layer's slots are forgotten and step 3 makes the same speculative
  // selection itself and recalls every page it picks, blocking: the step attends exactly what it
  // would have. The failure is reported through the engine's background failures; only a failure
  // of that blocking recall fails the call.
  for (int i = 0; i < n; ++i) {
    bool waited = false;
    WaitRecall(*ss[i], layer, "this step made the speculative selection again and recalled its pages, blocking", &waited);
    if (waited) ss[i]->counters.recall_waits += 1;
  }
  // 2. Append the new key/value (offload on page fill).
  for (int i = 0; i < n; ++i) Append(*ss[i], layer, items[i].k, items[i].v, 1);
  // 3. Blocking selections: first decode after prefill (freekv with the current query, speculative
  // with the prompt's last: SelectsCurrentAt), oracle, corrections, and the selection of a
  // speculative recall that failed.
  struct SelTask {
    int item, head;
    const float* q;
    bool speculative = false;  // the selection of a failed speculative recall, over its range
    bool correction = false;   // a corrected head (kept for the speculative job: FREEKV_SPEC_REUSE)
  };
  const bool reuse = ReuseCorrectedSelections();
  std::vector<SelTask> sel;
  for (int i = 0; i < n; ++i) {
    CpuSession& s = *ss[i];
    LayerState& L = *s.layers[layer];
    const int group = s.pg.Hq / s.pg.Hkv;
    // The adjacent-query cosine of every group (engine/RetrievalStats.h: every mode and layer).
    std::vector<float> cosine;
    if (L.has_q && !L.first_decode) {
      cosine.resize(s.pg.Hkv);
      std::lock_guard<std::mutex> l(L.counters.mu);
      LayerStats& d = L.counters.dynamics;
      for (int h = 0; h < s.pg.Hkv; ++h) {
        const size_t off = static_cast<size_t>(h) * group * s.pg.D;
        const float c = GroupCosine(items[i].q + off, L.q_prev.data() + off, group, s.pg.D);
        cosine[h] = c;
        d.cosine_min = d.cosine_samples == 0 ? c : std::min(d.cosine_min, c);
        d.cosine_samples += 1;
        if (NeedsCorrection(c, s.cfg.tau)) d.cosine_below_tau += 1;
        d.cosine_sum += c;
        d.cosine_sum_sq += static_cast<double>(c) * c;
        d.cosine_hist[CosineBucket(c)] += 1;
      }
    }
    if (!s.Retrieves(L)) continue;
    L.counters.selections += s.pg.Hkv;
    for (int h = 0; h < s.pg.Hkv; ++h) {
      if (SelectsCurrentAt(s.cfg.mode, L.first_decode)) {
        sel.push_back({i, h, items[i].q});
      } else if (L.first_decode) {
        sel.push_back({i, h, L.has_q ? L.q_prev.data() : items[i].q});
      } else if (s.cfg.mode == Mode::FreeKV && NeedsCorrection(cosine.empty() ? 0.f : cosine[h], s.cfg.tau)) {
        sel.push_back({i, h, items[i].q, false, reuse});
        L.counters.corrections += 1;
      } else if (L.reselect) {
        // The failed speculative recall's selection, made here (WaitRecall).
        sel.push_back({i, h, L.q_prev.data(), true});
      }
    }
    L.reselect = false;
  }
  if (!sel.empty()) {
    std::vector<std::vector<RecallOp>> ops(sel.size());
    std::vector<SelectionCounts> counts(sel.size());
    ParallelFor(static_cast<int>(sel.size()), threads_, [&](int t) {
      CpuSession& s = *ss[sel[t].item];
      LayerState& L = *s.layers[layer];
      const auto r = RangesFor(s.pg, L.tokens);
      // The speculative job chose among the pages full before this step's token (SpeculativeJob):
      // with a one-page window the page this token filled is not among them.
      const int c1 = sel[t].speculative ? std::min(r.window_begin, RangesFor(s.pg, L.tokens - 1).full) : r.window_begin;
      HeadSelection hs = Select(s, L, sel[t].head, sel[t].q, r.sink_end, c1);
      ApplySelection(s, L, sel[t].head, hs, ops[t], counts[t]);
      if (sel[t].correction) {
        L.reused[sel[t].head] = std::move(hs);
        L.reused_range[sel[t].head] = {r.sink_end, c1};
      }
    });
    std::vector<std::vector<RecallOp>> per_item(n);
    for (size_t t = 0; t < sel.size(); ++t)
      per_item[sel[t].item].insert(per_item[sel[t].item].end(), ops[t].begin(), ops[t].end());
    try {
      ParallelFor(n, threads_, [&](int i) { RunRecall(*ss[i], layer, per_item[i]); });
    } catch (...) {
      // The call fails; the slots it planned may be unwritten: the next decode selects again.
      for (int i = 0; i < n; ++i)
        if (!per_item[i].empty()) {
          ForgetSlots(*ss[i]->layers[layer]);
          UpdateResident(*ss[i]);
        }
      throw;
    }
    for (size_t t = 0; t < sel.size(); ++t) Count(*ss[sel[t].item]->layers[layer], counts[t]);
  }
  // 4. Attention over sink + selected + window (or every page of a dense layer), per KV head.
  std::vector<int> task_item, task_head;
  for (int i = 0; i < n; ++i)
    for (int h = 0; h < ss[i]->pg.Hkv; ++h) {
      task_item.push_back(i);
      task_head.push_back(h);
    }
  std::vector<std::vector<int>> attended(task_item.size());
  // Top-k overlap per task: |S_t & S_{t-1}| and |S_t| (-1: no sample).
  std::vector<std::pair<int64_t, int64_t>> overlap(task_item.size(), {-1, 0});
  // The read of each layer's slots begins before the next step's speculative selection is queued,
  // so that job selects in parallel with this attention but writes slots only after it.
  for (int i = 0; i < n; ++i) ss[i]->layers[layer]->recall.BeginRead();
  for (int i = 0; i < n; ++i)
    if (ss[i]->Speculates(*ss[i]->layers[layer])) QueueSpeculative(ss[i], layer, items[i].q);
  try {
    if (debug_attend_delay_us_ > 0) std::this_thread::sleep_for(std::chrono::microseconds(debug_attend_delay_us_));
    ParallelFor(static_cast<int>(task_item.size()), threads_, [&](int t) {
      CpuSession& s = *ss[task_item[t]];
      LayerState& L = *s.layers[layer];
      const auto& pg = s.pg;
      const int h = task_head[t];
      const int group = pg.Hq / pg.Hkv;
      const auto r = RangesFor(pg, L.tokens);
      std::vector<AttendedPage> pages;
      if (L.dense) {
        pages.reserve(r.full + 1);
        for (int p = 0; p < r.full; ++p) pages.push_back({p, L.dense_pages[p].get(), pg.P});
      } else {
        for (int p = 0; p < r.sink_end; ++p) pages.push_back({p, L.sink.data() + static_cast<size_t>(p) * pg.nhd_page_bytes, pg.P});
        if (s.Retrieves(L)) {
          // L.selected is stable while this decode holds the layer's read guard.
          auto& prev = L.prev_selected[h];
          if (!L.first_decode && L.prev_selected_valid) {
            int64_t common = 0;
            size_t j = 0;
            for (const auto& sp : L.selected[h]) {
              while (j < prev.size() && prev[j] < sp.page) ++j;
              if (j < prev.size() && prev[j] == sp.page) ++common;
            }
            overlap[t] = {common, static_cast<int64_t>(L.selected[h].size())};
          }
          prev.clear();
          for (const auto& sp : L.selected[h]) {
            const uint8_t* data = L.keeps_all ? L.dense_pages[sp.page].get()
                                              : L.slots.data() + static_cast<size_t>(sp.slot) * pg.nhd_page_bytes;
            pages.push_back({sp.page, data, pg.P});
            prev.push_back(sp.page);
          }
        }
        for (int p = r.window_begin; p < r.full; ++p) pages.push_back({p, s.WorkingPage(L, p), pg.P});
        auto& rec = attended[t];
        rec.reserve(pages.size() + 1);
        for (const auto& ap : pages) rec.push_back(ap.page);
      }
      if (r.partial > 0) pages.push_back({r.full, s.WorkingPage(L, r.full), r.partial});
      const size_t off = static_cast<size_t>(h) * group * pg.D;
      AttendDecodeGroup(pg, h, items[task_item[t]].q + off, pages, items[task_item[t]].out + off);
    });
  } catch (...) {
    for (int i = 0; i < n; ++i) ss[i]->layers[layer]->recall.EndRead();
    throw;
  }
  for (int i = 0; i < n; ++i) ss[i]->layers[layer]->recall.EndRead();
  for (size_t t = 0; t < task_item.size(); ++t) {
    if (overlap[t].first < 0) continue;
    LayerState& L = *ss[task_item[t]]->layers[layer];
    std::lock_guard<std::mutex> l(L.counters.mu);
    L.counters.dynamics.overlap_pages += static_cast<uint64_t>(overlap[t].first);
    L.counters.dynamics.overlap_base += static_cast<uint64_t>(overlap[t].second);
  }
  for (int i = 0; i < n; ++i) {
    LayerState& L = *ss[i]->layers[layer];
    L.prev_selected_valid = ss[i]->Retrieves(L);
  }
  // Record what was attended (for LastAttendedTokens).
  for (size_t t = 0; t < task_item.size(); ++t) {
    CpuSession& s = *ss[task_item[t]];
    LayerState& L = *s.layers[layer];
    std::lock_guard<std::mutex> l(s.attended_mu);
    L.attended_pages[task_head[t]] = std::move(attended[t]);
    L.attended_tokens = L.tokens;
    L.attended_all = L.dense;
    L.attended_valid = true;
  }
  // 5. Remember q_t (the speculative selection with it was queued above).
  for (int i = 0; i < n; ++i) {
    CpuSession& s = *ss[i];
    LayerState& L = *s.layers[layer];
    std::copy(items[i].q, items[i].q + static_cast<size_t>(s.pg.Hq) * s.pg.D, L.q_prev.begin());
    L.has_q = true;
    L.first_decode = false;
    L.decodes += 1;
    if (L.decodes > s.counters.decode_steps) s.counters.decode_steps = L.decodes;
    WriteQueryRecord(s, layer);
    UpdateResident(s);
  }
}

// ---------------------------------------------------------------------------------------------
// Introspection

Stats CpuEngine::GetStats(int session) const {
  auto s = Find(session);
  const auto& c = s->counters;
  Stats st;
  st.decode_steps = c.decode_steps;
  for (const auto& L : s->layers) {
    const LayerCounters& lc = L->counters;
    LayerStats ls;
    {
      std::lock_guard<std::mutex> l(lc.mu);
      ls = lc.dynamics;
    }
    ls.selections = lc.selections;
    ls.corrections = lc.corrections;
    ls.pages_selected = lc.pages_selected;
    ls.pages_hit = lc.pages_hit;
    ls.pages_recalled = lc.pages_recalled;
    st.layers.push_back(ls);
  }
  st.SumLayers(s->pg.head_page_bytes);
  st.pages_offloaded = c.pages_offloaded;
  st.offload_bytes = c.offload_bytes;
  st.context_tokens = c.context_tokens;
  st.resident_pages = c.resident_pages;
  st.recall_waits = c.recall_waits;
  st.guard_waits = c.guard_waits;
  return st;
}

uint64_t CpuEngine::ContextTokens(int session) const { return Find(session)->counters.context_tokens; }

Geometry CpuEngine::SessionGeometry(int session) const { return Find(session)->geo; }

std::vector<int> CpuEngine::LastAttendedTokens(int session, int layer, int kv_head) const {
  auto s = Find(session);
  if (layer < 0 || layer >= s->geo.layers)
    throw std::invalid_argument("layer " + to_string(layer) + " is out of range [0, " + to_string(s->geo.layers) + ")");
  if (kv_head < 0 || kv_head >= s->geo.kv_heads)
    throw std::invalid_argument("kvHead " + to_string(kv_head) + " is out of range [0, " + to_string(s->geo.kv_heads) + ")");
  const LayerState& L = *s->layers[layer];
  std::lock_guard<std::mutex> l(s->attended_mu);
  std::vector<int> out;
  if (!L.attended_valid) return out;
  const int P = s->pg.P;
  const int64_t T = L.attended_tokens;
  if (L.attended_all) {
    out.resize(T);
    for (int64_t t = 0; t < T; ++t) out[t] = static_cast<int>(t);
    return out;
  }
  for (int p : L.attended_pages[kv_head])
    for (int i = 0; i < P; ++i) out.push_back(p * P + i);
  for (int64_t t = (T / P) * P; t < T; ++t) out.push_back(static_cast<int>(t));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Re-attach

void CpuEngine::Reattach(CpuSession& s) {
  const auto& pg = s.pg;
  const auto* hdr = s.manifest->header();
  if (hdr->magic == kManifestCorruptMagic)
    throw std::invalid_argument("host.manifest is marked corrupt: the kvstore found a committed page that no longer matches its checksum; the session cannot be re-attached");
  if (hdr->magic != kManifestMagic)
    throw std::invalid_argument("host.manifest does not hold a FreeKV manifest (bad magic): nothing to re-attach");
  if (hdr->layers != static_cast<uint32_t>(s.geo.layers))
    throw std::invalid_argument("host.manifest has " + to_string(hdr->layers) + " layers, geometry.layers is " +
                                to_string(s.geo.layers));
  // Every layer continues from the context all layers completed (a process that died in the
  // middle of a step left some layers one call ahead).
  int64_t ctx = std::numeric_limits<int64_t>::max();
  for (int l = 0; l < s.geo.layers; ++l) {
    const uint32_t* w = s.manifest->layer_words(l);
    if (w[0] > static_cast<uint32_t>(s.host.capacity_pages) || w[1] >= static_cast<uint32_t>(pg.P))
      throw std::invalid_argument("host.manifest layer " + to_string(l) + " is inconsistent with the layout");
    // Only the reserved pages are backed (as the CUDA backend registers only those).
    if (w[0] > static_cast<uint32_t>(s.host.reserved_pages))
      throw std::invalid_argument("host.manifest layer " + to_string(l) + " has " + to_string(w[0]) +
                                  " committed pages, more than the session's reservation of " + to_string(s.host.reserved_pages));
    ctx = std::min<int64_t>(ctx, static_cast<int64_t>(w[0]) * pg.P + w[1]);
  }
  const size_t per = SummaryFloatsPerPage(pg);
  for (int l = 0; l < s.geo.layers; ++l) {
    LayerState& L = *s.layers[l];
    const uint32_t committed = s.manifest->layer_words(l)[0];
    const auto r = RangesFor(pg, ctx);
    const uint8_t* store = s.StoreLayer(l);
    std::vector<uint16_t> all_pages(L.dense ? 0 : static_cast<size_t>(r.full) * per);
    if (L.keeps_all) s.WorkingPage(L, r.full);  // allocates every kept page up to the partial one
    ParallelFor(r.full, threads_, [&](int p) {
      const uint8_t* sp = store + static_cast<size_t>(p) * pg.hnd_page_bytes;
      if (L.keeps_all) {
        LoadStorePage(pg, sp, L.dense_pages[p].get(), pg.P);
        if (L.dense) return;
      }
      std::vector<uint8_t> loaded;
      const uint8_t* page = L.keeps_all ? L.dense_pages[p].get() : nullptr;
      if (!page) {
        loaded.resize(pg.nhd_page_bytes);
        LoadStorePage(pg, sp, loaded.data(), pg.P);
        page = loaded.data();
      }
      SummarisePage(pg, s.cfg.summary, page, all_pages.data() + static_cast<size_t>(p) * per);
      if (p < pg.sink_pages) std::memcpy(L.sink.data() + static_cast<size_t>(p) * pg.nhd_page_bytes, page, pg.nhd_page_bytes);
      if (p >= r.window_begin && !L.keeps_all)
        std::memcpy(L.ring.data() + static_cast<size_t>(p % pg.window_pages) * pg.nhd_page_bytes, page, pg.nhd_page_bytes);
    });
    if (!L.dense) {
      L.summaries.assign(pg.Hkv, {});
      L.group_summaries.assign(pg.Hkv, {});
      for (int p = 0; p < r.full; ++p) StoreSummary(pg, L, p, all_pages.data() + static_cast<size_t>(p) * per);
    }
    L.tokens = ctx;
    uint8_t* partial = s.WorkingPage(L, r.full);
    if (committed > static_cast<uint32_t>(r.full)) {
      LoadStorePage(pg, store + static_cast<size_t>(r.full) * pg.hnd_page_bytes, partial, r.partial);
      for (int i = 0; i < r.partial; ++i) WriteTailRow(pg, s.TailLayer(l), i, partial);
    } else {
      ReadTailRows(pg, s.TailLayer(l), r.partial, partial);
    }
    s.manifest->SetLayer(l, static_cast<uint32_t>(r.full), static_cast<uint32_t>(r.partial));
    const auto* rec = s.manifest->FindQuery(l, static_cast<uint64_t>(ctx));
    if (rec) {
      L.has_q = (rec->flags & kQueryValid) != 0;
      L.first_decode = (rec->flags & kFirstDecodePending) != 0;
      if (L.has_q) std::memcpy(L.q_prev.data(), reinterpret_cast<const float*>(rec + 1), sizeof(float) * L.q_prev.size());
      L.record_seq = rec->seq;
    } else {
      L.has_q = false;
      L.first_decode = true;
      L.record_seq = std::max(s.manifest->record(l, 0)->seq, s.manifest->record(l, 1)->seq);
    }
  }
  s.manifest->SetContext(static_cast<uint64_t>(ctx));
  s.counters.context_tokens = static_cast<uint64_t>(ctx);
  // The speculative recall the previous process had in flight for each layer, done again now.
  for (int l = 0; l < s.geo.layers; ++l) {
    LayerState& L = *s.layers[l];
    if (s.Speculates(L) && !L.first_decode && L.has_q) SpeculativeJob(s, l, L.q_prev);
  }
}

}  // namespace freekv::cpu
