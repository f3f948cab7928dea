// Prefill on the CUDA engine: append a run of tokens (summary and offload of every page that
// fills, sink and window pages placed in their slots) and, for PrefillAttend / PrefillDevice,
// causal attention over the whole context.
//
// Where the earlier context comes from. A prompt is prefilled in chunks, and every chunk attends
// to all tokens before it. The layer keeps its whole context on the device while a prefill runs
// (LayerTier::pctx, NHD pages): the run's pages are appended there, and the next chunk finds the
// earlier ones in place. Reading them back from the host store at every chunk instead (the
// fallback, when the budget CudaEngineOptions::prefill_context_bytes is short) moves
// O(prompt^2 / chunk) bytes over PCIe: at 32K tokens in 512-token chunks of an 8B-shaped model,
// 64 chunks x up to 4 GiB, which alone took most of a 12 s prefill. The context is freed when the
// session decodes (its budget pages are then in the pool's slots) or closes; a follow-up turn
// gathers it once, in its first chunk.
//
// Streams. PrefillDevice only queues work on the main stream (the runner's stream). Pages that
// fill are summarised on the main stream and offloaded to the host store (HND) on offload_,
// after the `appended_` event, so the PCIe writes overlap the next layers' GEMMs and attention;
// offload_done_ follows each offload. By default (QueueOffload, FREEKV_PREFILL_OFFLOAD=copy) the
// main stream transposes the pages into a device staging slot and offload_ moves the slot with DMA
// copies (no SM waits on PCIe: 0.21 s less on a 128K prompt at 8B shapes than the offload kernel
// writing mapped memory, bench/results/gpu-visit-20261204-1859/). FinishDevicePrefill waits for both streams and only then
// writes the manifests, so the store never claims pages that are not written. Hazards: the
// offload reads full pages of pctx that later runs never write (they append after them), and
// pctx is only reallocated or freed after both streams are idle; the shared scratch of the
// fallback is rewritten only after main waits offload_done_.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "CudaBudget.h"
#include "CudaEngine.h"
#include "attention_prefill_flash.cuh"
#include "append.cuh"
#include "attention_prefill.cuh"
#include "cuda/cuda_check.cuh"
#include "offload.cuh"
#include "selection.cuh"
#include "summary.cuh"

namespace freekv::cuda {

using std::to_string;

void CudaEngine::Prefill(int session, int layer, const float* k, const float* v, int n) {
  auto lock = LockOutsideStep("prefill");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  Session& s = Find(session);
  CheckLayer(s, layer);
  if (n < 1) throw std::invalid_argument("n must be >= 1");
  if (!k || !v) throw std::invalid_argument("k and v must not be null");
  FlushPrefill(s);
  DoPrefill(s, layer, nullptr, k, v, n, nullptr, false, false);
  LayerTier& L = *s.layers[layer];
  L.has_q = false;
  L.first_decode = true;
  L.selection_valid = false;
  WriteQueryRecord(s, layer, nullptr);
}

void CudaEngine::PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n,
                               float* out, int attend_rows) {
  auto lock = LockOutsideStep("prefillAttend");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  Session& s = Find(session);
  CheckLayer(s, layer);
  if (n < 1) throw std::invalid_argument("n must be >= 1");
  if (!q || !k || !v || !out) throw std::invalid_argument("q, k, v and out must not be null");
  AttendedRows(attend_rows, n);  // checked before anything is written
  FlushPrefill(s);
  DoPrefill(s, layer, q, k, v, n, out, false, false, nullptr, nullptr, attend_rows);
  LayerTier& L = *s.layers[layer];
  L.has_q = true;
  L.first_decode = true;
  L.selection_valid = false;
  WriteQueryRecord(s, layer, q + (size_t)(n - 1) * s.geo.q_heads * s.geo.head_dim);
}

bool CudaEngine::PrefillTakesBf16Queries(int head_dim) const { return FlashPrefillSupports(head_dim); }

int CudaEngine::PrefillWaveTokens(int q_heads, int kv_heads, int head_dim) const {
  return PrefillTakesBf16Queries(head_dim) ? FlashPrefillWaveTokens(q_heads, kv_heads, head_dim) : 1;
}

