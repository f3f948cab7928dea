// The session manifest in shared memory: what a re-attaching process needs to continue exactly.
//   header (magic, layers, context_tokens = tokens every layer has), then per layer two uint32:
//   the committed full pages and the tokens of the partial page in the tail segment; then, at
//   Layout::manifest_query_offset, two ManifestQueryRecords per layer of
//   Layout::manifest_query_record_bytes each (record header + float q[q_heads][head_dim]).
// The engine writes all of it; the kvstore initialises the header (InitManifest) and reads it
// (ReadManifest).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "engine/Layout.h"

namespace freekv {

struct ManifestHeader {
  uint32_t magic;  // 'FKV1' = 0x31564b46
  uint32_t layers;
  uint64_t context_tokens;  // tokens appended to every layer so far
};
constexpr uint32_t kManifestMagic = 0x31564b46u;
// Written over the magic by the kvstore when a committed page of the session no longer matches
// its checksum (services/kvstore/scrubber.ts): compute checks it at every turn and answers
// DATA_LOSS; a re-attach refuses the session.
constexpr uint32_t kManifestCorruptMagic = 0x58564b46u;  // 'FKVX'
constexpr size_t kManifestLayerBytes = 8;  // committed full pages, tail tokens

// The query state a re-attaching process needs to continue with identical outputs: the last
// query of a layer (for the speculative selection that was in flight and for the correction's
// cosine) and whether the next decode is the first after a prefill. Two records per layer are
// written alternately, so a process that died in the middle of a step still finds the record
// that matches the context every layer completed.
struct ManifestQueryRecord {
  uint64_t tokens;  // the layer's tokens after the call that wrote this record
  uint32_t flags;   // kQueryValid | kFirstDecodePending
  uint32_t seq;     // write sequence number of this layer's records
  // followed by float q[q_heads * head_dim]
};
constexpr uint32_t kQueryValid = 1u;
constexpr uint32_t kFirstDecodePending = 2u;

// Bytes of the header and the per-layer words: what InitManifest and ReadManifest need.
inline size_t ManifestWordsBytes(int layers) { return sizeof(ManifestHeader) + kManifestLayerBytes * layers; }

// A fresh session's manifest: all `bytes` zeroed (no pages, no query records), then the header.
// Throws std::invalid_argument when `bytes` cannot hold the header and the layers' words.
void InitManifest(uint8_t* base, size_t bytes, int layers);

struct ManifestState {
  bool valid = false;    // the magic is there and the header's layers match
  bool corrupt = false;  // the kvstore marked the session corrupt
  uint32_t layers = 0;
  uint64_t context_tokens = 0;
  std::vector<uint32_t> committed_pages;  // per layer
  std::vector<uint32_t> tail_tokens;      // per layer
};
ManifestState ReadManifest(const uint8_t* base, size_t bytes, int layers);

// The corrupt marker (see kManifestCorruptMagic). Both need bytes >= sizeof(ManifestHeader).
void MarkManifestCorrupt(uint8_t* base, size_t bytes);
bool ManifestCorrupt(const uint8_t* base, size_t bytes);

// The committed full pages of `layer` in a manifest: the pages the engine has offloaded to the
// store, written before the call that filled them returns (what the compute tier may commit).
inline uint32_t ManifestCommittedPages(const uint8_t* manifest, int layer) {
  uint32_t w;
  std::memcpy(&w, manifest + sizeof(ManifestHeader) + kManifestLayerBytes * static_cast<size_t>(layer), sizeof w);
  return w;
}

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
  void Initialise() const { InitManifest(base_, layout_.manifest_bytes, layers_); }
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

}  // namespace freekv
