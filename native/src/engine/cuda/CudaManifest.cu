// The manifest segment on the CUDA engine (engine/Manifest.h): header, per-layer words
// (committed pages, tail tokens) and the query records a re-attaching process reads.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "CudaEngine.h"
#include "engine/Manifest.h"

namespace freekv::cuda {

using std::to_string;

// The manifest format and its accessors are engine/Manifest.h's (the one definition both backends
// and the kvstore use); these members bind it to a session.
static Manifest ManifestOf(const Session& s) {
  return Manifest(s.host.manifest, s.layout, s.geo.layers, s.geo.q_heads * s.geo.head_dim);
}

void CudaEngine::InitManifest(Session& s) { ManifestOf(s).Initialise(); }

uint32_t* CudaEngine::LayerWords(const Session& s, int layer) { return ManifestOf(s).layer_words(layer); }

ManifestQueryRecord* CudaEngine::QueryRecord(const Session& s, int layer, int r) { return ManifestOf(s).record(layer, r); }

void CudaEngine::WriteQueryRecord(Session& s, int layer, const float* q) {
  LayerTier& L = *s.layers[layer];
  const uint32_t seq = ++L.record_seq;
  ManifestOf(s).WriteQuery(layer, seq, (uint64_t)L.tokens,
                           (L.has_q ? kQueryValid : 0u) | (L.first_decode ? kFirstDecodePending : 0u), q);
}

const ManifestQueryRecord* CudaEngine::FindQueryRecord(const Session& s, int layer, uint64_t tokens) {
  return ManifestOf(s).FindQuery(layer, tokens);
}

void CudaEngine::WriteManifest(Session& s, int layer) {
  const LayerTier& L = *s.layers[layer];
  const Manifest m = ManifestOf(s);
  m.SetLayer(layer, (uint32_t)(L.tokens / s.P), (uint32_t)(L.tokens % s.P));
  m.SetContext(Context(s));
  s.host_stats.context_tokens = Context(s);
}

}  // namespace freekv::cuda