bool CudaEngine::PrefillDevice(int session, int layer, const float* q, const float* k, const float* v, int n,
                               float* out, bool tensor_cores, void* out_bf16, const void* q_bf16, int attend_rows) {
  auto lock = LockOutsideStep("prefillDevice");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  Session& s = Find(session);
  CheckLayer(s, layer);
  if (n < 1) throw std::invalid_argument("n must be >= 1");
  if (!q || !k || !v || !out) throw std::invalid_argument("q, k, v and out must not be null");
  if (q_bf16 && !(tensor_cores && FlashPrefillSupports(s.geo.head_dim)))
    throw std::invalid_argument("prefillDevice: bf16 queries need the tensor-core kernel (PrefillTakesBf16Queries)");
  AttendedRows(attend_rows, n);  // checked before anything is written
  const bool wrote_bf16 = DoPrefill(s, layer, q, k, v, n, out, tensor_cores, true, out_bf16, q_bf16, attend_rows);
  LayerTier& L = *s.layers[layer];
  L.has_q = true;
  L.first_decode = true;
  L.selection_valid = false;
  return wrote_bf16;
}

void CudaEngine::FinishDevicePrefill(int session) {
  auto lock = LockOutsideStep("finishDevicePrefill");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  FlushPrefill(Find(session));
}

void CudaEngine::FlushPrefill(Session& s) {
  s.opening.reset();  // its first prefill call (or its first step, or its close) ends its opening
  bool pending = false;
  for (const auto& L : s.layers) pending = pending || L->manifest_pending;
  if (!pending) return;
  FKV_CUDA_CHECK(cudaStreamSynchronize(offload_->get()));
  FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));
  for (int l = 0; l < (int)s.layers.size(); ++l) {
    LayerTier& L = *s.layers[l];
    if (!L.manifest_pending) continue;
    L.manifest_pending = false;
    WriteQueryRecord(s, l, L.q_last);
    WriteManifest(s, l);
  }
}

void CudaEngine::EndPrefill(Session& s) {
  FlushPrefill(s);
  bool held = false;
  for (const auto& L : s.layers) held = held || L->pctx.get();
  if (!held) return;
  FKV_CUDA_CHECK(cudaStreamSynchronize(offload_->get()));
  FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));
  for (auto& L : s.layers) ReleaseContext(*L);
}

void CudaEngine::ReleaseContext(LayerTier& L) {
  // Callers make sure no queued work reads it (both streams idle, or the memory is unused).
  pctx_bytes_ -= L.pctx.bytes();
  L.pctx = PoolArray<bf16>();
  L.pctx_tokens = -1;
}

bf16* CudaEngine::ResidentContext(Session& s, LayerTier& L, int pages) {
  const size_t have = L.pctx.size() / s.page_elems;
  if (L.pctx.get() && (size_t)pages <= have) return L.pctx.get();
  // Grow geometrically (a prompt's chunks then copy O(prompt) in all), within the store's
  // capacity and the engine's budget.
  const size_t most = (size_t)s.host.capacity_pages + 1;
  size_t want = std::min(most, std::max<size_t>(2 * have, 64));
  want = std::max(want, (size_t)pages);
  const size_t others = pctx_bytes_ - L.pctx.bytes();
  const size_t page_bytes = s.page_elems * sizeof(bf16);
  // The reservation bounds the prompt (a Generate reserves prompt + max_tokens): taken at once when
  // the budget allows, so a long prompt's chunks do not regrow it (each regrowth waits for both
  // streams and copies: ~110 ms of a 128K prefill at 8B shapes, in 2048-token chunks).
  const size_t reserved = std::min(most, (size_t)s.host.reserved_pages + 1);
  if (reserved > want && others + reserved * page_bytes <= pctx_limit_) want = reserved;
  if (others + want * page_bytes > pctx_limit_) want = (size_t)pages;
  // Both streams idle before the old allocation is copied from and freed (the offload may read it).
  FKV_CUDA_CHECK(cudaStreamSynchronize(offload_->get()));
  FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));
  if (others + want * page_bytes > pctx_limit_) {
    ReleaseContext(L);
    return nullptr;
  }
  PoolArray<bf16> grown(pctx_pool_, main_->get());
  try {
    grown.Resize(want * s.page_elems);
  } catch (const std::runtime_error&) {
    cudaGetLastError();  // out of device memory: not sticky; prefill by gathering instead
    ReleaseContext(L);
    return nullptr;
  }
  if (L.pctx.get() && L.pctx_tokens > 0) {
    const size_t used = (size_t)((L.pctx_tokens + s.P - 1) / s.P);
    FKV_CUDA_CHECK(cudaMemcpyAsync(grown.get(), L.pctx.get(), used * page_bytes, cudaMemcpyDeviceToDevice,
                                   main_->get()));
    FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));
  }
  const int64_t kept = L.pctx.get() ? L.pctx_tokens : -1;
  ReleaseContext(L);
  L.pctx = std::move(grown);
  L.pctx_tokens = kept;
  pctx_bytes_ += L.pctx.bytes();
  return L.pctx.get();
}

