// Where the forward pass gets attention from. The shipped path is the FreeKV engine
// (EngineAttention: PrefillAttend for prompt chunks, Decode for a batch). DenseAttention keeps a
// plain in-memory KV cache per session: the reference for the engine in the model tests and the
// fallback for a Model constructed without an engine.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "engine/Engine.h"

namespace freekv::model {

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  // Tokens already in the session's cache (the position of the next token).
  virtual uint64_t ContextTokens(int session) const = 0;
  // The session's geometry where it has its own (an engine session); none where the cache is
  // shaped by the model itself.
  virtual std::optional<Geometry> SessionGeometry(int) const { return std::nullopt; }
  // Appends n tokens' post-RoPE k/v to a layer and returns exact causal attention of q: of its
  // last attend_rows rows only where that is not -1 (Engine::PrefillAttend).
  virtual void PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n, float* out,
                             int attend_rows = -1) = 0;
  // One decode step of one layer for a batch (each item appends its k/v first).
  virtual void Decode(int layer, const std::vector<DecodeItem>& items) = 0;
};

class EngineAttention final : public AttentionBackend {
 public:
  explicit EngineAttention(Engine* engine) : engine_(engine) {}
  uint64_t ContextTokens(int session) const override { return engine_->ContextTokens(session); }
  std::optional<Geometry> SessionGeometry(int session) const override { return engine_->SessionGeometry(session); }
  void PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n, float* out,
                     int attend_rows = -1) override {
    engine_->PrefillAttend(session, layer, q, k, v, n, out, attend_rows);
  }
  void Decode(int layer, const std::vector<DecodeItem>& items) override { engine_->Decode(layer, items); }

 private:
  Engine* engine_;
};

class DenseAttention final : public AttentionBackend {
 public:
  DenseAttention(int layers, int q_heads, int kv_heads, int head_dim)
      : layers_(layers), q_heads_(q_heads), kv_heads_(kv_heads), head_dim_(head_dim) {}
  uint64_t ContextTokens(int session) const override;
  void PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n, float* out,
                     int attend_rows = -1) override;
  void Decode(int layer, const std::vector<DecodeItem>& items) override;
  // Forgets a session's cache; returns false when there was none.
  bool Release(int session);

 private:
  // One session's cache. Its own lock serialises the calls on the session (a layer's append and
  // attention read the same vectors); a Release() meanwhile drops the map's reference only, so a
  // call in flight finishes on the cache it holds.
  struct Cache {
    std::mutex mu;
    std::vector<std::vector<float>> k, v;  // per layer [tokens][kv_heads][head_dim]
    std::vector<uint64_t> tokens;          // per layer
  };
  std::shared_ptr<Cache> Get(int session);
  int layers_, q_heads_, kv_heads_, head_dim_;
  mutable std::mutex mu_;  // the map only
  std::map<int, std::shared_ptr<Cache>> caches_;
};

}  // namespace freekv::model
