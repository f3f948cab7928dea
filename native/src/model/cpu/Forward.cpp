#include "model/cpu/Forward.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <stdexcept>
#include <string>

#include "model/cpu/Kernels.h"

namespace freekv::model {

Forward::Forward(ModelConfig config, Weights weights, AttentionBackend* attention)
    : config_(std::move(config)), w_(std::move(weights)), attention_(attention) {}

void CheckTokens(const ModelConfig& c, const std::vector<int>& tokens, const char* what) {
  for (size_t i = 0; i < tokens.size(); i++)
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size)
      throw Refused(std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(tokens[i]) +
                    " is out of range [0, " + std::to_string(c.vocab_size) + ")");
}

void CheckPrefill(const ModelConfig& c, const std::vector<int>& tokens, int start, uint64_t context) {
  if (tokens.empty()) throw Refused("tokens must not be empty");
  CheckTokens(c, tokens, "tokens");
  if (start < 0) throw Refused("startPosition must be >= 0");
  if (context != static_cast<uint64_t>(start))
    throw Refused("startPosition " + std::to_string(start) + " does not match the session's context of " +
                  std::to_string(context) + " tokens");
}

void ParallelCopy(float* dst, const float* src, size_t n) {
  constexpr size_t kChunk = size_t(1) << 16;  // 256 KB a piece
  const long pieces = static_cast<long>((n + kChunk - 1) / kChunk);
  const int threads = static_cast<int>(std::max<long>(1, std::min<long>({8, pieces, omp_get_max_threads()})));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long i = 0; i < pieces; ++i) {
    const size_t a = static_cast<size_t>(i) * kChunk, b = std::min(n, a + kChunk);
    std::memcpy(dst + a, src + a, (b - a) * sizeof(float));
  }
}

void CheckDecode(const ModelConfig& c, const std::vector<int>& sessions, const std::vector<int>& tokens,
                 const std::vector<int>& positions, const std::function<uint64_t(int)>& context) {
  const size_t B = sessions.size();
  if (B == 0) throw Refused("sessions must not be empty");
  if (tokens.size() != B || positions.size() != B)
    throw Refused("sessions, tokens and positions must have the same length");
  CheckTokens(c, tokens, "tokens");
  std::set<int> seen;
  for (size_t b = 0; b < B; b++) {
    if (!seen.insert(sessions[b]).second)
      throw Refused("sessions[" + std::to_string(b) + "] appears twice in one decode step");
    const uint64_t ctx = context(sessions[b]);
    if (positions[b] < 0 || ctx != static_cast<uint64_t>(positions[b]))
      throw Refused("positions[" + std::to_string(b) + "] = " + std::to_string(positions[b]) +
                    " does not match the session's context of " + std::to_string(ctx) + " tokens");
  }
}

void CheckGeometry(const ModelConfig& c, int session, const Geometry& g) {
  if (g.layers != c.layers || g.q_heads != c.q_heads || g.kv_heads != c.kv_heads || g.head_dim != c.head_dim)
    throw Refused("session " + std::to_string(session) + " was made for another model: geometry " +
                  std::to_string(g.layers) + " layers, " + std::to_string(g.q_heads) + " query heads, " +
                  std::to_string(g.kv_heads) + " KV heads, head dim " + std::to_string(g.head_dim) + "; this model has " +
                  std::to_string(c.layers) + ", " + std::to_string(c.q_heads) + ", " + std::to_string(c.kv_heads) +
                  ", " + std::to_string(c.head_dim));
}

template <typename Attend>
void Forward::Layers(float* x, int n, const int* positions, Attend attend, int last_rows) {
  const ModelConfig& c = config_;
  const int H = c.hidden_size, I = c.intermediate_size, Q = c.q_dim(), K = c.kv_dim();
  std::vector<float> h(static_cast<size_t>(n) * H), q(static_cast<size_t>(n) * Q), k(static_cast<size_t>(n) * K),
      v(static_cast<size_t>(n) * K), a(static_cast<size_t>(n) * Q), o(static_cast<size_t>(n) * H),
      g(static_cast<size_t>(n) * I), u(static_cast<size_t>(n) * I);
  for (int l = 0; l < c.layers; l++) {
    const LayerWeights& L = w_.layers[l];
    // The rows carried on: all, or in the last layer the last last_rows (none: nothing reads it).
    const int m = l == c.layers - 1 && last_rows >= 0 ? last_rows : n;
    // Queries of those rows only, and at least of the last (the engine keeps it for the first
    // decode step); every row's k and v.
    const size_t q0 = static_cast<size_t>(n - std::max(m, 1));
    RmsNorm(x, n, H, L.input_norm.data(), c.rms_norm_eps, h.data());
    Linear(h.data() + q0 * H, n - static_cast<int>(q0), H, L.wq.data(), L.bq.empty() ? nullptr : L.bq.data(), Q,
           q.data() + q0 * Q);
    Linear(h.data(), n, H, L.wk.data(), L.bk.empty() ? nullptr : L.bk.data(), K, k.data());
    Linear(h.data(), n, H, L.wv.data(), L.bv.empty() ? nullptr : L.bv.data(), K, v.data());
    Rope(q.data() + q0 * Q, n - static_cast<int>(q0), c.q_heads, c.head_dim, positions + q0, c.rope_inv_freq.data());
    Rope(k.data(), n, c.kv_heads, c.head_dim, positions, c.rope_inv_freq.data());
    attend(l, q.data(), k.data(), v.data(), a.data(), m == n ? -1 : m);
    if (m == 0) continue;
    const size_t r0 = static_cast<size_t>(n - m);
    float* xr = x + r0 * H;
    Linear(a.data() + r0 * Q, m, Q, L.wo.data(), nullptr, H, o.data());
    AddInPlace(xr, o.data(), static_cast<long>(m) * H);
    RmsNorm(xr, m, H, L.post_attention_norm.data(), c.rms_norm_eps, h.data());
    Linear(h.data(), m, H, L.w_gate.data(), nullptr, I, g.data());
    Linear(h.data(), m, H, L.w_up.data(), nullptr, I, u.data());
    SwiGlu(g.data(), u.data(), static_cast<long>(m) * I);
    Linear(g.data(), m, I, L.w_down.data(), nullptr, H, o.data());
    AddInPlace(xr, o.data(), static_cast<long>(m) * H);
  }
}