void CudaEngine::QueueOffload(Session& s, int layer, const bf16* pages, int first, int count) {
  cudaStream_t st = main_->get();
  uint8_t* dst = s.StoreLayerDev(layer) + (size_t)first * s.layout.page_bytes;
  const int Hkv = s.geo.kv_heads, D = s.geo.head_dim, P = s.P;
  const size_t bytes = (size_t)count * s.layout.page_bytes;
  // The copy is cut where a registration of the store begins (a DMA copy may not span two).
  std::vector<uintptr_t> cuts;
  // A run larger than a staging slot may be (a long k/v-only Prefill of an attention session, say)
  // goes by the kernel, so the four slots stay small (2048 tokens of an 8B model: 8 MiB each).
  bool by_copy = offload_by_copy_ && bytes <= kMaxStageBytes;
  if (by_copy) {
    std::lock_guard<std::mutex> g(s.reg_mu);
    by_copy = !s.foreign_reg && !s.dma_refused;
    const uintptr_t x = reinterpret_cast<uintptr_t>(dst), y = x + bytes;
    for (auto it = std::upper_bound(s.reg_starts.begin(), s.reg_starts.end(), x);
         by_copy && it != s.reg_starts.end() && *it < y; ++it)
      cuts.push_back(*it);
  }
  if (!by_copy) {
    FKV_CUDA_CHECK(cudaEventRecord(appended_->get(), st));
    FKV_CUDA_CHECK(cudaStreamWaitEvent(offload_->get(), appended_->get(), 0));
    LaunchOffloadHnd(pages, count, dst, s.layout.page_bytes, Hkv, D, P, offload_->get());
    FKV_CUDA_CHECK(cudaEventRecord(offload_done_->get(), offload_->get()));
    return;
  }
  // The pages of one layer's store are contiguous (page_bytes apart, HND inside a page), so the
  // run's pages, transposed in device memory, reach the host in one DMA copy. A slot is rewritten
  // only after its previous copy (stage_free_); kStageSlots of them let the copies of several
  // layers queue behind one another while main goes on.
  const int slot = stage_next_;
  stage_next_ = (stage_next_ + 1) % kStageSlots;
  if (bytes > stage_[slot].size()) {
    FKV_CUDA_CHECK(cudaEventSynchronize(stage_free_[slot]->get()));
    FKV_CUDA_CHECK(cudaStreamSynchronize(st));  // nothing queued still writes the old slot
    stage_[slot].Resize(bytes);
  }
  FKV_CUDA_CHECK(cudaStreamWaitEvent(st, stage_free_[slot]->get(), 0));
  LaunchOffloadHnd(pages, count, stage_[slot].get(), s.layout.page_bytes, Hkv, D, P, st);
  FKV_CUDA_CHECK(cudaEventRecord(appended_->get(), st));
  FKV_CUDA_CHECK(cudaStreamWaitEvent(offload_->get(), appended_->get(), 0));
  size_t at = 0;
  cuts.push_back(reinterpret_cast<uintptr_t>(dst) + bytes);
  for (const uintptr_t cut : cuts) {
    const size_t to = cut - reinterpret_cast<uintptr_t>(dst);
    const cudaError_t e =
        cudaMemcpyAsync(dst + at, stage_[slot].get() + at, to - at, cudaMemcpyDeviceToHost, offload_->get());
    if (e == cudaErrorInvalidValue) {
      // Refused (a registration boundary this session does not know of): the kernel writes the
      // run's pages instead, after the copies already queued, and every later offload too.
      cudaGetLastError();
      {
        std::lock_guard<std::mutex> g(s.reg_mu);
        s.dma_refused = true;
      }
      LaunchOffloadHnd(pages, count, dst, s.layout.page_bytes, Hkv, D, P, offload_->get());
      break;
    }
    if (e != cudaSuccess) {
      // The copies queued so far still read the slot: its next user waits for them.
      cudaEventRecord(stage_free_[slot]->get(), offload_->get());
      cudaEventRecord(offload_done_->get(), offload_->get());
      FKV_CUDA_CHECK(e);
    }
    at = to;
  }
  FKV_CUDA_CHECK(cudaEventRecord(stage_free_[slot]->get(), offload_->get()));
  FKV_CUDA_CHECK(cudaEventRecord(offload_done_->get(), offload_->get()));
}

