// Model weights: the safetensors files are memory-mapped (never read through JavaScript) and
// each tensor is converted once to float32, the type the CPU forward pass computes in.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/ModelConfig.h"

namespace freekv::model {

enum class WeightDType { F32, F16, BF16 };

// Where one tensor lies in a file (absolute offset), as the loader read it from the header.
struct TensorRef {
  std::string name;
  std::string file;
  uint64_t offset = 0;
  uint64_t byte_length = 0;
  WeightDType dtype = WeightDType::F32;
  std::vector<int64_t> shape;
};

// One decoder layer's weights, float32, row-major [out][in] as stored by transformers.
struct LayerWeights {
  std::vector<float> input_norm, post_attention_norm;
  std::vector<float> wq, wk, wv, wo;
  std::vector<float> bq, bk, bv;  // empty without attention bias
  std::vector<float> w_gate, w_up, w_down;
};

struct Weights {
  std::vector<float> embed;    // [vocab][hidden]
  std::vector<float> lm_head;  // [vocab][hidden]; empty when tied (embed is used)
  std::vector<float> final_norm;
  std::vector<LayerWeights> layers;
  const float* head() const { return lm_head.empty() ? embed.data() : lm_head.data(); }
};

// Maps the files, checks every expected tensor's presence, shape and extent, converts to f32.
// Throws std::invalid_argument naming the tensor on any problem.
Weights LoadWeights(const ModelConfig& c, const std::vector<TensorRef>& refs);

float HalfToFloat(uint16_t h);
float BF16ToFloat(uint16_t b);

}  // namespace freekv::model
