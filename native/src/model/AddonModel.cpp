// JS class `Model` (native/binding.ts): the model runner over mapped safetensors weights.
// Attention goes through the FreeKV engine passed as `options.engine`; without one the model keeps
// its own dense KV cache per session (DenseAttention), which the tests use as the reference.
// prefill/decode copy their inputs into C++ vectors and run as AsyncWorkers (promises).
#include <napi.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <unordered_set>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "AddonClasses.h"
#include "AddonModules.h"
#include "engine/AddonEngine.h"
#include "model/Attention.h"
#include "model/cpu/Forward.h"

namespace freekv::addon {

namespace {

using model::AttentionBackend;
using model::DenseAttention;
using model::EngineAttention;
using model::Forward;
using model::ModelConfig;
using model::TensorRef;
using model::WeightDType;

int IntField(const Napi::Object& o, const char* key, const char* path) {
  auto v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string(path) + "." + key + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (d != static_cast<double>(static_cast<int64_t>(d)) || d < 0 || d > 2147483647.0)
    throw Napi::RangeError::New(o.Env(), std::string(path) + "." + key + " must be a non-negative integer");
  return static_cast<int>(d);
}

double NumberField(const Napi::Object& o, const char* key, const char* path) {
  auto v = o.Get(key);
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), std::string(path) + "." + key + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

std::vector<int> Int32Arg(const Napi::Value& v, const char* name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw Napi::TypeError::New(v.Env(), std::string(name) + " must be an Int32Array");
  auto a = v.As<Napi::Int32Array>();
  return std::vector<int>(a.Data(), a.Data() + a.ElementLength());
}

ModelConfig ParseConfig(const Napi::Object& o) {
  ModelConfig c;
  auto arch = o.Get("architecture");
  if (!arch.IsString()) throw Napi::TypeError::New(o.Env(), "config.architecture must be a string");
  c.architecture = arch.As<Napi::String>();
  if (c.architecture != "llama" && c.architecture != "mistral" && c.architecture != "qwen2")
    throw Napi::TypeError::New(o.Env(), "config.architecture '" + c.architecture + "' is not one of llama, mistral, qwen2");
  c.vocab_size = IntField(o, "vocabSize", "config");
  c.hidden_size = IntField(o, "hiddenSize", "config");
  c.intermediate_size = IntField(o, "intermediateSize", "config");
  c.layers = IntField(o, "layers", "config");
  c.q_heads = IntField(o, "qHeads", "config");
  c.kv_heads = IntField(o, "kvHeads", "config");
  c.head_dim = IntField(o, "headDim", "config");
  c.rms_norm_eps = static_cast<float>(NumberField(o, "rmsNormEps", "config"));
  c.tie_word_embeddings = o.Get("tieWordEmbeddings").ToBoolean();
  c.attention_bias = o.Get("attentionBias").ToBoolean();
  auto f = o.Get("ropeInvFreq");
  if (f.IsTypedArray() && f.As<Napi::TypedArray>().TypedArrayType() == napi_float32_array) {
    auto a = f.As<Napi::Float32Array>();
    c.rope_inv_freq.assign(a.Data(), a.Data() + a.ElementLength());
  } else if (f.IsArray()) {
    auto a = f.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) {
      auto e = a.Get(i);
      if (!e.IsNumber()) throw Napi::TypeError::New(o.Env(), "config.ropeInvFreq must hold numbers");
      c.rope_inv_freq.push_back(e.As<Napi::Number>().FloatValue());
    }
  } else {
    throw Napi::TypeError::New(o.Env(), "config.ropeInvFreq must be a Float32Array or number[] (headDim / 2 values)");
  }
  try {
    model::ValidateConfig(c);
  } catch (const std::exception& e) {
    throw Napi::RangeError::New(o.Env(), e.what());
  }
  return c;
}

std::vector<TensorRef> ParseTensors(const Napi::Value& v) {
  if (!v.IsArray()) throw Napi::TypeError::New(v.Env(), "tensors must be an array of TensorRef");
  auto a = v.As<Napi::Array>();
  std::vector<TensorRef> out;
  for (uint32_t i = 0; i < a.Length(); i++) {
    const std::string path = "tensors[" + std::to_string(i) + "]";
    auto e = a.Get(i);
    if (!e.IsObject()) throw Napi::TypeError::New(v.Env(), path + " must be an object");
    auto o = e.As<Napi::Object>();
    TensorRef r;
    if (!o.Get("name").IsString() || !o.Get("file").IsString() || !o.Get("dtype").IsString())
      throw Napi::TypeError::New(v.Env(), path + " needs string name, file and dtype");
    r.name = o.Get("name").As<Napi::String>();
    r.file = o.Get("file").As<Napi::String>();
    std::string dt = o.Get("dtype").As<Napi::String>();
    if (dt == "F32") r.dtype = WeightDType::F32;
    else if (dt == "F16") r.dtype = WeightDType::F16;
    else if (dt == "BF16") r.dtype = WeightDType::BF16;
    else throw Napi::TypeError::New(v.Env(), path + ".dtype '" + dt + "' is not F32, F16 or BF16");
    double off = NumberField(o, "offset", path.c_str()), len = NumberField(o, "byteLength", path.c_str());
    if (!(off >= 0) || !(len >= 0)) throw Napi::RangeError::New(v.Env(), path + ": offset and byteLength must be >= 0");
    r.offset = static_cast<uint64_t>(off);
    r.byte_length = static_cast<uint64_t>(len);
    auto shape = o.Get("shape");
    if (!shape.IsArray()) throw Napi::TypeError::New(v.Env(), path + ".shape must be an array");
    auto s = shape.As<Napi::Array>();
    for (uint32_t j = 0; j < s.Length(); j++) {
      auto d = s.Get(j);
      if (!d.IsNumber()) throw Napi::TypeError::New(v.Env(), path + ".shape must hold numbers");
      r.shape.push_back(d.As<Napi::Number>().Int64Value());
    }
    out.push_back(std::move(r));
  }
  return out;
}

template <class A>
Napi::Float32Array ToFloat32Array(Napi::Env env, const std::vector<float, A>& v) {
  auto arr = Napi::Float32Array::New(env, v.size());
  if (!v.empty()) std::memcpy(arr.Data(), v.data(), v.size() * sizeof(float));
  return arr;
}
// Logits without a copy on the event loop (8 MB a step at batch 16 and a 128K vocabulary): the
// JS array adopts the vector's memory, freed by its finalizer, and V8 is told about the bytes so
// it collects them in time. Small results are copied (cheaper than an external buffer).
template <class A>
Napi::Value ToJs(Napi::Env env, std::vector<float, A>&& v) {
  if (v.size() < (size_t(1) << 12)) return ToFloat32Array(env, v);
  auto* owned = new std::vector<float, A>(std::move(v));
  const size_t bytes = owned->size() * sizeof(float);
  auto buf = Napi::ArrayBuffer::New(
      env, owned->data(), bytes,
      [](Napi::Env e, void*, std::vector<float, A>* p) {
        Napi::MemoryManagement::AdjustExternalMemory(e, -static_cast<int64_t>(p->size() * sizeof(float)));
        delete p;
      },
      owned);
  Napi::MemoryManagement::AdjustExternalMemory(env, static_cast<int64_t>(bytes));
  return Napi::Float32Array::New(env, owned->size(), buf, 0);
}
Napi::Value ToJs(Napi::Env env, const std::vector<int>& v) {
  auto arr = Napi::Int32Array::New(env, v.size());
  if (!v.empty()) std::memcpy(arr.Data(), v.data(), v.size() * sizeof(int));
  return arr;
}

// Runs fn() off the event loop and resolves with its result (logits, or picked token ids).
// R: the result (logits, model::Logits, or picked ids).
template <class R>
class ForwardWorker : public Napi::AsyncWorker {
 public:
  ForwardWorker(Napi::Env env, int threads, std::function<R()> fn, Napi::ObjectReference keep, std::function<void()> done)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), threads_(threads), fn_(std::move(fn)),
        keep_(std::move(keep)), done_(std::move(done)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      if (threads_ > 0) omp_set_num_threads(threads_);
      out_ = fn_();
    } catch (const Refused& e) {
      refused_ = true;
      SetError(e.what());
    } catch (const std::exception& e) {
      SetError(e.what());
    } catch (...) {
      SetError("unknown native error in the model runner");
    }
  }
  void OnOK() override {
    done_();
    deferred_.Resolve(ToJs(Env(), std::move(out_)));
  }
  void OnError(const Napi::Error& e) override {
    done_();
    Napi::Object err = e.Value();
    // An input check failed before anything was appended: the caller may run the call again.
    if (refused_) err.Set("refused", Napi::Boolean::New(Env(), true));
    deferred_.Reject(err);
  }

 private:
  Napi::Promise::Deferred deferred_;
  bool refused_ = false;
  int threads_;
  std::function<R()> fn_;
  Napi::ObjectReference keep_;  // the Model stays alive while its work runs
  std::function<void()> done_;   // on the JS thread, before the promise settles
  R out_;
};