bool CudaEngine::DoPrefill(Session& s, int layer, const float* q, const float* k, const float* v, int n,
                           float* out, bool tensor_cores, bool device_io, void* out_bf16, const void* q_bf16,
                           int attend_rows) {
  LayerTier& L = *s.layers[layer];
  const int P = s.P, Hkv = s.geo.kv_heads, D = s.geo.head_dim, Hq = s.geo.q_heads;
  if ((L.tokens + n) / P > s.host.capacity_pages)
    throw std::invalid_argument("prefill of " + to_string(n) + " tokens would exceed the store's capacity of " +
                                to_string(s.host.capacity_pages) + " pages");
  if ((L.tokens + n) / P > s.host.reserved_pages)
    throw std::invalid_argument(ReservationExceeded(s.host.reserved_pages, s.host.capacity_pages));
  cudaStream_t st = main_->get();
  // The run's pages are offloaded to the store (registered ahead by the runner, normally).
  EnsureRegistered(s, (int)((L.tokens + n + P - 1) / P));
  if (L.recall_pending) FKV_CUDA_CHECK(cudaStreamWaitEvent(st, spec_done_[layer]->get(), 0));
  L.recall_pending = false;
  const int64_t c = L.tokens;
  const int first = (int)(c / P), last = (int)((c + n - 1) / P);
  const size_t kvn = (size_t)n * Hkv * D;
  const size_t qn = q ? (size_t)n * Hq * D : 0;
  const size_t qs = (size_t)Hq * D;
  const bool flash = q && tensor_cores && FlashPrefillSupports(D);
  const bool direct_bf16 = flash && device_io && out_bf16 != nullptr;
  // The queries attended: rows [n - m, n) of the run (PrefillDevice's attend_rows).
  const int m = AttendedRows(attend_rows, n);
  const size_t skip = (size_t)(n - m) * Hq * D;  // elements of q and out before the first attended row

  // Where the run's pages go: the layer's resident context (attention runs), or the scratch.
  if (!q && L.pctx.get()) {  // a k/v-only prefill does not keep it
    FKV_CUDA_CHECK(cudaStreamSynchronize(offload_->get()));
    FKV_CUDA_CHECK(cudaStreamSynchronize(st));
    ReleaseContext(L);
  }
  if (L.pctx.get() && L.pctx_tokens != c) {  // stale (e.g. the layer decoded meanwhile)
    FKV_CUDA_CHECK(cudaStreamSynchronize(offload_->get()));
    FKV_CUDA_CHECK(cudaStreamSynchronize(st));
    ReleaseContext(L);
  }
  bf16* ctx = q ? ResidentContext(s, L, last + 1) : nullptr;
  const bool resident = ctx != nullptr;
  const bool had = resident && L.pctx_tokens == c;  // pages [0, first] already in place
  // Earlier offloads (of this or an earlier call) may still be writing the host store pages a
  // gather reads, or reading the scratch this run overwrites.
  if (!had) FKV_CUDA_CHECK(cudaStreamWaitEvent(st, offload_done_->get(), 0));
  const int base = resident || q ? 0 : first;
  bf16* pages;
  if (resident) {
    pages = ctx;
  } else {
    const size_t need = (size_t)(last - base + 1) * s.page_elems;
    if (need > prefill_pages_.size()) {
      FKV_CUDA_CHECK(cudaStreamSynchronize(offload_->get()));
      FKV_CUDA_CHECK(cudaStreamSynchronize(st));
      prefill_pages_.Resize(need);
    }
    pages = prefill_pages_.get();
  }

  // fp32 inputs and output (host callers: copied through the scratch), then (flash kernel) q
  // rounded to bf16: qn bf16 = qn / 2 floats, 16-byte aligned.
  const size_t staged = device_io ? 0 : 2 * kvn + 2 * qn;
  const bool q_given = flash && device_io && q_bf16 != nullptr;  // no conversion pass
  const size_t q16_floats = flash && !q_given ? ((qn - skip) / 2 + 4) : 0;
  if (staged + q16_floats > prefill_f32_.size()) {
    FKV_CUDA_CHECK(cudaStreamSynchronize(st));
    prefill_f32_.Resize(staged + q16_floats);
  }
  const float *dk = k, *dv = v, *dq = q;
  float* dout = out;
  float* scratch = prefill_f32_.get();
  if (!device_io) {
    float* sk = scratch;
    float* sv = sk + kvn;
    float* sq = sv + kvn;
    dout = sq + qn;
    FKV_CUDA_CHECK(cudaMemcpyAsync(sk, k, kvn * sizeof(float), cudaMemcpyHostToDevice, st));
    FKV_CUDA_CHECK(cudaMemcpyAsync(sv, v, kvn * sizeof(float), cudaMemcpyHostToDevice, st));
    if (q) FKV_CUDA_CHECK(cudaMemcpyAsync(sq, q, qn * sizeof(float), cudaMemcpyHostToDevice, st));
    dk = sk;
    dv = sv;
    dq = q ? sq : nullptr;
    scratch = dout + qn;
  }

  bf16* newp = pages + (size_t)(first - base) * s.page_elems;
  // The partial page so far, from its slot (unless the resident context holds it).
  if (c % P && !had)
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
    {
      LaunchPageSummary(newp, nfull, L.summaries.get() + (size_t)first * Hkv * 2 * D, Hkv, D, P,
                        static_cast<int>(s.cfg.summary), st);
      LaunchGroupBounds(L.summaries.get(), L.groups.get(), first, first + nfull, Hkv, D, kSelGroupPages, st);
    }
    // The offload overlaps what the main stream does next.
    QueueOffload(s, layer, newp, first, nfull);
    s.host_stats.pages_offloaded += nfull;
    s.host_stats.offload_bytes += (uint64_t)nfull * s.layout.page_bytes;
  }
  // Place the run's pages in their working slots (every page of a layer that keeps all; sink pages; the
  // window pages of the new context).
  // Pages whose slots follow one another (the sink pages; the window's ring up to its wrap; every
  // page of a dense layer) go in one copy: a 2048-token run of a 512-token window is 2 copies
  // instead of 17.
  const Ranges r = RangesFor(s, t_new);
  for (int p = first; p <= last;) {
    if (!(L.keeps_all || p < s.SP || p >= r.window_begin)) {
      ++p;
      continue;
    }
    const int slot = s.WorkingSlot(L, p);
    int e = p + 1;
    while (e <= last && (L.keeps_all || e < s.SP || e >= r.window_begin) && s.WorkingSlot(L, e) == slot + (e - p)) ++e;
    FKV_CUDA_CHECK(cudaMemcpyAsync(L.pool.get() + (size_t)slot * s.page_elems,
                                   newp + (size_t)(p - first) * s.page_elems, (size_t)(e - p) * s.page_elems * sizeof(bf16),
                                   cudaMemcpyDeviceToDevice, st));
    p = e;
  }
  if (q) {
    // Earlier full pages not on the device come back from the host store (HND -> NHD).
    if (first > 0 && !had) {
      const int njobs = first * Hkv;
      FKV_CUDA_CHECK(cudaStreamSynchronize(st));  // the pinned job list is rewritten below
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
    // The attended rows' output is poisoned (NaN) first, so a row the kernel missed cannot pass
    // for a result; rows before them are left as they are (nobody reads them).
    if (m > 0 && direct_bf16)
      FKV_CUDA_CHECK(cudaMemsetAsync(static_cast<bf16*>(out_bf16) + skip, 0xff, (qn - skip) * sizeof(bf16), st));
    else if (m > 0)
      FKV_CUDA_CHECK(cudaMemsetAsync(dout + skip, 0xff, (qn - skip) * sizeof(float), st));
    if (m == 0) {
      // No query attended (a model's last layer outside the row whose logits are read).
    } else if (flash) {
      // Tensor cores (attention_prefill_flash.cuh): q rounded to bf16 like the K/V it meets.
      const bf16* dq16 = q_given ? static_cast<const bf16*>(q_bf16) + skip : nullptr;
      if (!q_given) {
        bf16* conv = reinterpret_cast<bf16*>(scratch);
        LaunchQueriesToBf16(dq + skip, qn - skip, conv, st);
        dq16 = conv;
      }
      FlashPrefillParams fp;
      fp.q = dq16;
      fp.pages = pages;
      if (direct_bf16)
        fp.out_bf16 = static_cast<bf16*>(out_bf16) + skip;
      else
        fp.out_f32 = dout + skip;
      fp.n = m;
      fp.start = (int)(c + n - m);
      fp.q_heads = Hq;
      fp.kv_heads = Hkv;
      fp.head_dim = D;
      fp.page_size = P;
      fp.scale = 1.f / std::sqrt((float)D);
      LaunchFlashPrefillAttention(fp, st);
    } else {
      PrefillAttentionParams pp;
      pp.q = dq + skip;
      pp.out = dout + skip;
      pp.pages = pages;
      pp.n = m;
      pp.start = (int)(c + n - m);
      pp.q_heads = Hq;
      pp.kv_heads = Hkv;
      pp.head_dim = D;
      pp.page_size = P;
      pp.scale = 1.f / std::sqrt((float)D);
      LaunchPrefillAttention(pp, st);
    }
    // The latest query, for the first decode's selection in speculative mode (SelectsCurrentAt).
    FKV_CUDA_CHECK(cudaMemcpyAsync(L.q[L.qcur].get(), dq + (size_t)(n - 1) * qs, qs * sizeof(float),
                                   cudaMemcpyDeviceToDevice, st));
  }
  L.tokens = t_new;
  L.pctx_tokens = resident ? t_new : -1;
  L.attended_valid = false;
  if (device_io) {
    // The manifest waits for FinishDevicePrefill (the offload may still be running).
    if (!L.q_last) {
      s.q_last.Resize((size_t)s.geo.layers * qs * sizeof(float));
      L.q_last = reinterpret_cast<float*>(s.q_last.get()) + (size_t)layer * qs;
    }
    FKV_CUDA_CHECK(cudaMemcpyAsync(L.q_last, dq + (size_t)(n - 1) * qs, qs * sizeof(float),
                                   cudaMemcpyDeviceToHost, st));
    L.manifest_pending = true;
    return direct_bf16;
  }
  if (q && qn > skip)  // the attended rows only: the others were not written
    FKV_CUDA_CHECK(cudaMemcpyAsync(out + skip, dout + skip, (qn - skip) * sizeof(float), cudaMemcpyDeviceToHost, st));
  FKV_CUDA_CHECK(cudaStreamSynchronize(offload_->get()));
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  WriteManifest(s, layer);
  return false;
}

}  // namespace freekv::cuda
