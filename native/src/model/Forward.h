// The CPU forward pass: embeddings, per layer RMSNorm -> q/k/v (+bias) -> RoPE -> attention
// through the backend (the FreeKV engine) -> o_proj -> residual -> RMSNorm -> SwiGLU MLP ->
// residual, then the final norm and the LM head. Prefill runs prompt chunks through all layers;
// decode runs one token of each of a batch of sessions through all layers in one call.
#pragma once

#include <memory>
#include <vector>

#include "model/Attention.h"
#include "model/ModelConfig.h"
#include "model/Weights.h"

namespace freekv::model {

class Forward {
 public:
  Forward(ModelConfig config, Weights weights, AttentionBackend* attention);

  // Runs tokens [n] at positions start.. through the model, `chunk` tokens at a time (each chunk
  // attends to the whole context before it). Returns logits of the last position [vocab], or of
  // every position [n][vocab] with all_logits. Throws std::invalid_argument on bad input.
  std::vector<float> Prefill(int session, const std::vector<int>& tokens, int start, bool all_logits, int chunk = 256);

  // One decode step for a batch: tokens[b] at positions[b] of sessions[b]. Logits [batch][vocab].
  std::vector<float> Decode(const std::vector<int>& sessions, const std::vector<int>& tokens, const std::vector<int>& positions);

  const ModelConfig& config() const { return config_; }

 private:
  void CheckTokens(const std::vector<int>& tokens, const char* what) const;
  // x[n][hidden] through every layer; positions[n]; attend(layer, q, k, v, out) does attention.
  template <typename Attend>
  void Layers(float* x, int n, const int* positions, Attend attend);
  void Head(const float* x, int n, float* logits);

  ModelConfig config_;
  Weights w_;
  AttentionBackend* attention_;
};

}  // namespace freekv::model
