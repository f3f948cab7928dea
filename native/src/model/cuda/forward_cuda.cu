// The GPU model runner (model/Runner.h): every layer of a Llama-family model on the device.
//
// Per layer, for M rows (a decode batch or a prefill chunk), on the engine's stream:
//   h   = RMSNorm(x)                                  (operand type T: bf16 or fp32)
//   qkv = h Wqkv^T (+ bias)                           one GEMM over the fused [q|k|v] weight, fp32 out
//   q, k, v = RoPE(split(qkv))                        fp32, what the engine takes (a bf16 prefill:
//                                                     q in bf16 for the tensor-core kernel)
//   a   = attention                                   decode: engine DecodeDevice; prefill: engine
//                                                     PrefillDevice (on tensor cores for bf16
//                                                     weights); both on device pointers
//   x  += T(a) Wo^T                                   GEMM with beta = 1 into the fp32 residual
//   h   = RMSNorm(x);  gu = h Wgu^T                   fused [gate|up] weight (fp32 out; a prefill's
//                                                     bf16 by default, FREEKV_PREFILL_GATE_UP)
//   x  += T(silu(gate) * up) Wdown^T                  beta = 1 again
// then logits = T(RMSNorm(x)) Wlm^T (fp32) and one copy of the logits to the host. A prompt read for
// its last row's logits only runs the last layer's attention, o_proj and MLP for that row (its k
// and v for every row): nothing else reads the last layer's output.
//
// A decode step is BeginDeviceStep, the layers, the logits copy and EndDeviceStep: the host waits
// once per step, for the logits, never inside it. Every stream operation goes through the engine's
// step op list (Op below), so the whole step, GEMMs included, is replayed as one CUDA graph once
// its shape repeats (step_graph.cuh); outside a device step (prefill) Op issues at once. Weights are uploaded once; T = bf16 for bf16/f16
// checkpoints (as served in practice), fp32 for fp32 checkpoints, where the GEMMs are exact fp32
// (no TF32) and the runner matches the CPU forward pass to accumulation order.
#include <cuda_bf16.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_check.cuh"
#include "cuda/device_memory.cuh"
#include "gemm_cublaslt.cuh"
#include "model/Runner.h"
#include "model_kernels.cuh"
#include "cuda/step_graph.cuh"
#include "engine/DeviceEngine.h"

