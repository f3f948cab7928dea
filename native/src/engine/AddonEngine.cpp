// JS class `Engine`: the FreeKV engine (CPU backend, or CUDA when built and present) behind the
// typed interface of native/binding.ts. Arguments are validated and copied into plain C++ data
// on the JS thread; the work runs in AsyncWorkers that resolve promises. A session keeps JS
// references to its four shared-memory segments while it lives.
#include "engine/AddonEngine.h"
#include "AddonClasses.h"

#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/AddonContract.h"
#include "engine/DeviceEngine.h"
#include "engine/Manifest.h"
#include "shm/ShmSegment.h"

namespace freekv::addon {

ShmSegment* UnwrapShm(Napi::Value v);
void PinShm(Napi::Value v, int delta);

namespace {

using std::to_string;

// A Float32Array of exactly `expect` elements, copied.
std::vector<float> FloatsArg(const Napi::Env& env, Napi::Value v, const std::string& name, size_t expect) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(env, name + " must be a Float32Array");
  auto a = v.As<Napi::Float32Array>();
  if (a.ElementLength() != expect)
    throw Napi::RangeError::New(env, name + " has " + to_string(a.ElementLength()) + " elements, expected " + to_string(expect));
  return std::vector<float>(a.Data(), a.Data() + expect);
}

Napi::Float32Array ToFloat32Array(const Napi::Env& env, const std::vector<float>& v) {
  auto a = Napi::Float32Array::New(env, v.size());
  if (!v.empty()) std::memcpy(a.Data(), v.data(), v.size() * sizeof(float));
  return a;
}

// ---- AsyncWorkers ----

// Keeps the JS Engine (and through it the sessions' segments) alive until the promise settles.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, Napi::Object self, std::shared_ptr<Engine> engine)
      : Napi::AsyncWorker(env),
        engine_(std::move(engine)),
        self_(Napi::Persistent(self)),
        deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      Run();
    } catch (const std::exception& e) {
      SetError(e.what());
    } catch (...) {
      SetError("engine: unknown native error");
    }
  }
  void OnOK() override { deferred_.Resolve(Result(Env())); }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 protected:
  virtual void Run() = 0;
  virtual Napi::Value Result(Napi::Env env) { return env.Undefined(); }
  std::shared_ptr<Engine> engine_;

 private:
  Napi::ObjectReference self_;
  Napi::Promise::Deferred deferred_;
};

class PrefillWorker : public PromiseWorker {
 public:
  PrefillWorker(Napi::Env env, Napi::Object self, std::shared_ptr<Engine> e, int s, int l, std::vector<float> q, std::vector<float> k,
                std::vector<float> v, int n, size_t out_floats, bool attend)
      : PromiseWorker(env, self, std::move(e)), s_(s), l_(l), n_(n), attend_(attend), q_(std::move(q)), k_(std::move(k)),
        v_(std::move(v)), out_(attend ? out_floats : 0) {}

 protected:
  void Run() override {
    if (attend_)
      engine_->PrefillAttend(s_, l_, q_.data(), k_.data(), v_.data(), n_, out_.data());
    else
      engine_->Prefill(s_, l_, k_.data(), v_.data(), n_);
  }
  Napi::Value Result(Napi::Env env) override { return attend_ ? ToFloat32Array(env, out_) : env.Undefined(); }

 private:
  int s_, l_, n_;
  bool attend_;
  std::vector<float> q_, k_, v_, out_;
};

struct DecodeCopy {
  int session;
  std::vector<float> q, k, v, out;
};

class DecodeWorker : public PromiseWorker {
 public:
  DecodeWorker(Napi::Env env, Napi::Object self, std::shared_ptr<Engine> e, int layer, std::vector<DecodeCopy> items)
      : PromiseWorker(env, self, std::move(e)), layer_(layer), items_(std::move(items)) {}

