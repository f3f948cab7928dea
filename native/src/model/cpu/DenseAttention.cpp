#include <stdexcept>
#include <string>

#include "model/Attention.h"
#include "model/cpu/Kernels.h"

namespace freekv::model {

std::shared_ptr<DenseAttention::Cache> DenseAttention::Get(int session) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& c = caches_[session];
  if (!c) {
    c = std::make_shared<Cache>();
    c->k.resize(layers_);
    c->v.resize(layers_);
    c->tokens.assign(layers_, 0);
  }
  return c;
}

uint64_t DenseAttention::ContextTokens(int session) const {
  std::shared_ptr<Cache> c;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = caches_.find(session);
    if (it == caches_.end()) return 0;
    c = it->second;
  }
  std::lock_guard<std::mutex> lock(c->mu);
  return c->tokens.back();
}

bool DenseAttention::Release(int session) {
  std::lock_guard<std::mutex> lock(mu_);
  return caches_.erase(session) > 0;
}

void DenseAttention::PrefillAttend(int session, int layer, const float* q, const float* k, const float* v, int n, float* out,
                                   int attend_rows) {
  if (layer < 0 || layer >= layers_) throw std::invalid_argument("layer " + std::to_string(layer) + " out of range");
  const int m = Engine::AttendedRows(attend_rows, n);  // rows [n - m, n) are attended
  const size_t skip = static_cast<size_t>(n - m) * q_heads_ * head_dim_;
  const auto c = Get(session);
  std::lock_guard<std::mutex> lock(c->mu);
  const size_t row = static_cast<size_t>(kv_heads_) * head_dim_;
  c->k[layer].insert(c->k[layer].end(), k, k + n * row);
  c->v[layer].insert(c->v[layer].end(), v, v + n * row);
  c->tokens[layer] += n;
  if (m > 0)
    CausalAttention(q + skip, m, c->k[layer].data(), c->v[layer].data(), static_cast<int>(c->tokens[layer]), q_heads_,
                    kv_heads_, head_dim_, out + skip);
}

void DenseAttention::Decode(int layer, const std::vector<DecodeItem>& items) {
  for (const auto& it : items) PrefillAttend(it.session, layer, it.q, it.k, it.v, 1, it.out);
}

}  // namespace freekv::model
