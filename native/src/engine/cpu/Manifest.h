// The session manifest in shared memory: what a re-attaching process needs to continue exactly.
//   header (magic, layers, context_tokens = tokens every layer has), per layer the committed
//   full pages and the tokens of the partial page in the tail area, and per layer two query
//   records (see ManifestQueryRecord in Engine.h).
#pragma once

#include <cstdint>
#include <vector>

#include "engine/Engine.h"

namespace freekv::cpu {

class Manifest {
 public:
  Manifest(uint8_t* base, const Layout& layout, int layers, int q_floats)
      : base_(base), layout_(layout), layers_(layers), q_floats_(q_floats) {}

  ManifestHeader* header() const { return reinterpret_cast<ManifestHeader*>(base_); }
  uint32_t* layer_words(int layer) const {
    return reinterpret_cast<uint32_t*>(base_ + sizeof(ManifestHeader)) + 2 * layer;
  }
  ManifestQueryRecord* record(int layer, int r) const {
    return reinterpret_cast<ManifestQueryRecord*>(base_ + layout_.manifest_query_offset +
                                                  (2 * static_cast<size_t>(layer) + r) * layout_.manifest_query_record_bytes);
  }
  float* record_q(int layer, int r) const { return reinterpret_cast<float*>(record(layer, r) + 1); }

  // A fresh session: header, zero pages, no query records.
  void Initialise() const;
  void SetLayer(int layer, uint32_t committed_pages, uint32_t tail_tokens) const {
    layer_words(layer)[0] = committed_pages;
    layer_words(layer)[1] = tail_tokens;
  }
  void SetContext(uint64_t tokens) const { header()->context_tokens = tokens; }
  // Writes the layer's query record numbered `seq` (into slot seq % 2). q may be null.
  void WriteQuery(int layer, uint32_t seq, uint64_t tokens, uint32_t flags, const float* q) const;
  // The layer's record for `tokens` tokens, or null.
  const ManifestQueryRecord* FindQuery(int layer, uint64_t tokens) const;

 private:
  uint8_t* base_;
  Layout layout_;
  int layers_;
  int q_floats_;
};

}  // namespace freekv::cpu
