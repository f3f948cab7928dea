// Session lifetime on the CUDA engine: the device tier of every layer, the host segments
// registered for mapped access, a fresh or re-attached manifest; closing.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "CudaEngine.h"
#include "cuda/cuda_check.cuh"
#include "selection.cuh"

namespace freekv::cuda {

using std::to_string;

// Registers a shared segment for mapped device access; an already registered range is used as is.
uint8_t* RegisterMapped(uint8_t* p, size_t bytes, bool& registered, const char* what) {
  registered = false;
  if (!p || bytes == 0) return nullptr;
  cudaError_t e = cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (e == cudaErrorHostMemoryAlreadyRegistered) {
    cudaGetLastError();
  } else {
    Check(e, what);
    registered = true;
  }
  void* d = nullptr;
  Check(cudaHostGetDevicePointer(&d, p, 0), what);
  return static_cast<uint8_t*>(d);
}

int CudaEngine::CreateSession(const Geometry& g, const RetrievalConfig& c, const HostStore& h, bool reattach) {
  auto lock = LockOutsideStep("createSession");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  Validate(g, c, h);
  auto s = std::make_unique<Session>();
  s->geo = g;
  s->cfg = c;
  s->host = h;
  s->layout = ComputeLayout(g, c, h.capacity_pages);
  s->P = c.page_size;
  s->SP = c.sink_tokens / c.page_size;
  s->WP = c.window_tokens / c.page_size;
  s->K = c.select_tokens / c.page_size;
  s->page_elems = (size_t)2 * s->P * g.kv_heads * g.head_dim;
  s->store_dev = RegisterMapped(h.store, h.store_bytes, s->store_registered, "cudaHostRegister(host.store)");
  s->tail_dev = RegisterMapped(h.tail, h.tail_bytes, s->tail_registered, "cudaHostRegister(host.tail)");
  s->manifest_dev =
      RegisterMapped(h.manifest, h.manifest_bytes, s->manifest_registered, "cudaHostRegister(host.manifest)");
  // Initial contents are written on the main stream (the legacy default stream does not order
  // against the engine's non-blocking streams), then waited for once.
  cudaStream_t st = main_->get();
  s->counters.Resize((size_t)g.layers * kLayerWords);
  FKV_CUDA_CHECK(cudaMemsetAsync(s->counters.get(), 0, s->counters.bytes(), st));
  const int Hkv = g.kv_heads, D = g.head_dim, cap = h.capacity_pages, K = s->K;
  for (int l = 0; l < g.layers; ++l) {
    auto L = std::make_unique<LayerTier>();
    L->dense = c.mode == Mode::Dense ||
               std::find(c.dense_layers.begin(), c.dense_layers.end(), l) != c.dense_layers.end();
    L->pool_slots = L->dense ? cap + 1 : s->SP + s->WP + K;
    L->pool.Resize(std::max(1, L->pool_slots) * s->page_elems);
    if (!L->dense) {
      L->summaries.Resize((size_t)cap * Hkv * 2 * D);
      L->groups.Resize((size_t)((cap + kSelGroupPages - 1) / kSelGroupPages) * Hkv * 2 * D);
    }
    if (s->Retrieves(*L)) {
      L->selected.Resize((size_t)Hkv * K);
      L->selected_slot.Resize((size_t)Hkv * K);
      L->resident.Resize((size_t)Hkv * K);
      FKV_CUDA_CHECK(cudaMemsetAsync(L->resident.get(), 0xff, L->resident.bytes(), st));  // -1: empty
      FKV_CUDA_CHECK(cudaMemsetAsync(L->selected.get(), 0xff, L->selected.bytes(), st));
      FKV_CUDA_CHECK(cudaMemsetAsync(L->selected_slot.get(), 0xff, L->selected_slot.bytes(), st));
      L->prev_selected.Resize((size_t)Hkv * K);
      FKV_CUDA_CHECK(cudaMemsetAsync(L->prev_selected.get(), 0xff, L->prev_selected.bytes(), st));
      L->flags.Resize(Hkv);
      SelectionParams sp;
      sp.q_heads = g.q_heads;
      sp.kv_heads = Hkv;
      sp.num_candidates = cap;
      L->scratch.Resize(SelectionScratchBytes(sp) / sizeof(float));
      sp.k = K;
      L->sel_ws.Resize((SelectionWorkspaceBytes(sp) + 7) / 8);
      L->jobs.Resize((size_t)Hkv * K);
      L->job_count.Resize(1 + Hkv);
    }
    for (auto& q : L->q) q.Resize((size_t)g.q_heads * D);
    L->table_rows = L->dense ? cap + 1 : s->SP + K + s->WP;
    L->t_slot.Resize((size_t)Hkv * L->table_rows);
    L->t_tokens.Resize((size_t)Hkv * L->table_rows);
    L->t_id.Resize((size_t)Hkv * L->table_rows);
    L->t_num.Resize(Hkv);
    s->layers.push_back(std::move(L));
  }
  if (c.recall == RecallMode::DoubleBuffer)
    s->db = std::make_unique<DoubleBufferRecall>(s->Recall().HeadPageBytes(), DoubleBufferRecall::kMaxChunk);
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  if (reattach) {
    Reattach(*s);
  } else {
    // A fresh manifest: header, no pages, no query records (the kvstore only initialised it).
    InitManifest(*s);
  }
  const int id = next_id_++;
  sessions_[id] = std::move(s);
  return id;
}

void CudaEngine::CloseSession(int session) {
  auto lock = LockOutsideStep("closeSession");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  EndPrefill(Find(session));
  // Queued work may still use the session's memory and registered segments.
  SyncStreams();
  sessions_.erase(session);
}

}  // namespace freekv::cuda
