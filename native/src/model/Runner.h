// What the addon's Model runs: a whole forward pass over the weights. Two implementations:
// Forward (model/Forward.h: CPU, attention through any AttentionBackend) and, in CUDA builds,
// the GPU runner (native/src/model/cuda/forward_cuda.cu: weights, activations and every layer on the
// device, attention through the CUDA engine's device step, logits the only copy back).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/Engine.h"
#include "model/ModelConfig.h"
#include "model/Weights.h"

namespace freekv::model {

// An allocator that leaves elements uninitialised when no value is given: for results the runner
// writes completely. A batch-16 step's logits are 8 MB; zeroing them first (one thread, page by
// page, faulting fresh memory in) cost more than the copy that then overwrites them.
template <class T>
struct NoInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = NoInitAllocator<U>;
  };
  NoInitAllocator() = default;
  template <class U>
  NoInitAllocator(const NoInitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};
// Logits [rows][vocab].
using Logits = std::vector<float, NoInitAllocator<float>>;

// dst[0, n) = src[0, n) on up to 8 OpenMP threads (the page faults of fresh memory included).
void ParallelCopy(float* dst, const float* src, size_t n);

class Runner {
 public:
  virtual ~Runner() = default;
  // Runs tokens [n] at positions start.. through the model, `chunk` tokens at a time (each chunk
  // attends to the whole context before it; 0: the runner's own size, 256 rows on the CPU, whose
  // activations then stay in cache, 2048 on the GPU, where larger GEMMs run nearer the tensor
  // cores' peak). Returns logits of the last position [vocab], or of every position [n][vocab]
  // with all_logits; without it the last layer attends and runs its MLP for the last position
  // only (every position's k and v are cached). Throws std::invalid_argument on bad input.
  virtual std::vector<float> Prefill(int session, const std::vector<int>& tokens, int start, bool all_logits,
                                     int chunk = 0) = 0;
  // One decode step for a batch: tokens[b] at positions[b] of sessions[b]. Logits [batch][vocab].
  virtual Logits Decode(const std::vector<int>& sessions, const std::vector<int>& tokens,
                        const std::vector<int>& positions) = 0;
  // The same step for greedy decoding: the index of each row's largest logit (the first one on
  // ties, as the service's sampler picks), [batch]. The GPU runner picks on the device and copies
  // batch ints instead of batch x vocab floats; this default picks on the host.
  virtual std::vector<int> DecodeArgmax(const std::vector<int>& sessions, const std::vector<int>& tokens,
                                        const std::vector<int>& positions) {
    const Logits logits = Decode(sessions, tokens, positions);
    const int V = config().vocab_size;
    std::vector<int> out(sessions.size());
    for (size_t b = 0; b < out.size(); b++) {
      const float* row = logits.data() + b * V;
      int best = 0;
      for (int i = 1; i < V; i++)
        if (row[i] > row[best]) best = i;
      out[b] = best;
    }
    return out;
  }
  virtual const ModelConfig& config() const = 0;
  // Where the layers run: "cpu" or "cuda".
  virtual std::string device() const = 0;
  // Prompt tokens of a prefill chunk whose attention fills the device once (binding.ts
  // Model.prefillWaveTokens); 1 where chunk sizes do not matter that way.
  virtual int prefill_wave_tokens() const { return 1; }
};

// Input checks shared by the runners, before anything is appended: they throw freekv::Refused
// (engine/Engine.h). context(session) gives the tokens already cached.
void CheckTokens(const ModelConfig& c, const std::vector<int>& tokens, const char* what);
void CheckPrefill(const ModelConfig& c, const std::vector<int>& tokens, int start, uint64_t context);
void CheckDecode(const ModelConfig& c, const std::vector<int>& sessions, const std::vector<int>& tokens,
                 const std::vector<int>& positions, const std::function<uint64_t(int)>& context);
// The engine session was made for this model's shapes: the runner's buffers are sized by the
// model, the engine reads and writes them by the session's geometry (a session made for another
// model, re-attached under this one, would read and write past them).
void CheckGeometry(const ModelConfig& c, int session, const Geometry& g);

#ifdef FREEKV_WITH_CUDA
// The GPU runner over a CUDA engine (engine->device() non-null). Weights are uploaded once:
// in bf16 when `bf16_weights`, else in fp32 (exact fp32 GEMMs). Throws std::invalid_argument when
// the shapes do not suit the GPU GEMMs (widths must be multiples of 8), std::runtime_error when
// cuBLASLt or device memory is unavailable.
std::unique_ptr<Runner> MakeCudaRunner(ModelConfig config, Weights weights, Engine* engine, bool bf16_weights);
#endif

}  // namespace freekv::model