namespace freekv::model {
namespace {

using cuda::DeviceArray;
using cuda::Gemm;
using cuda::GemmType;
using cuda::PinnedBuffer;

// A weight matrix on the device in the runner's operand type (rows x cols, row-major).
struct DevMatrix {
  DeviceArray<uint8_t> mem;
  const void* get() const { return mem.get(); }
};

// FREEKV_PREFILL_PROFILE=1: where a prefill's time goes, one line per Prefill call on stderr.
// Device time between CUDA events recorded on the runner's stream around each part of every
// chunk (embedding; per layer: norm + q/k/v GEMM + RoPE, the engine's attention with its append,
// summaries and offload issue, o_proj + MLP; the head), and host time (issuing, the chunk's wait,
// the engine's finish that waits for the offload and writes the manifests). Totals from the
// session's token 0 are carried so the last line of a prompt is its whole breakdown. Off by
// default: the events cost a few microseconds per layer.
// FREEKV_PREFILL_GATE_UP: "bf16" (the default) or "f32", the gate/up GEMM's output type in a
// prefill (decode steps keep fp32). The services validate it at start.
bool PrefillGateUpBf16() {
  const char* e = std::getenv("FREEKV_PREFILL_GATE_UP");
  if (!e || !*e || std::strcmp(e, "bf16") == 0) return true;
  if (std::strcmp(e, "f32") == 0) return false;
  throw std::invalid_argument(std::string("FREEKV_PREFILL_GATE_UP must be bf16 or f32, got '") + e + "'");
}

class PrefillProfile {
 public:
  static bool On() {
    static const bool on = [] {
      const char* e = std::getenv("FREEKV_PREFILL_PROFILE");
      return e && *e && std::strcmp(e, "0") != 0;
    }();
    return on;
  }
  enum Part { kEmbed, kPre, kAttn, kPost, kHead, kParts };
  void Mark(cudaStream_t s, int part) {
    // The host's issue time of the part, apart from the device's: which calls the issuing costs.
    const auto now = std::chrono::steady_clock::now();
    if (part >= 0 && have_host_mark_) host_[part] += std::chrono::duration<double, std::milli>(now - host_mark_).count();
    host_mark_ = now;
    have_host_mark_ = true;
    cudaEvent_t e;
    FKV_CUDA_CHECK(cudaEventCreate(&e));
    FKV_CUDA_CHECK(cudaEventRecord(e, s));
    marks_.push_back({e, part});
  }
  // After the stream is idle: folds the marks into the totals (each mark closes the interval
  // since the previous one under its part).
  void Collect() {
    for (size_t i = 1; i < marks_.size(); ++i) {
      float ms = 0;
      if (marks_[i].part >= 0 && cudaEventElapsedTime(&ms, marks_[i - 1].e, marks_[i].e) == cudaSuccess)
        device_[marks_[i].part] += ms;
    }
    DropMarks();  // the times stay in device_ until Report
  }
  // Drops the marks and times of a call that did not complete (it threw).
  void Discard() {
    DropMarks();
    for (double& d : device_) d = 0;
    for (double& d : host_) d = 0;
  }
  void Report(int session, int start, int n, int chunk, double issue_ms, double register_ms, double wait_ms, double finish_ms) {
    if (start == 0) {
      totals_.erase(session);
      if (totals_.size() >= 64) totals_.clear();  // sessions that ended mid-prompt: kept only so long
    }
    Totals& t = totals_[session];
    for (int p = 0; p < kParts; ++p) t.device[p] += device_[p], t.host[p] += host_[p];
    t.issue += issue_ms;
    t.reg += register_ms;
    t.wait += wait_ms;
    t.finish += finish_ms;
    t.tokens = start + n;
    std::fprintf(stderr,
                 "[prefill-profile] session %d tokens %d..%d chunk %d: device ms embed %.2f pre %.2f attn %.2f post %.2f "
                 "head %.2f; host ms issue %.2f (of it registering ahead %.2f) wait %.2f finish %.2f | from token 0 to %lld: "
                 "device ms pre %.1f attn %.1f post %.1f other %.1f; host ms issue %.1f (registering %.1f) wait %.1f "
                 "finish %.1f; host issue ms by part pre %.1f attn %.1f post %.1f other %.1f\n",
                 session, start, start + n, chunk, device_[kEmbed], device_[kPre], device_[kAttn], device_[kPost],
                 device_[kHead], issue_ms, register_ms, wait_ms, finish_ms, (long long)t.tokens, t.device[kPre],
                 t.device[kAttn], t.device[kPost], t.device[kEmbed] + t.device[kHead], t.issue, t.reg, t.wait, t.finish,
                 t.host[kPre], t.host[kAttn], t.host[kPost], t.host[kEmbed] + t.host[kHead]);
    for (double& d : device_) d = 0;
    for (double& d : host_) d = 0;
  }

