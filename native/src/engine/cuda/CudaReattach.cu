// Re-attach on the CUDA engine: a new process continues a session from the host store.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "CudaBudget.h"
#include "CudaEngine.h"
#include "append.cuh"
#include "cuda/cuda_check.cuh"
#include "selection.cuh"
#include "summary.cuh"

namespace freekv::cuda {

using std::to_string;

// Rebuilds the device tier from the host store: every layer continues from the context all
// layers completed (a process that died inside a step left some layers one call ahead). Full
// pages come back HND -> NHD (gather), are summarised, and the sink and window pages are placed
// in their slots; the partial page comes from the tail (or from the store when the layer had
// already committed it); the query records restore q_{t-1} and the first-decode flag; and the
// speculative selection + recall the previous process had in flight is done again.
void CudaEngine::Reattach(Session& s) {
  const auto* hdr = reinterpret_cast<const ManifestHeader*>(s.host.manifest);
  if (hdr->magic == kManifestCorruptMagic)
    throw std::invalid_argument("host.manifest is marked corrupt: the kvstore found a committed page that no longer matches its checksum; the session cannot be re-attached");
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
    // Only the reserved pages are backed and registered: a page past them would be read from
    // host memory the device may not touch.
    if (w[0] > (uint32_t)s.host.reserved_pages)
      throw std::invalid_argument("host.manifest layer " + to_string(l) + " has " + to_string(w[0]) +
                                  " committed pages, more than the session's reservation of " + to_string(s.host.reserved_pages));
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
      if (!L.dense) {
        LaunchPageSummary(pages, r.full, L.summaries.get(), Hkv, D, P, static_cast<int>(s.cfg.summary), st);
        LaunchGroupBounds(L.summaries.get(), L.groups.get(), 0, r.full, Hkv, D, kSelGroupPages, st);
      }
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
      if (!(L.keeps_all || p < s.SP || p >= r.window_begin)) continue;
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

}  // namespace freekv::cuda