 protected:
  void Run() override {
    std::vector<DecodeItem> items;
    for (auto& it : items_) items.push_back({it.session, it.q.data(), it.k.data(), it.v.data(), it.out.data()});
    engine_->Decode(layer_, items);
  }
  Napi::Value Result(Napi::Env env) override {
    auto a = Napi::Array::New(env, items_.size());
    for (uint32_t i = 0; i < items_.size(); ++i) a.Set(i, ToFloat32Array(env, items_[i].out));
    return a;
  }

 private:
  int layer_;
  std::vector<DecodeCopy> items_;
};

class SyncWorker : public PromiseWorker {
 public:
  SyncWorker(Napi::Env env, Napi::Object self, std::shared_ptr<Engine> e, int s)
      : PromiseWorker(env, self, std::move(e)), s_(s) {}

 protected:
  void Run() override { engine_->Sync(s_); }

 private:
  int s_;
};

// closeSessionAsync's work: the engine's CloseSession (the CUDA engine's wait for queued work and
// the unregistration of the session's host store) off the JS thread; `done` (JS thread) then lets
// the segments go.
class CloseWorker : public PromiseWorker {
 public:
  CloseWorker(Napi::Env env, Napi::Object self, std::shared_ptr<Engine> e, int s, std::function<void()> done, std::function<void()> failed)
      : PromiseWorker(env, self, std::move(e)), s_(s), done_(std::move(done)), failed_(std::move(failed)) {}
  void OnOK() override {
    done_();
    PromiseWorker::OnOK();
  }
  void OnError(const Napi::Error& e) override {
    failed_();
    PromiseWorker::OnError(e);
  }

 protected:
  void Run() override { engine_->CloseSession(s_); }

 private:
  int s_;
  std::function<void()> done_, failed_;
};

}  // namespace

