// Prefill on the CUDA engine: append a run of tokens (summary and offload of every page that
// fills, sink and window pages placed in their slots) and, for PrefillAttend, exact causal
// attention over the whole context.
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
  DoPrefill(s, layer, nullptr, k, v, n, nullptr);
  LayerTier& L = *s.layers[layer];
  L.has_q = false;
  L.first_decode = true;
  L.selection_valid = false;
  WriteQueryRecord(s, layer, nullptr);
}

void CudaEngine::PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n,
                               float* out) {
  DoPrefillAttend(session, layer, q, k, v, n, out, false);
}

void CudaEngine::PrefillAttendTensorCores(int session, int layer, const float* q, const float* k, const float* v,
                                          int n, float* out) {
  DoPrefillAttend(session, layer, q, k, v, n, out, true);
}

void CudaEngine::DoPrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n,
                                 float* out, bool tensor_cores) {
  auto lock = LockOutsideStep("prefillAttend");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  Session& s = Find(session);
  CheckLayer(s, layer);
  if (n < 1) throw std::invalid_argument("n must be >= 1");
  if (!q || !k || !v || !out) throw std::invalid_argument("q, k, v and out must not be null");
  DoPrefill(s, layer, q, k, v, n, out, tensor_cores);
  LayerTier& L = *s.layers[layer];
  const size_t qs = (size_t)s.geo.q_heads * s.geo.head_dim;
  FKV_CUDA_CHECK(cudaMemcpy(L.q[L.qcur].get(), q + (size_t)(n - 1) * qs, qs * sizeof(float),
                            cudaMemcpyHostToDevice));
  L.has_q = true;
  L.first_decode = true;
  L.selection_valid = false;
  WriteQueryRecord(s, layer, q + (size_t)(n - 1) * qs);
}

void CudaEngine::DoPrefill(Session& s, int layer, const float* q, const float* k, const float* v, int n,
                           float* out, bool tensor_cores) {
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
  // fp32 k, v, q, out, then (flash kernel) q rounded to bf16: qn bf16 = qn / 2 floats, 16-byte aligned
  const bool flash = q && tensor_cores && FlashPrefillSupports(D);
  const size_t q16_floats = flash ? (qn / 2 + 4) : 0;
  prefill_f32_.Resize(2 * kvn + 2 * qn + q16_floats);
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
    FKV_CUDA_CHECK(cudaMemsetAsync(dout, 0xff, qn * sizeof(float), st));  // poison: NaN
    if (flash) {
      // Tensor cores (attention_prefill_flash.cuh): q rounded to bf16 like the K/V it meets.
      auto* dq16 = reinterpret_cast<bf16*>(dout + qn);
      LaunchQueriesToBf16(dq, qn, dq16, st);
      FlashPrefillParams fp;
      fp.q = dq16;
      fp.pages = pages;
      fp.out_f32 = dout;
      fp.n = n;
      fp.start = (int)c;
      fp.q_heads = Hq;
      fp.kv_heads = Hkv;
      fp.head_dim = D;
      fp.page_size = P;
      fp.scale = 1.f / std::sqrt((float)D);
      LaunchFlashPrefillAttention(fp, st);
    } else {
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
      LaunchPrefillAttention(pp, st);
    }
    FKV_CUDA_CHECK(cudaMemcpyAsync(out, dout, qn * sizeof(float), cudaMemcpyDeviceToHost, st));
  }
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  L.tokens = t_new;
  L.attended_valid = false;
  WriteManifest(s, layer);
}

}  // namespace freekv::cuda