// What Model.load() prepares off the event loop: the parsed config and the converted weights
// (and, with a CUDA engine, the GPU runner with its weights already uploaded).
struct PreparedModel {
  ModelConfig config;
  std::vector<TensorRef> tensors;
  model::Weights weights;
  int threads = 0;
  // "auto": bf16 on the device unless every tensor is F32; "bf16"; "f32". GPU runner only.
  std::string device_weights = "auto";
  std::unique_ptr<model::Runner> runner;

  bool DeviceBf16() const {
    if (device_weights != "auto") return device_weights == "bf16";
    for (const auto& t : tensors)
      if (t.dtype != WeightDType::F32) return true;
    return false;
  }
};

// The runner for an engine: the GPU runner when the engine is the CUDA backend, else the CPU
// forward pass with attention through `attention`.
std::unique_ptr<model::Runner> MakeRunner(PreparedModel& p, Engine* engine, AttentionBackend* attention) {
#ifdef FREEKV_WITH_CUDA
  if (engine && engine->device())
    return model::MakeCudaRunner(std::move(p.config), std::move(p.weights), engine, p.DeviceBf16());
#endif
  return std::make_unique<Forward>(std::move(p.config), std::move(p.weights), attention);
}

class AddonModel : public Napi::ObjectWrap<AddonModel> {
 public:
  static Napi::FunctionReference& Ctor(Napi::Env env) { return Classes(env).model; }
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Model",
                       {StaticMethod("load", &AddonModel::Load),
                        InstanceMethod("prefill", &AddonModel::Prefill), InstanceMethod("decode", &AddonModel::Decode),
                        InstanceMethod("decodeArgmax", &AddonModel::DecodeArgmax),
                        InstanceMethod("releaseSession", &AddonModel::ReleaseSession),
                        InstanceAccessor("vocabSize", &AddonModel::VocabSize, nullptr),
                        InstanceAccessor("attention", &AddonModel::AttentionKind, nullptr),
                        InstanceAccessor("device", &AddonModel::Device, nullptr),
                        InstanceAccessor("prefillWaveTokens", &AddonModel::PrefillWaveTokens, nullptr)});
  }

  // new Model(options) maps and converts synchronously; Model.load(options) does that work off the
  // event loop and then calls this constructor with (External<PreparedModel>, engine).
  explicit AddonModel(const Napi::CallbackInfo& info) : Napi::ObjectWrap<AddonModel>(info) {
    Napi::Env env = info.Env();
    if (info.Length() >= 1 && info[0].IsExternal()) {
      std::unique_ptr<PreparedModel> p(info[0].As<Napi::External<PreparedModel>>().Data());
      threads_ = p->threads;
      Setup(env, *p, info.Length() > 1 ? info[1] : env.Undefined());
      return;
    }
    auto p = Parse(info);
    try {
      p->weights = model::LoadWeights(p->config, p->tensors);
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    threads_ = p->threads;
    Setup(env, *p, info[0].As<Napi::Object>().Get("engine"));
  }

  // Validates the options (throws JS errors naming the field); weights are not read yet.
  static std::unique_ptr<PreparedModel> Parse(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "options must be an object");
    auto opts = info[0].As<Napi::Object>();
    if (!opts.Get("config").IsObject()) throw Napi::TypeError::New(env, "options.config must be an object");
    auto p = std::make_unique<PreparedModel>();
    p->config = ParseConfig(opts.Get("config").As<Napi::Object>());
    p->tensors = ParseTensors(opts.Get("tensors"));
    auto th = opts.Get("threads");
    if (!th.IsUndefined()) {
      const double t = th.IsNumber() ? th.As<Napi::Number>().DoubleValue() : -1;
      // The engine's bound (0: the machine's cores).
      if (!(t >= 0 && t <= 1024) || std::floor(t) != t)
        throw Napi::RangeError::New(env, "options.threads must be an integer in [0, 1024]");
      p->threads = static_cast<int>(t);
    }
    auto dw = opts.Get("deviceWeights");
    if (!dw.IsUndefined()) {
      if (!dw.IsString()) throw Napi::TypeError::New(env, "options.deviceWeights must be 'auto', 'bf16' or 'f32'");
      p->device_weights = dw.As<Napi::String>();
      if (p->device_weights != "auto" && p->device_weights != "bf16" && p->device_weights != "f32")
        throw Napi::TypeError::New(env, "options.deviceWeights must be 'auto', 'bf16' or 'f32'");
    }
    auto eng = opts.Get("engine");
    if (!eng.IsUndefined() && !eng.IsNull()) UnwrapEngine(eng);  // a TypeError now, not after loading
    return p;
  }

  static Napi::Value Load(const Napi::CallbackInfo& info);

 private:
  void Setup(Napi::Env env, PreparedModel& p, Napi::Value eng) {
    if (eng.IsUndefined() || eng.IsNull()) {
      const ModelConfig& config = p.config;
      dense_ = std::make_unique<DenseAttention>(config.layers, config.q_heads, config.kv_heads, config.head_dim);
      backend_ = dense_.get();
    } else {
      engine_owner_ = UnwrapEngine(eng);
      if (!engine_owner_) throw Napi::Error::New(env, "options.engine: the engine is closed");
      engine_ = std::make_unique<EngineAttention>(engine_owner_.get());
      backend_ = engine_.get();
      engine_ref_ = Napi::Persistent(eng.As<Napi::Object>());
    }
    if (p.runner) {
      forward_ = std::move(p.runner);  // built by Model.load() off the event loop
    } else {
      try {
        forward_ = MakeRunner(p, engine_owner_.get(), backend_);
      } catch (const std::exception& e) {
        throw Napi::Error::New(env, e.what());
      }
    }
  }

  Napi::Value Prefill(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 4) throw Napi::TypeError::New(env, "prefill(session, tokens, startPosition, allLogits)");
    if (!info[0].IsNumber()) throw Napi::TypeError::New(env, "session must be a number");
    if (!info[2].IsNumber()) throw Napi::TypeError::New(env, "startPosition must be a number");
    int session = info[0].As<Napi::Number>().Int32Value();
    auto tokens = Int32Arg(info[1], "tokens");
    if (tokens.empty()) throw Napi::RangeError::New(env, "tokens must not be empty");
    int start = info[2].As<Napi::Number>().Int32Value();
    bool all = info[3].ToBoolean();
    CheckLogitsBytes(env, all ? tokens.size() : 1, "prefill with allLogits: call it on fewer tokens at a time");
    model::Runner* f = forward_.get();
    auto done = Claim(env, {session});
    auto* w = new ForwardWorker<std::vector<float>>(env, threads_, [f, session, tokens = std::move(tokens), start, all]() {
      return f->Prefill(session, tokens, start, all);
    }, Napi::Persistent(Value()), std::move(done));
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  Napi::Value Decode(const Napi::CallbackInfo& info) { return DecodeWith<float>(info, "decode"); }
  Napi::Value DecodeArgmax(const Napi::CallbackInfo& info) { return DecodeWith<int>(info, "decodeArgmax"); }

  // decode(): logits [batch][vocab]; decodeArgmax(): each row's argmax [batch] (greedy steps).
  template <class T>
  Napi::Value DecodeWith(const Napi::CallbackInfo& info, const char* name) {
    Napi::Env env = info.Env();
    if (info.Length() < 3) throw Napi::TypeError::New(env, std::string(name) + "(sessions, tokens, positions)");
    auto sessions = Int32Arg(info[0], "sessions");
    auto tokens = Int32Arg(info[1], "tokens");
    auto positions = Int32Arg(info[2], "positions");
    if (sessions.empty()) throw Napi::RangeError::New(env, "sessions must not be empty");
    if (tokens.size() != sessions.size() || positions.size() != sessions.size())
      throw Napi::RangeError::New(env, "sessions, tokens and positions must have the same length");
    if constexpr (std::is_same_v<T, float>) CheckLogitsBytes(env, sessions.size(), "decode: use a smaller batch");
    model::Runner* f = forward_.get();
    auto done = Claim(env, sessions);
    using R = std::conditional_t<std::is_same_v<T, float>, model::Logits, std::vector<int>>;
    std::function<R()> fn;
    if constexpr (std::is_same_v<T, float>)
      fn = [f, s = std::move(sessions), t = std::move(tokens), p = std::move(positions)]() { return f->Decode(s, t, p); };
    else
      fn = [f, s = std::move(sessions), t = std::move(tokens), p = std::move(positions)]() {
        return f->DecodeArgmax(s, t, p);
      };
    auto* w = new ForwardWorker<R>(env, threads_, std::move(fn), Napi::Persistent(Value()), std::move(done));
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  // Logits come back in one Float32Array, which holds at most 4 GiB (Node's limit for one
  // external buffer; past it Node fails after the work is done): refused before any work.
  void CheckLogitsBytes(Napi::Env env, size_t rows, const char* hint) const {
    const double bytes = static_cast<double>(rows) * forward_->config().vocab_size * sizeof(float);
    if (bytes > static_cast<double>(kMaxExternalBufferBytes))
      throw Napi::RangeError::New(env, std::to_string(rows) + " rows of " + std::to_string(forward_->config().vocab_size) +
                                           " logits take " + std::to_string(static_cast<uint64_t>(bytes)) +
                                           " bytes, more than one array's 4 GiB: " + hint);
  }

  // Calls on one session run one at a time (a call's layers append to the session's cache in
  // order; two calls interleaved would append each other's tokens between them): a call naming a
  // session whose earlier call has not settled is refused at once. The scheduler never makes one.
  // Returns what the worker runs, on the JS thread, as the call settles. The JS thread's only.
  std::function<void()> Claim(Napi::Env env, const std::vector<int>& sessions) {
    for (int s : sessions)
      if (busy_.count(s))
        throw Napi::Error::New(env, "session " + std::to_string(s) + " has a model call in flight: the calls on one session run one at a time");
    for (int s : sessions) busy_.insert(s);
    return [this, sessions] {
      for (int s : sessions) busy_.erase(s);
    };
  }

  // Dense fallback only: forgets a session's KV cache. With an engine, close the engine session.
  Napi::Value ReleaseSession(const Napi::CallbackInfo& info) {
    if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(info.Env(), "session must be a number");
    const int session = info[0].As<Napi::Number>().Int32Value();
    if (busy_.count(session))
      throw Napi::Error::New(info.Env(), "session " + std::to_string(session) + " has a model call in flight: release it once the call settled");
    bool r = dense_ ? dense_->Release(session) : false;
    return Napi::Boolean::New(info.Env(), r);
  }

  Napi::Value VocabSize(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), forward_->config().vocab_size);
  }
  Napi::Value AttentionKind(const Napi::CallbackInfo& info) {
    return Napi::String::New(info.Env(), dense_ ? "dense" : "engine");
  }
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), forward_->device()); }
  Napi::Value PrefillWaveTokens(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), forward_->prefill_wave_tokens());
  }

  int threads_ = 0;
  std::unique_ptr<DenseAttention> dense_;
  std::shared_ptr<Engine> engine_owner_;  // keeps the engine alive as long as the model
  std::unique_ptr<EngineAttention> engine_;
  AttentionBackend* backend_ = nullptr;
  Napi::ObjectReference engine_ref_;
  std::unique_ptr<model::Runner> forward_;
  std::unordered_set<int> busy_;  // sessions with a call in flight (Claim)
};

