#include "engine/Manifest.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace freekv {

void InitManifest(uint8_t* base, size_t bytes, int layers) {
  if (layers < 1 || !base || bytes < ManifestWordsBytes(layers))
    throw std::invalid_argument("manifest of " + std::to_string(bytes) + " bytes cannot hold " + std::to_string(layers) + " layers");
  std::memset(base, 0, bytes);
  auto* h = reinterpret_cast<ManifestHeader*>(base);
  h->magic = kManifestMagic;
  h->layers = static_cast<uint32_t>(layers);
  h->context_tokens = 0;
}

ManifestState ReadManifest(const uint8_t* base, size_t bytes, int layers) {
  ManifestState s;
  if (layers < 1 || !base || bytes < ManifestWordsBytes(layers))
    throw std::invalid_argument("manifest of " + std::to_string(bytes) + " bytes cannot hold " + std::to_string(layers) + " layers");
  ManifestHeader h;
  std::memcpy(&h, base, sizeof h);
  s.layers = h.layers;
  s.context_tokens = h.context_tokens;
  s.valid = h.magic == kManifestMagic && h.layers == static_cast<uint32_t>(layers);
  s.corrupt = h.magic == kManifestCorruptMagic;
  s.committed_pages.resize(layers);
  s.tail_tokens.resize(layers);
  for (int l = 0; l < layers; ++l) {
    uint32_t w[2];
    std::memcpy(w, base + sizeof(ManifestHeader) + kManifestLayerBytes * l, sizeof w);
    s.committed_pages[l] = w[0];
    s.tail_tokens[l] = w[1];
  }
  return s;
}

void MarkManifestCorrupt(uint8_t* base, size_t bytes) {
  if (!base || bytes < sizeof(ManifestHeader)) throw std::invalid_argument("manifest of " + std::to_string(bytes) + " bytes has no header");
  const uint32_t m = kManifestCorruptMagic;
  std::memcpy(base, &m, sizeof m);
}

bool ManifestCorrupt(const uint8_t* base, size_t bytes) {
  if (!base || bytes < sizeof(ManifestHeader)) throw std::invalid_argument("manifest of " + std::to_string(bytes) + " bytes has no header");
  uint32_t m;
  std::memcpy(&m, base, sizeof m);
  return m == kManifestCorruptMagic;
}

void Manifest::WriteQuery(int layer, uint32_t seq, uint64_t tokens, uint32_t flags, const float* q) const {
  const int r = static_cast<int>(seq % 2);
  auto* rec = record(layer, r);
  if (q) std::memcpy(record_q(layer, r), q, sizeof(float) * q_floats_);
  rec->tokens = tokens;
  rec->seq = seq;
  rec->flags = flags;
}

const ManifestQueryRecord* Manifest::FindQuery(int layer, uint64_t tokens) const {
  const ManifestQueryRecord* best = nullptr;
  for (int r = 0; r < 2; ++r) {
    const auto* rec = record(layer, r);
    if (rec->flags != 0 && rec->tokens == tokens && (!best || rec->seq > best->seq)) best = rec;
  }
  return best;
}

}  // namespace freekv
