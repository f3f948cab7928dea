#include "engine/cpu/Manifest.h"

#include <cstring>

namespace freekv::cpu {

void Manifest::Initialise() const {
  std::memset(base_, 0, layout_.manifest_bytes);
  header()->magic = kManifestMagic;
  header()->layers = static_cast<uint32_t>(layers_);
  header()->context_tokens = 0;
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

}  // namespace freekv::cpu