class AddonEngine : public Napi::ObjectWrap<AddonEngine> {
 public:
  static Napi::FunctionReference& Ctor(Napi::Env env) { return Classes(env).engine; }

  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Engine",
                       {InstanceAccessor("backend", &AddonEngine::Backend, nullptr),
                        InstanceMethod("createSession", &AddonEngine::CreateSession),
                        InstanceMethod("closeSession", &AddonEngine::CloseSession),
                        InstanceMethod("closeSessionAsync", &AddonEngine::CloseSessionAsync),
                        InstanceMethod("reserveStore", &AddonEngine::ReserveStore),
                        InstanceMethod("prefill", &AddonEngine::Prefill),
                        InstanceMethod("prefillAttend", &AddonEngine::PrefillAttend),
                        InstanceMethod("decode", &AddonEngine::Decode), InstanceMethod("sync", &AddonEngine::Sync),
                        InstanceMethod("stats", &AddonEngine::GetStats),
                        InstanceMethod("deviceStepStats", &AddonEngine::GetDeviceStepStats),
                        InstanceMethod("takeBackgroundFailures", &AddonEngine::TakeBackgroundFailures),
                        InstanceMethod("contextTokens", &AddonEngine::ContextTokens),
                        InstanceMethod("setHierarchicalSelection", &AddonEngine::SetHierarchicalSelection),
                        InstanceMethod("filledPages", &AddonEngine::FilledPages),
                        InstanceMethod("lastAttendedTokens", &AddonEngine::LastAttendedTokens)});
  }

  explicit AddonEngine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<AddonEngine>(info) {
    auto env = info.Env();
    auto o = ObjectArg(env, info.Length() > 0 ? info[0] : env.Undefined(), "options");
    auto b = o.Get("backend");
    if (!b.IsString()) throw Napi::TypeError::New(env, "options.backend must be \"cpu\" or \"cuda\"");
    backend_ = b.As<Napi::String>().Utf8Value();
    const int threads = IntField(o, "threads", "options", 0, 1024, true, 0);
    CudaEngineOptions cuda;
    cuda.device = IntField(o, "device", "options", 0, 1024, true, 0);
    cuda.graphs = BoolField(o, "cudaGraphs", "options", true);
    cuda.side_timing = BoolField(o, "sideTiming", "options", false);
    {
      bool present = false;
      const double b = NumberField(o, "prefillContextBytes", "options", &present);
      if (present && (!std::isfinite(b) || std::floor(b) != b || b < 0 || b > 4503599627370496.0))
        throw Napi::RangeError::New(env, "options.prefillContextBytes must be an integer in [0, 2^52]");
      cuda.prefill_context_bytes = present ? (size_t)b : 0;
    }
    const int delay_ms = IntField(o, "debugRecallDelayMs", "options", 0, 60000, true, 0);
    const int attend_delay_ms = IntField(o, "debugAttendDelayMs", "options", 0, 60000, true, 0);
    const int recall_fail_every = IntField(o, "debugRecallFailEvery", "options", 0, 1 << 30, true, 0);
    // Hierarchical page selection (engine/Hierarchy.h): "auto" (default), "on" or "off".
    HierarchicalSelection hier = HierarchicalSelection::Auto;
    {
      auto hv = o.Get("hierarchicalSelection");
      if (!hv.IsUndefined()) {
        const std::string m = hv.IsString() ? hv.As<Napi::String>().Utf8Value() : std::string();
        if (m == "off") hier = HierarchicalSelection::Off;
        else if (m == "on") hier = HierarchicalSelection::On;
        else if (m != "auto")
          throw Napi::TypeError::New(env, "options.hierarchicalSelection must be \"auto\", \"on\" or \"off\"");
      }
    }
    cuda.hierarchical = hier;
    // Settings both engines read from the environment at every decode: checked once here.
    try {
      CheckEngineSwitches();
    } catch (const std::exception& e) {
      throw Napi::RangeError::New(env, e.what());
    }
    if (backend_ == "cpu") {
      engine_ = std::shared_ptr<Engine>(MakeCpuEngine(threads, delay_ms * 1000, attend_delay_ms * 1000, hier, recall_fail_every));
    } else if (backend_ == "cuda") {
#ifdef FREEKV_WITH_CUDA
      try {
        engine_ = std::shared_ptr<Engine>(MakeCudaEngine(cuda));
      } catch (const std::exception& e) {
        throw Napi::Error::New(env, e.what());
      }
#else
      (void)cuda;
      throw Napi::Error::New(env, "no CUDA device: this build of the addon has no CUDA backend");
#endif
    } else {
      throw Napi::TypeError::New(env, "options.backend must be \"cpu\" or \"cuda\", got \"" + backend_ + "\"");
    }
  }

  // The engine (its background recalls drained when this was its last owner) goes before the
  // references that keep the sessions' segments mapped.
  ~AddonEngine() override { engine_.reset(); }

  std::shared_ptr<Engine> engine() const { return engine_; }

 private:
  struct SessionInfo {
    Geometry geo;
    const uint8_t* manifest = nullptr;  // the engine's record of offloaded pages, tokens, queries
    std::vector<Napi::ObjectReference> segments;  // store, staging, tail, manifest
    bool closing = false;                          // closeSessionAsync under way: no more calls
  };

  Napi::Value Backend(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), backend_); }

  const SessionInfo& SessionArg(const Napi::CallbackInfo& info, size_t i, const std::string& name = "session") {
    const int s = IntArg(info, i, name, 0, 1 << 30);
    auto it = sessions_.find(s);
    if (it == sessions_.end() || it->second.closing) throw Napi::Error::New(info.Env(), name + " " + to_string(s) + " is not open");
    return it->second;
  }

  static int LayerArg(const Napi::CallbackInfo& info, size_t i, const Geometry& g) {
    const int l = IntArg(info, i, "layer", 0, 1 << 20);
    if (l >= g.layers)
      throw Napi::RangeError::New(info.Env(), "layer " + to_string(l) + " is out of range [0, " + to_string(g.layers) + ")");
    return l;
  }

  Napi::Value CreateSession(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    const auto g = ParseGeometry(env, info.Length() > 0 ? info[0] : env.Undefined());
    const auto c = ParseValidRetrieval(env, info.Length() > 1 ? info[1] : env.Undefined(), g.layers);
    auto ho = ObjectArg(env, info.Length() > 2 ? info[2] : env.Undefined(), "host");
    if (info.Length() < 4 || !info[3].IsBoolean()) throw Napi::TypeError::New(env, "reattach must be a boolean");
    const bool reattach = info[3].As<Napi::Boolean>().Value();
    HostStore h;
    h.capacity_pages = IntField(ho, "capacityPages", "host", 1, 1 << 30);
    // Left out: the whole store is reserved (an in-process kvstore's session).
    h.reserved_pages = IntField(ho, "reservedPages", "host", 0, 1 << 30, true, h.capacity_pages);
    if (h.reserved_pages > h.capacity_pages)
      throw Napi::RangeError::New(env, "host.reservedPages must be in [0, capacityPages]");
    SessionInfo si;
    si.geo = g;
    const char* names[4] = {"store", "staging", "tail", "manifest"};
    // Every value is read before any is unwrapped: a getter runs JavaScript, which could close a
    // segment already unwrapped into a raw pointer. From the unwrapping on, no JavaScript runs
    // until the segments are pinned.
    Napi::Value vals[4];
    for (int i = 0; i < 4; ++i) vals[i] = ho.Get(names[i]);
    ShmSegment* segs[4];
    for (int i = 0; i < 4; ++i) {
      auto v = vals[i];
      try {
        segs[i] = UnwrapShm(v);
      } catch (const Napi::Error& e) {
        throw Napi::TypeError::New(env, std::string("host.") + names[i] + ": " + e.Message());
      }
      si.segments.push_back(Napi::Persistent(v.As<Napi::Object>()));
    }
    h.store = static_cast<uint8_t*>(segs[0]->data());
    h.store_bytes = segs[0]->size();
    h.staging = static_cast<uint8_t*>(segs[1]->data());
    h.staging_bytes = segs[1]->size();
    h.tail = static_cast<uint8_t*>(segs[2]->data());
    h.tail_bytes = segs[2]->size();
    h.manifest = static_cast<uint8_t*>(segs[3]->data());
    h.manifest_bytes = segs[3]->size();
    si.manifest = h.manifest;
    int id;
    try {
      id = engine_->CreateSession(g, c, h, reattach);
    } catch (const std::invalid_argument& e) {
      throw Napi::RangeError::New(env, e.what());
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    for (auto& r : si.segments) PinShm(r.Value(), +1);
    sessions_.emplace(id, std::move(si));
    return Napi::Number::New(env, id);
  }

  // closeSessionAsync(session): closeSession with the engine's part on a worker thread. Closing
  // a long CUDA session unregisters its host store (16 GiB at 128K tokens of an 8B model) and
  // waits for the device; on the JS thread that held the event loop, so every other request's
  // RPCs and steps, for as long. The session takes no more calls meanwhile; its segments stay
  // pinned until the engine let them go (a failure leaves them pinned, and the session open, so
  // the close can be tried again: they cannot be unmapped under a live engine session).
  Napi::Value CloseSessionAsync(const Napi::CallbackInfo& info) {
    const int s = IntArg(info, 0, "session", 0, 1 << 30);
    auto it = sessions_.find(s);
    if (it == sessions_.end() || it->second.closing) throw Napi::Error::New(info.Env(), "session " + to_string(s) + " is not open");
    it->second.closing = true;
    auto* w = new CloseWorker(
        info.Env(), info.This().As<Napi::Object>(), engine_, s,
        [this, s] {
          auto i = sessions_.find(s);
          if (i == sessions_.end()) return;
          for (auto& r : i->second.segments) PinShm(r.Value(), -1);
          sessions_.erase(i);
        },
        // The engine kept the session (its close failed before letting go of it): it stays open
        // here too, so that the close can be tried again, rather than "closing" for ever.
        [this, s] {
          auto i = sessions_.find(s);
          if (i != sessions_.end()) i->second.closing = false;
        });
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  Napi::Value CloseSession(const Napi::CallbackInfo& info) {
    const int s = IntArg(info, 0, "session", 0, 1 << 30);
    auto it = sessions_.find(s);
    if (it == sessions_.end() || it->second.closing) throw Napi::Error::New(info.Env(), "session " + to_string(s) + " is not open");
    try {
      engine_->CloseSession(s);
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
    for (auto& r : it->second.segments) PinShm(r.Value(), -1);
    sessions_.erase(it);  // releases the segment references
    return info.Env().Undefined();
  }

  // reserveStore(session, reservedPages): the kvstore's reservation of the session grew.
  Napi::Value ReserveStore(const Napi::CallbackInfo& info) {
    const int s = IntArg(info, 0, "session", 0, 1 << 30);
    const int pages = IntArg(info, 1, "reservedPages", 0, 1 << 30);
    if (auto f = sessions_.find(s); f == sessions_.end() || f->second.closing) throw Napi::Error::New(info.Env(), "session " + to_string(s) + " is not open");
    try {
      engine_->ReserveStore(s, pages);
    } catch (const std::invalid_argument& e) {
      throw Napi::RangeError::New(info.Env(), e.what());
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
    return info.Env().Undefined();
  }

  Napi::Value Prefill(const Napi::CallbackInfo& info) { return PrefillCommon(info, false); }
  Napi::Value PrefillAttend(const Napi::CallbackInfo& info) { return PrefillCommon(info, true); }

  // prefill(session, layer, k, v, n) / prefillAttend(session, layer, q, k, v, n)
  Napi::Value PrefillCommon(const Napi::CallbackInfo& info, bool attend) {
    auto env = info.Env();
    // A copy of the geometry: converting the arguments below may run JS that closes the session.
    const Geometry geo = SessionArg(info, 0).geo;
    const int s = info[0].As<Napi::Number>().Int32Value();
    const int layer = LayerArg(info, 1, geo);
    const size_t a = attend ? 3 : 2;
    const int n = IntArg(info, a + 2, "n", 1, 1 << 24);
    const size_t kvf = static_cast<size_t>(n) * geo.kv_heads * geo.head_dim;
    const size_t qf = static_cast<size_t>(n) * geo.q_heads * geo.head_dim;
    std::vector<float> q;
    if (attend) q = FloatsArg(env, info[2], "q", qf);
    auto k = FloatsArg(env, info[a], "k", kvf);
    auto v = FloatsArg(env, info[a + 1], "v", kvf);
    auto* w = new PrefillWorker(env, info.This().As<Napi::Object>(), engine_, s, layer, std::move(q), std::move(k), std::move(v), n, qf, attend);
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  // decode(layer, items)
  Napi::Value Decode(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    const int layer = IntArg(info, 0, "layer", 0, 1 << 20);
    if (info.Length() < 2 || !info[1].IsArray()) throw Napi::TypeError::New(env, "items must be an array");
    auto arr = info[1].As<Napi::Array>();
    if (arr.Length() == 0) throw Napi::RangeError::New(env, "items must not be empty");
    std::vector<DecodeCopy> items;
    std::map<int, bool> seen;
    for (uint32_t i = 0; i < arr.Length(); ++i) {
      const std::string at = "items[" + to_string(i) + "]";
      auto o = ObjectArg(env, arr.Get(i), at);
      const int s = IntField(o, "session", at, 0, 1 << 30);
      auto it = sessions_.find(s);
      if (it == sessions_.end() || it->second.closing) throw Napi::Error::New(env, at + ".session " + to_string(s) + " is not open");
      if (seen[s]) throw Napi::RangeError::New(env, at + ".session " + to_string(s) + " appears twice in the batch");
      seen[s] = true;
      // A copy: reading q/k/v below may run JS (a getter) that closes the session and frees its entry.
      const Geometry g = it->second.geo;
      if (layer >= g.layers)
        throw Napi::RangeError::New(env, "layer " + to_string(layer) + " is out of range [0, " + to_string(g.layers) + ") for " + at);
      DecodeCopy d;
      d.session = s;
      d.q = FloatsArg(env, o.Get("q"), at + ".q", static_cast<size_t>(g.q_heads) * g.head_dim);
      d.k = FloatsArg(env, o.Get("k"), at + ".k", static_cast<size_t>(g.kv_heads) * g.head_dim);
      d.v = FloatsArg(env, o.Get("v"), at + ".v", static_cast<size_t>(g.kv_heads) * g.head_dim);
      d.out.assign(d.q.size(), 0.f);
      items.push_back(std::move(d));
    }
    auto* w = new DecodeWorker(env, info.This().As<Napi::Object>(), engine_, layer, std::move(items));
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  Napi::Value Sync(const Napi::CallbackInfo& info) {
    SessionArg(info, 0);
    auto* w = new SyncWorker(info.Env(), info.This().As<Napi::Object>(), engine_, info[0].As<Napi::Number>().Int32Value());
    auto p = w->Promise();
    w->Queue();
    return p;
  }

  // Failures of the engine's background work since the last call:
  // { failures: [{ session, message }], dropped }.
  Napi::Value TakeBackgroundFailures(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    const auto taken = engine_->TakeBackgroundFailures();
    auto a = Napi::Array::New(env, taken.failures.size());
    for (uint32_t i = 0; i < taken.failures.size(); ++i) {
      auto o = Napi::Object::New(env);
      o.Set("session", Napi::Number::New(env, taken.failures[i].session));
      o.Set("message", Napi::String::New(env, taken.failures[i].what));
      a.Set(i, o);
    }
    auto out = Napi::Object::New(env);
    out.Set("failures", a);
    out.Set("dropped", Napi::Number::New(env, static_cast<double>(taken.dropped)));
    return out;
  }

  Napi::Value GetDeviceStepStats(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    // All zeros on a backend without device steps (CPU).
    DeviceEngine* device = engine_->device();
    const DeviceStepStats st = device ? device->GetDeviceStepStats() : DeviceStepStats{};
    auto o = Napi::Object::New(env);
    auto num = [&](const char* k, double v) { o.Set(k, Napi::Number::New(env, v)); };
    num("steps", static_cast<double>(st.steps));
    num("direct", static_cast<double>(st.direct));
    num("captures", static_cast<double>(st.captures));
    num("updates", static_cast<double>(st.updates));
    num("replays", static_cast<double>(st.replays));
    num("ops", static_cast<double>(st.ops));
    num("captureMs", st.capture_ms);
    num("hostMs", st.host_ms);
    num("deviceMs", st.device_ms);
    num("sideIssueMs", st.side_issue_ms);
    num("waitMs", st.wait_ms);
    num("finishMs", st.finish_ms);
    num("resultMs", st.result_ms);
    num("sideMs", st.side_ms);
    num("sideSteps", static_cast<double>(st.side_steps));
    return o;
  }

  Napi::Value GetStats(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    SessionArg(info, 0);
    Stats st;
    try {
      st = engine_->GetStats(info[0].As<Napi::Number>().Int32Value());
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    auto o = Napi::Object::New(env);
    auto num = [&](const char* k, uint64_t v) { o.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
    num("decodeSteps", st.decode_steps);
    num("selections", st.selections);
    num("corrections", st.corrections);
    num("pagesSelected", st.pages_selected);
    num("pagesHit", st.pages_hit);
    num("pagesRecalled", st.pages_recalled);
    num("recallBytes", st.recall_bytes);
    num("pagesOffloaded", st.pages_offloaded);
    num("offloadBytes", st.offload_bytes);
    num("contextTokens", st.context_tokens);
    num("residentPages", st.resident_pages);
    num("recallWaits", st.recall_waits);
    num("guardWaits", st.guard_waits);
    auto layers = Napi::Array::New(env, st.layers.size());
    for (size_t l = 0; l < st.layers.size(); ++l) {
      const LayerStats& ls = st.layers[l];
      auto lo = Napi::Object::New(env);
      auto lnum = [&](const char* k, double v) { lo.Set(k, Napi::Number::New(env, v)); };
      lnum("selections", static_cast<double>(ls.selections));
      lnum("corrections", static_cast<double>(ls.corrections));
      lnum("pagesSelected", static_cast<double>(ls.pages_selected));
      lnum("pagesHit", static_cast<double>(ls.pages_hit));
      lnum("pagesRecalled", static_cast<double>(ls.pages_recalled));
      lnum("cosineSamples", static_cast<double>(ls.cosine_samples));
      lnum("cosineBelowTau", static_cast<double>(ls.cosine_below_tau));
      lnum("cosineSum", ls.cosine_sum);
      lnum("cosineSumSq", ls.cosine_sum_sq);
      lnum("cosineMin", ls.cosine_min);
      auto hist = Napi::Array::New(env, kCosineBuckets);
      for (int b = 0; b < kCosineBuckets; ++b) hist.Set(b, static_cast<double>(ls.cosine_hist[b]));
      lo.Set("cosineHistogram", hist);
      lnum("overlapPages", static_cast<double>(ls.overlap_pages));
      lnum("overlapBase", static_cast<double>(ls.overlap_base));
      layers.Set(l, lo);
    }
    o.Set("layers", layers);
    return o;
  }

  // setHierarchicalSelection("auto" | "on" | "off"): the mode of the selections from now on.
  Napi::Value SetHierarchicalSelection(const Napi::CallbackInfo& info) {
    const std::string m = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : std::string();
    HierarchicalSelection mode = HierarchicalSelection::Auto;
    if (m == "off") mode = HierarchicalSelection::Off;
    else if (m == "on") mode = HierarchicalSelection::On;
    else if (m != "auto") throw Napi::TypeError::New(info.Env(), "setHierarchicalSelection: mode must be \"auto\", \"on\" or \"off\"");
    engine_->SetHierarchicalSelection(mode);
    return info.Env().Undefined();
  }

  Napi::Value ContextTokens(const Napi::CallbackInfo& info) {
    SessionArg(info, 0);
    try {
      return Napi::Number::New(info.Env(), static_cast<double>(engine_->ContextTokens(info[0].As<Napi::Number>().Int32Value())));
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
  }

  // Read from the session manifest, which every backend keeps (so no backend implements it).
  Napi::Value FilledPages(const Napi::CallbackInfo& info) {
    const auto& si = SessionArg(info, 0);
    const int layer = LayerArg(info, 1, si.geo);
    return Napi::Number::New(info.Env(), ManifestCommittedPages(si.manifest, layer));
  }

  Napi::Value LastAttendedTokens(const Napi::CallbackInfo& info) {
    auto env = info.Env();
    const auto& si = SessionArg(info, 0);
    const int layer = LayerArg(info, 1, si.geo);
    const int h = IntArg(info, 2, "kvHead", 0, 1 << 20);
    if (h >= si.geo.kv_heads)
      throw Napi::RangeError::New(env, "kvHead " + to_string(h) + " is out of range [0, " + to_string(si.geo.kv_heads) + ")");
    std::vector<int> t;
    try {
      t = engine_->LastAttendedTokens(info[0].As<Napi::Number>().Int32Value(), layer, h);
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    auto a = Napi::Int32Array::New(env, t.size());
    if (!t.empty()) std::memcpy(a.Data(), t.data(), t.size() * sizeof(int));
    return a;
  }

  std::string backend_;
  std::shared_ptr<Engine> engine_;
  std::map<int, SessionInfo> sessions_;
};

std::shared_ptr<freekv::Engine> UnwrapEngine(Napi::Value v) {
  if (!v.IsObject() || AddonEngine::Ctor(v.Env()).IsEmpty() || !v.As<Napi::Object>().InstanceOf(AddonEngine::Ctor(v.Env()).Value()))
    throw Napi::TypeError::New(v.Env(), "expected an Engine");
  return AddonEngine::Unwrap(v.As<Napi::Object>())->engine();
}

void InitEngine(Napi::Env env, Napi::Object exports) {
  auto fn = AddonEngine::Define(env);
  AddonEngine::Ctor(env) = Napi::Persistent(fn);
  exports.Set("Engine", fn);
}

}  // namespace freekv::addon