void Forward::Head(const float* x, int n, float* logits) {
  const int H = config_.hidden_size;
  std::vector<float> h(static_cast<size_t>(n) * H);
  RmsNorm(x, n, H, w_.final_norm.data(), config_.rms_norm_eps, h.data());
  Linear(h.data(), n, H, w_.head(), nullptr, config_.vocab_size, logits);
}

std::vector<float> Forward::Prefill(int session, const std::vector<int>& tokens, int start, bool all_logits, int chunk) {
  CheckPrefill(config_, tokens, start, attention_->ContextTokens(session));
  if (auto g = attention_->SessionGeometry(session)) CheckGeometry(config_, session, *g);
  if (chunk <= 0) chunk = 256;
  const int H = config_.hidden_size, V = config_.vocab_size, total = static_cast<int>(tokens.size());
  std::vector<float> logits(static_cast<size_t>(all_logits ? total : 1) * V);
  for (int c0 = 0; c0 < total; c0 += chunk) {
    const int n = std::min(chunk, total - c0);
    std::vector<float> x(static_cast<size_t>(n) * H);
    std::vector<int> pos(n);
    for (int i = 0; i < n; i++) {
      pos[i] = start + c0 + i;
      std::memcpy(&x[static_cast<size_t>(i) * H], &w_.embed[static_cast<size_t>(tokens[c0 + i]) * H], H * sizeof(float));
    }
    // Where only the prompt's last row's logits are read, the last layer runs that row of the
    // last chunk and no row of the others (Layers' last_rows).
    const bool last = c0 + n == total;
    Layers(x.data(), n, pos.data(), [&](int layer, const float* q, const float* k, const float* v, float* out, int rows) {
      attention_->PrefillAttend(session, layer, q, k, v, n, out, rows);
    }, all_logits ? -1 : (last ? 1 : 0));
    if (all_logits) {
      Head(x.data(), n, &logits[static_cast<size_t>(c0) * V]);
    } else if (last) {
      Head(&x[static_cast<size_t>(n - 1) * H], 1, logits.data());
    }
  }
  return logits;
}

Logits Forward::Decode(const std::vector<int>& sessions, const std::vector<int>& tokens,
                       const std::vector<int>& positions) {
  CheckDecode(config_, sessions, tokens, positions, [this](int s) { return attention_->ContextTokens(s); });
  for (int s : sessions)
    if (auto g = attention_->SessionGeometry(s)) CheckGeometry(config_, s, *g);
  const int B = static_cast<int>(sessions.size());
  const int H = config_.hidden_size, Q = config_.q_dim(), K = config_.kv_dim();
  std::vector<float> x(static_cast<size_t>(B) * H);
  for (int b = 0; b < B; b++)
    std::memcpy(&x[static_cast<size_t>(b) * H], &w_.embed[static_cast<size_t>(tokens[b]) * H], H * sizeof(float));
  std::vector<DecodeItem> items(B);
  Layers(x.data(), B, positions.data(), [&](int layer, const float* q, const float* k, const float* v, float* out, int) {
    for (int b = 0; b < B; b++) {
      items[b].session = sessions[b];
      items[b].q = q + static_cast<size_t>(b) * Q;
      items[b].k = k + static_cast<size_t>(b) * K;
      items[b].v = v + static_cast<size_t>(b) * K;
      items[b].out = out + static_cast<size_t>(b) * Q;
    }
    attention_->Decode(layer, items);
  });
  Logits logits(static_cast<size_t>(B) * config_.vocab_size, 0.0f);
  Head(x.data(), B, logits.data());
  return logits;
}

}  // namespace freekv::model