 private:
  void DropMarks() {
    for (auto& m : marks_) cudaEventDestroy(m.e);
    marks_.clear();
    have_host_mark_ = false;
  }
  struct Mark_ {
    cudaEvent_t e;
    int part;
  };
  struct Totals {
    double device[kParts] = {}, host[kParts] = {};
    double issue = 0, reg = 0, wait = 0, finish = 0;
    long long tokens = 0;
  };
  std::vector<Mark_> marks_;
  double device_[kParts] = {}, host_[kParts] = {};
  std::chrono::steady_clock::time_point host_mark_;
  bool have_host_mark_ = false;
  std::map<int, Totals> totals_;
};

class CudaRunner final : public Runner {
 public:
  CudaRunner(ModelConfig c, Weights w, Engine* engine, bool bf16)
      : c_(std::move(c)), engine_(engine), bf16_(bf16) {
    device_engine_ = engine_ ? engine_->device() : nullptr;
    if (!device_engine_)
      throw std::invalid_argument("the GPU model runner needs an engine with device steps (backend 'cuda')");
    stream_ = static_cast<cudaStream_t>(device_engine_->DeviceStream());
    graph_ = device_engine_->DeviceStepGraph();
    FKV_CUDA_CHECK(cudaStreamGetDevice(stream_, &device_));
    FKV_CUDA_CHECK(cudaSetDevice(device_));
    std::string why;
    if (!cuda::CublasLtAvailable(&why)) throw std::runtime_error("the GPU model runner needs cuBLASLt: " + why);
    const int mult = bf16_ ? 8 : 4;
    auto need = [&](int v, const char* name) {
      if (v % mult)
        throw std::invalid_argument(std::string("the GPU model runner needs ") + name + " to be a multiple of " +
                                    std::to_string(mult) + " (got " + std::to_string(v) + ")");
    };
    need(c_.hidden_size, "hiddenSize");
    need(c_.intermediate_size, "intermediateSize");
    need(c_.q_dim(), "qHeads * headDim");
    need(c_.kv_dim(), "kvHeads * headDim");
    need(c_.vocab_size, "vocabSize");
    if ((int)c_.rope_inv_freq.size() != c_.head_dim / 2)
      throw std::invalid_argument("config.ropeInvFreq must hold headDim / 2 values");
    Upload(std::move(w));
    // bf16 runners prefill on the tensor-core kernel (PrefillDevice's tensor_cores), fp32 ones on
    // the exact per-row kernel, where chunk sizes do not matter that way.
    if (bf16_) wave_tokens_ = device_engine_->PrefillWaveTokens(c_.q_heads, c_.kv_heads, c_.head_dim);
  }

  ~CudaRunner() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
  }

  const ModelConfig& config() const override { return c_; }
  std::string device() const override { return "cuda"; }
  int prefill_wave_tokens() const override { return wave_tokens_; }

  std::vector<float> Prefill(int session, const std::vector<int>& tokens, int start, bool all_logits,
                             int chunk) override;
  Logits Decode(const std::vector<int>& sessions, const std::vector<int>& tokens,
                const std::vector<int>& positions) override;
  std::vector<int> DecodeArgmax(const std::vector<int>& sessions, const std::vector<int>& tokens,
                                const std::vector<int>& positions) override;

 private:
  // One decode step up to the logits on the device (logits_ [B][V]); `read` queues the step's
  // copy back (logits or picks) before the engine's end-of-step wait.
  template <class Read>
  void Step(const std::vector<int>& sessions, const std::vector<int>& tokens, const std::vector<int>& positions,
            Read read);

  struct Layer {
    DevMatrix wqkv, wo, wgu, wdown;
    DeviceArray<float> bqkv, in_norm, post_norm;
    bool bias = false;
  };

  size_t TypeBytes() const { return bf16_ ? 2 : 4; }

  // f(a..., stream_) now, or queued in the open device step (step_graph.cuh).
  template <class F, class... A>
  void Op(F f, A... a) {
    graph_->Op(stream_, f, a...);
  }
  static void GemmOp(const void* x, const void* w, void* y, int M, int N, int K, GemmType in, GemmType out,
                     float alpha, float beta, cudaStream_t s) {
    Gemm(x, w, y, M, N, K, in, out, s, alpha, beta);
  }
  GemmType OperandType() const { return bf16_ ? GemmType::BF16 : GemmType::F32; }

