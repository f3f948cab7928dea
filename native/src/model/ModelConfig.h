// The model runner's view of a decoder-only transformer (Llama, Mistral, Qwen2 share it: RMSNorm,
// RoPE, GQA attention, SwiGLU MLP). Filled from the JS loader's parsed config.json.
#pragma once

#include <string>
#include <vector>

namespace freekv::model {

struct ModelConfig {
  std::string architecture;  // "llama" | "mistral" | "qwen2"
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int layers = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  float rms_norm_eps = 1e-5f;
  // Rotary frequencies after scaling (Llama-3 / linear), head_dim / 2 of them. Computed once by
  // the loader (services/compute/model/rope.ts) so that there is one definition of the scaling.
  std::vector<float> rope_inv_freq;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v projections carry a bias (Qwen2)

  int q_dim() const { return q_heads * head_dim; }
  int kv_dim() const { return kv_heads * head_dim; }
};

// Throws std::invalid_argument naming the field when the shapes cannot describe a model.
void ValidateConfig(const ModelConfig& c);

}  // namespace freekv::model