// Model.load(): maps and converts the weights on a worker thread, then constructs the Model.
class LoadWorker : public Napi::AsyncWorker {
 public:
  LoadWorker(Napi::Env env, std::unique_ptr<PreparedModel> p, Napi::Value engine)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), p_(std::move(p)) {
    if (engine.IsObject()) {
      engine_ = Napi::Persistent(engine.As<Napi::Object>());
      engine_ptr_ = UnwrapEngine(engine);
    }
  }
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      if (p_->threads > 0) omp_set_num_threads(p_->threads);
      p_->weights = model::LoadWeights(p_->config, p_->tensors);
      // A CUDA engine: the GPU runner uploads its weights here too, off the event loop.
      if (engine_ptr_ && engine_ptr_->device()) p_->runner = MakeRunner(*p_, engine_ptr_.get(), nullptr);
      p_->tensors.clear();
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    try {
      auto ext = Napi::External<PreparedModel>::New(env, p_.release());
      deferred_.Resolve(AddonModel::Ctor(env).New({ext, engine_.IsEmpty() ? env.Undefined() : engine_.Value()}));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::unique_ptr<PreparedModel> p_;
  Napi::ObjectReference engine_;
  std::shared_ptr<Engine> engine_ptr_;
};

Napi::Value AddonModel::Load(const Napi::CallbackInfo& info) {
  auto p = Parse(info);
  auto* w = new LoadWorker(info.Env(), std::move(p), info[0].As<Napi::Object>().Get("engine"));
  auto promise = w->Promise();
  w->Queue();
  return promise;
}

}  // namespace

void InitModel(Napi::Env env, Napi::Object exports) {
  auto fn = AddonModel::Define(env);
  AddonModel::Ctor(env) = Napi::Persistent(fn);
  exports.Set("Model", fn);
}

}  // namespace freekv::addon