  // Copies host fp32 rows (the concatenation of `parts`) into a device matrix of the operand type.
  void UploadMatrix(DevMatrix& m, std::initializer_list<const std::vector<float>*> parts) {
    size_t n = 0;
    for (auto* p : parts) n += p->size();
    m.mem.Resize(n * TypeBytes());
    size_t off = 0;
    for (auto* p : parts) {
      // Through an fp32 staging buffer on the device, converted there (bf16) or copied (fp32).
      const size_t chunk = size_t(16) << 20;
      for (size_t i = 0; i < p->size(); i += chunk) {
        const size_t len = std::min(chunk, p->size() - i);
        if (bf16_) {
          staging_.Resize(chunk);
          FKV_CUDA_CHECK(cudaMemcpyAsync(staging_.get(), p->data() + i, len * sizeof(float), cudaMemcpyHostToDevice,
                                         stream_));
          cuda::LaunchToBf16(staging_.get(), len, m.mem.get() + (off + i) * 2, stream_);
          FKV_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the staging buffer is reused
        } else {
          FKV_CUDA_CHECK(cudaMemcpy(m.mem.get() + (off + i) * 4, p->data() + i, len * sizeof(float),
                                    cudaMemcpyHostToDevice));
        }
      }
      off += p->size();
    }
  }
  static void UploadF32(DeviceArray<float>& d, const std::vector<float>& h) {
    d.Resize(h.size());
    FKV_CUDA_CHECK(cudaMemcpy(d.get(), h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
  }

  void Upload(Weights w) {
    const int Q = c_.q_dim(), K = c_.kv_dim();
    layers_.resize(c_.layers);
    for (int l = 0; l < c_.layers; ++l) {
      LayerWeights& L = w.layers[l];
      Layer& d = layers_[l];
      UploadMatrix(d.wqkv, {&L.wq, &L.wk, &L.wv});
      UploadMatrix(d.wo, {&L.wo});
      UploadMatrix(d.wgu, {&L.w_gate, &L.w_up});
      UploadMatrix(d.wdown, {&L.w_down});
      UploadF32(d.in_norm, L.input_norm);
      UploadF32(d.post_norm, L.post_attention_norm);
      d.bias = !L.bq.empty();
      if (d.bias) {
        std::vector<float> b;
        b.reserve((size_t)Q + 2 * K);
        b.insert(b.end(), L.bq.begin(), L.bq.end());
        b.insert(b.end(), L.bk.begin(), L.bk.end());
        b.insert(b.end(), L.bv.begin(), L.bv.end());
        UploadF32(d.bqkv, b);
      }
      L = LayerWeights();  // host copy no longer needed
    }
    UploadMatrix(embed_, {&w.embed});
    if (!w.lm_head.empty()) UploadMatrix(lm_head_, {&w.lm_head});
    UploadF32(final_norm_, w.final_norm);
    UploadF32(inv_freq_, c_.rope_inv_freq);
    staging_ = DeviceArray<float>();
  }

  // Activation buffers for M rows (grown while the stream is idle).
  void Size(int M) {
    if (M <= rows_) return;
    FKV_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const size_t H = c_.hidden_size, I = c_.intermediate_size, Q = c_.q_dim(), K = c_.kv_dim();
    const size_t widest = std::max({H, I, Q});
    x_.Resize(M * H);
    op_.Resize(M * widest * TypeBytes());
    qkv_.Resize(M * (Q + 2 * K));
    q_.Resize(M * Q);
    k_.Resize(M * K);
    v_.Resize(M * K);
    attn_.Resize(M * Q);
    gu_.Resize(M * 2 * I);
    if (bf16_) q16_.Resize(M * Q * 2);
    ids_.Resize(2 * (size_t)M);
    ids_pin_.Resize(2 * (size_t)M * sizeof(int));
    rows_ = M;
  }

  // Logits buffers for n rows, sized apart from the activations: a prefill chunk of M rows needs
  // the last row's logits only, and [2048][128256] fp32 logits on the device plus as much pinned
  // host memory (1 GiB each, the pinned allocation alone a few hundred ms) were paid on the first
  // long prompt for nothing.
  void SizeLogits(int n) {
    if (n <= logit_rows_) return;
    FKV_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const size_t V = c_.vocab_size;
    logits_.Resize(n * V);
    logits_pin_.Resize(n * V * sizeof(float));
    logit_rows_ = n;
  }

  // x [M][H] = embeddings of tokens; positions to the device too. Needs Size(M).
  void Embed(const int* tokens, const int* positions, int M) {
    int* hp = reinterpret_cast<int*>(ids_pin_.get());
    std::memcpy(hp, tokens, M * sizeof(int));
    std::memcpy(hp + M, positions, M * sizeof(int));
    Op(cuda::MemcpyOp, static_cast<void*>(ids_.get()), static_cast<const void*>(hp), 2 * M * sizeof(int),
       cudaMemcpyHostToDevice);
    Op(cuda::LaunchEmbed, embed_.get(), bf16_, static_cast<const int*>(ids_.get()), M, c_.hidden_size, x_.get());
  }

  // The layer before attention: q_, k_, v_ for M rows.
  // q16: the rotated queries in bf16 there (all rows) and in q_ only the last row (see
  // LaunchBiasRopeSplit), for the engine's tensor-core prefill.
  void PreAttention(const Layer& L, int M, void* q16 = nullptr) {
    const int H = c_.hidden_size, Q = c_.q_dim(), K = c_.kv_dim();
    Op(cuda::LaunchRmsNorm, static_cast<const float*>(x_.get()), static_cast<const float*>(L.in_norm.get()), M, H,
       c_.rms_norm_eps, static_cast<void*>(op_.get()), bf16_);
    Op(GemmOp, static_cast<const void*>(op_.get()), L.wqkv.get(), static_cast<void*>(qkv_.get()), M, Q + 2 * K, H,
       OperandType(), GemmType::F32, 1.f, 0.f);
    Op(cuda::LaunchBiasRopeSplit, static_cast<const float*>(qkv_.get()),
       static_cast<const float*>(L.bias ? L.bqkv.get() : nullptr), static_cast<const int*>(ids_.get() + M),
       static_cast<const float*>(inv_freq_.get()), M, c_.q_heads, c_.kv_heads, c_.head_dim, q_.get(), k_.get(),
       v_.get(), q16);
  }

  // The layer after attention (attn_ holds it): o_proj and the MLP, both added into x_.
  // attn_in_op: the attention's output is already in op_ as bf16 (PrefillDevice wrote it there).
  // gu_bf16: the gate/up GEMM writes bf16 (half the bytes written and read back by SwiGLU; the
  // values PyTorch's bf16 Linear layers give) instead of fp32 (FREEKV_PREFILL_GATE_UP).
  // r0: the rows are [r0, r0 + M) of the attention output and of x_ (the intermediates use rows
  // from 0): a prompt's last layer runs only the row whose logits are read.
  void PostAttention(const Layer& L, int M, bool attn_in_op = false, bool gu_bf16 = false, int r0 = 0) {
    const int H = c_.hidden_size, I = c_.intermediate_size, Q = c_.q_dim();
    const size_t op_row = (size_t)Q * (bf16_ ? 2 : 4);  // bytes of one attention row in op_
    const void* a = attn_in_op ? static_cast<const void*>(op_.get() + r0 * op_row)
                               : static_cast<const void*>(attn_.get() + (size_t)r0 * Q);
    if (bf16_ && !attn_in_op) {
      Op(cuda::LaunchToBf16, static_cast<const float*>(attn_.get() + (size_t)r0 * Q), (size_t)M * Q,
         static_cast<void*>(op_.get()));
      a = op_.get();
    }
    float* x = x_.get() + (size_t)r0 * H;
    Op(GemmOp, a, L.wo.get(), static_cast<void*>(x), M, H, Q, OperandType(), GemmType::F32, 1.f, 1.f);
    Op(cuda::LaunchRmsNorm, static_cast<const float*>(x), static_cast<const float*>(L.post_norm.get()), M, H,
       c_.rms_norm_eps, static_cast<void*>(op_.get()), bf16_);
    if (gu_bf16 && bf16_) {
      Op(GemmOp, static_cast<const void*>(op_.get()), L.wgu.get(), static_cast<void*>(gu_.get()), M, 2 * I, H,
         GemmType::BF16, GemmType::BF16, 1.f, 0.f);
      Op(cuda::LaunchSwiGluBf16, static_cast<const void*>(gu_.get()), M, I, static_cast<void*>(op_.get()), true);
    } else {
      Op(GemmOp, static_cast<const void*>(op_.get()), L.wgu.get(), static_cast<void*>(gu_.get()), M, 2 * I, H,
         OperandType(), GemmType::F32, 1.f, 0.f);
      Op(cuda::LaunchSwiGlu, static_cast<const float*>(gu_.get()), M, I, static_cast<void*>(op_.get()), bf16_);
    }
    Op(GemmOp, static_cast<const void*>(op_.get()), L.wdown.get(), static_cast<void*>(x), M, H, I,
       OperandType(), GemmType::F32, 1.f, 1.f);
  }

  // logits_ [n][V] for rows [r0, r0 + n) of x_.
  void Head(int r0, int n) {
    const int H = c_.hidden_size, V = c_.vocab_size;
    const float* xr = x_.get() + (size_t)r0 * H;
    Op(cuda::LaunchRmsNorm, xr, static_cast<const float*>(final_norm_.get()), n, H, c_.rms_norm_eps,
       static_cast<void*>(op_.get()), bf16_);
    const void* head = lm_head_.get() ? lm_head_.get() : embed_.get();
    Op(GemmOp, static_cast<const void*>(op_.get()), head, static_cast<void*>(logits_.get()), n, V, H, OperandType(),
       GemmType::F32, 1.f, 0.f);
  }
  void CopyLogits(int n) {
    Op(cuda::MemcpyOp, static_cast<void*>(logits_pin_.get()), static_cast<const void*>(logits_.get()),
       (size_t)n * c_.vocab_size * sizeof(float), cudaMemcpyDeviceToHost);
  }

  ModelConfig c_;
  Engine* engine_;
  DeviceEngine* device_engine_ = nullptr;  // engine_'s device steps
  cuda::StepGraph* graph_ = nullptr;
  // One prefill chunk loop or decode step at a time: they share the activation buffers, the
  // stream and the engine's step op list (the binding runs them on worker threads).
  std::mutex run_mu_;
  bool bf16_;
  int wave_tokens_ = 1;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  std::vector<Layer> layers_;
  DevMatrix embed_, lm_head_;
  DeviceArray<float> final_norm_, inv_freq_, staging_;
  int rows_ = 0, logit_rows_ = 0;
  DeviceArray<float> x_, qkv_, q_, k_, v_, attn_, gu_, logits_;
  DeviceArray<uint8_t> op_;  // GEMM operand rows: [M][max(H, I, Q)] of the operand type
  DeviceArray<uint8_t> q16_; // bf16 runners: a prefill pass's rotated queries [M][Q] in bf16
  DeviceArray<int> ids_;     // tokens [M] | positions [M]
  PinnedBuffer ids_pin_, logits_pin_;
  PrefillProfile profile_;  // FREEKV_PREFILL_PROFILE only
};

template <class Read>
void CudaRunner::Step(const std::vector<int>& sessions, const std::vector<int>& tokens,
                      const std::vector<int>& positions, Read read) {
  CheckDecode(c_, sessions, tokens, positions, [this](int s) { return engine_->ContextTokens(s); });
  for (int s : sessions) CheckGeometry(c_, s, engine_->SessionGeometry(s));
  std::lock_guard<std::mutex> lock(run_mu_);
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  const int B = (int)sessions.size();
  Size(B);
  SizeLogits(B);
  device_engine_->BeginDeviceStep(sessions);
  try {
    const uint64_t plans = cuda::GemmPlanEpoch();  // the GEMM algorithms a graph of this step holds
    graph_->Key(&plans, sizeof plans);
    Embed(tokens.data(), positions.data(), B);
    for (int l = 0; l < c_.layers; ++l) {
      PreAttention(layers_[l], B);
      device_engine_->DecodeDevice(l, q_.get(), k_.get(), v_.get(), attn_.get());
      PostAttention(layers_[l], B);
    }
    Head(0, B);
    read(B);
  } catch (...) {
    device_engine_->EndDeviceStep();
    throw;
  }
  device_engine_->EndDeviceStep();  // the step's one wait: what `read` queued is on the host after it
}

Logits CudaRunner::Decode(const std::vector<int>& sessions, const std::vector<int>& tokens,
                          const std::vector<int>& positions) {
  Step(sessions, tokens, positions, [this](int B) { CopyLogits(B); });
  const double t0 = cuda::StepGraph::NowMs();
  const float* hl = reinterpret_cast<const float*>(logits_pin_.get());
  Logits out((size_t)sessions.size() * c_.vocab_size);  // not zeroed: the copy writes all of it
  ParallelCopy(out.data(), hl, out.size());
  graph_->AddResultCopy(cuda::StepGraph::NowMs() - t0);
  return out;
}

std::vector<int> CudaRunner::DecodeArgmax(const std::vector<int>& sessions, const std::vector<int>& tokens,
                                          const std::vector<int>& positions) {
  Step(sessions, tokens, positions, [this](int B) {
    // The picks reuse the ids buffer (its tokens were consumed by the embedding at the start).
    Op(cuda::LaunchArgmaxRows, static_cast<const float*>(logits_.get()), B, c_.vocab_size, ids_.get());
    Op(cuda::MemcpyOp, static_cast<void*>(ids_pin_.get()), static_cast<const void*>(ids_.get()), (size_t)B * sizeof(int),
       cudaMemcpyDeviceToHost);
  });
  const int* h = reinterpret_cast<const int*>(ids_pin_.get());
  return std::vector<int>(h, h + sessions.size());
}

std::vector<float> CudaRunner::Prefill(int session, const std::vector<int>& tokens, int start, bool all_logits,
                                       int chunk) {
  CheckPrefill(c_, tokens, start, engine_->ContextTokens(session));
  CheckGeometry(c_, session, engine_->SessionGeometry(session));
  std::lock_guard<std::mutex> lock(run_mu_);
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  const int V = c_.vocab_size, total = (int)tokens.size();
  // Rows per pass: 2048. Passes of 8192 rows were slower on the H200 (8B shapes, 128K prompt:
  // 11.66 s against 11.42 s; the GEMMs gained 0.14 s, the engine's part lost 0.45 s, with 2.2 s of
  // host time inside it: bench/results/gpu-visit-20261204-1912/), so a service's larger calls
  // (FREEKV_PREFILL_CHUNK_TOKENS) run as several passes.
  if (chunk <= 0) chunk = 2048;
  std::vector<float> logits((size_t)(all_logits ? total : 1) * V);
  using Clock = std::chrono::steady_clock;
  const auto ms_since = [](Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); };
  PrefillProfile* prof = PrefillProfile::On() ? &profile_ : nullptr;
  const auto mark = [&](int part) {
    if (prof) prof->Mark(stream_, part);
  };
  double issue_ms = 0, register_ms = 0, wait_ms = 0;
  // Read at every call, so that a benchmark can time both in one process.
  const bool gu_bf16 = bf16_ && PrefillGateUpBf16();  // bf16 runners have I % 8 == 0 (constructor)
  // The queries go to the engine in bf16 straight from RoPE where its tensor-core kernel takes them.
  const bool q_direct = bf16_ && device_engine_->PrefillTakesBf16Queries(c_.head_dim);
  Size(std::min(chunk, total));
  SizeLogits(all_logits ? std::min(chunk, total) : 1);
  try {
    for (int c0 = 0; c0 < total; c0 += chunk) {
      const auto t_issue = Clock::now();
      const int n = std::min(chunk, total - c0);
      std::vector<int> pos(n);
      for (int i = 0; i < n; ++i) pos[i] = start + c0 + i;
      mark(-1);
      Embed(tokens.data() + c0, pos.data(), n);
      mark(PrefillProfile::kEmbed);
      const bool last = c0 + n == total;
      for (int l = 0; l < c_.layers; ++l) {
        PreAttention(layers_[l], n, q_direct ? q16_.get() : nullptr);
        mark(PrefillProfile::kPre);
        // The last layer's output feeds only the logits, so where only the last row's are read, that
        // layer attends and runs o_proj and the MLP for that one row of the call's last pass, and
        // for no row of its other passes: its k and v still go to the cache. At 8B shapes that is
        // 1/32 of a long prompt's attention and MLP (PERF.md "The last layer of a prompt").
        const bool tail = !all_logits && l == c_.layers - 1;
        const int attend = tail ? (last ? 1 : 0) : -1;
        // The engine keeps the context on the device and offloads filled pages on its copy stream;
        // bf16 weights: the attention on tensor cores too; fp32 models keep exact fp32 attention.
        // bf16 weights: the output straight into op_ in bf16 where the tensor-core kernel runs (op_
        // is free between the q/k/v GEMM and o_proj), skipping an fp32 pass and its conversion.
        const bool in_op = device_engine_->PrefillDevice(session, l, q_.get(), k_.get(), v_.get(), n, attn_.get(),
                                                         bf16_, bf16_ ? static_cast<void*>(op_.get()) : nullptr,
                                                         q_direct ? q16_.get() : nullptr, attend);
        mark(PrefillProfile::kAttn);
        if (!tail)
          PostAttention(layers_[l], n, in_op, gu_bf16);
        else if (last)
          PostAttention(layers_[l], 1, in_op, gu_bf16, n - 1);
        mark(PrefillProfile::kPost);
      }
      const int r0 = all_logits ? 0 : n - 1, rows = all_logits ? n : 1;
      if (all_logits || last) {
        Head(r0, rows);
        CopyLogits(rows);
        mark(PrefillProfile::kHead);
      }
      // While the device runs the chunk: register the host store ahead (a prompt comes in calls of
      // one chunk each). The engine registers on a thread of its own (FREEKV_REGISTER_AHEAD), so
      // this reaches two chunks on: the next chunk's pages were registered by the job the previous
      // call started, and neither the issue of the next chunk nor its offload waits for this one.
      const auto t_register = Clock::now();
      device_engine_->RegisterAhead(session, (int64_t)start + c0 + 3 * (int64_t)n);
      register_ms += ms_since(t_register);
      issue_ms += ms_since(t_issue);
      const auto t_wait = Clock::now();
      FKV_CUDA_CHECK(cudaStreamSynchronize(stream_));  // ids_pin_ is reused by the next chunk
      wait_ms += ms_since(t_wait);
      if (all_logits || last)
        std::memcpy(logits.data() + (all_logits ? (size_t)c0 * V : 0), logits_pin_.get(), (size_t)rows * V * sizeof(float));
      if (prof) prof->Collect();
    }
  } catch (...) {
    if (prof) prof->Discard();
    device_engine_->FinishDevicePrefill(session);  // what was prefilled is committed consistently
    throw;
  }
  // The filled pages are in the host store and the manifests say so once this returns.
  const auto t_finish = Clock::now();
  device_engine_->FinishDevicePrefill(session);
  if (prof) prof->Report(session, start, total, chunk, issue_ms, register_ms, wait_ms, ms_since(t_finish));
  return logits;
}

}  // namespace

std::unique_ptr<Runner> MakeCudaRunner(ModelConfig config, Weights weights, Engine* engine, bool bf16_weights) {
  return std::make_unique<CudaRunner>(std::move(config), std::move(weights), engine, bf16_weights);
}

}  // namespace freekv::model
