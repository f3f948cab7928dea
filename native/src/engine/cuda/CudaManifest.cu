// The manifest segment on the CUDA engine (Engine.h, HostStore): header, per-layer words
// (committed pages, tail tokens) and the query records a re-attaching process reads.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "CudaEngine.h"

namespace freekv::cuda {

using std::to_string;

void CudaEngine::InitManifest(Session& s) {
  std::memset(s.host.manifest, 0, s.layout.manifest_bytes);
  auto* hdr = reinterpret_cast<ManifestHeader*>(s.host.manifest);
  hdr->magic = kManifestMagic;
  hdr->layers = (uint32_t)s.geo.layers;
  hdr->context_tokens = 0;
}

uint32_t* CudaEngine::LayerWords(const Session& s, int layer) {
  return reinterpret_cast<uint32_t*>(s.host.manifest + sizeof(ManifestHeader)) + 2 * layer;
}

ManifestQueryRecord* CudaEngine::QueryRecord(const Session& s, int layer, int r) {
  return reinterpret_cast<ManifestQueryRecord*>(s.host.manifest + s.layout.manifest_query_offset +
                                                (2 * (size_t)layer + r) * s.layout.manifest_query_record_bytes);
}

void CudaEngine::WriteQueryRecord(Session& s, int layer, const float* q) {
  LayerTier& L = *s.layers[layer];
  const uint32_t seq = ++L.record_seq;
  ManifestQueryRecord* rec = QueryRecord(s, layer, (int)(seq % 2));
  if (q) std::memcpy(rec + 1, q, sizeof(float) * s.geo.q_heads * s.geo.head_dim);
  rec->tokens = (uint64_t)L.tokens;
  rec->seq = seq;
  rec->flags = (L.has_q ? kQueryValid : 0u) | (L.first_decode ? kFirstDecodePending : 0u);
}

const ManifestQueryRecord* CudaEngine::FindQueryRecord(const Session& s, int layer, uint64_t tokens) {
  const ManifestQueryRecord* best = nullptr;
  for (int r = 0; r < 2; ++r) {
    const ManifestQueryRecord* rec = QueryRecord(s, layer, r);
    if (rec->flags != 0 && rec->tokens == tokens && (!best || rec->seq > best->seq)) best = rec;
  }
  return best;
}

void CudaEngine::WriteManifest(Session& s, int layer) {
  const LayerTier& L = *s.layers[layer];
  uint32_t* w = reinterpret_cast<uint32_t*>(s.host.manifest + sizeof(ManifestHeader)) + 2 * layer;
  w[0] = (uint32_t)(L.tokens / s.P);
  w[1] = (uint32_t)(L.tokens % s.P);
  reinterpret_cast<ManifestHeader*>(s.host.manifest)->context_tokens = Context(s);
  s.host_stats.context_tokens = Context(s);
}

}  // namespace freekv::cuda
