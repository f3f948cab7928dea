// The CPU forward pass: embeddings, per layer RMSNorm -> q/k/v (+bias) -> RoPE -> attention
// through the backend (the FreeKV engine) -> o_proj -> residual -> RMSNorm -> SwiGLU MLP ->
// residual, then the final norm and the LM head. Prefill runs prompt chunks through all layers;
// decode runs one token of each of a batch of sessions through all layers in one call.
#pragma once

#include <memory>
#include <vector>

#include "model/Attention.h"
#include "model/Runner.h"
#include "model/ModelConfig.h"
#include "model/Weights.h"

namespace freekv::model {

class Forward final : public Runner {
 public:
  Forward(ModelConfig config, Weights weights, AttentionBackend* attention);

  std::vector<float> Prefill(int session, const std::vector<int>& tokens, int start, bool all_logits,
                             int chunk = 256) override;
  Logits Decode(const std::vector<int>& sessions, const std::vector<int>& tokens,
                const std::vector<int>& positions) override;
  const ModelConfig& config() const override { return config_; }
  std::string device() const override { return "cpu"; }

 private:
  // x[n][hidden] through every layer; positions[n]; attend(layer, q, k, v, out, attend_rows) does
  // attention (attend_rows: Engine::PrefillAttend's, -1 for all rows).
  // last_rows (-1: all n): the last layer attends and runs o_proj and the MLP for the last
  // last_rows rows only (their x is what the logits read); its k and v still go to the cache.
  template <typename Attend>
  void Layers(float* x, int n, const int* positions, Attend attend, int last_rows = -1);
  void Head(const float* x, int n, float* logits);

  ModelConfig config_;
  Weights w_;
  AttentionBackend* attention_;
};

}  // namespace freekv::model
