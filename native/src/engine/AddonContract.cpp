#include "engine/AddonContract.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "engine/Manifest.h"
#include "engine/RetrievalStats.h"

namespace freekv::addon {

using std::to_string;

Napi::Object ObjectArg(const Napi::Env& env, Napi::Value v, const std::string& name) {
  if (!v.IsObject()) throw Napi::TypeError::New(env, name + " must be an object");
  return v.As<Napi::Object>();
}

double NumberField(const Napi::Object& o, const char* key, const std::string& path, bool* present) {
  auto v = o.Get(key);
  if (v.IsUndefined()) {
    if (present) {
      *present = false;
      return 0;
    }
    throw Napi::TypeError::New(o.Env(), path + "." + key + " is required");
  }
  if (!v.IsNumber()) throw Napi::TypeError::New(o.Env(), path + "." + key + " must be a number");
  if (present) *present = true;
  return v.As<Napi::Number>().DoubleValue();
}

int IntField(const Napi::Object& o, const char* key, const std::string& path, int lo, int hi, bool optional, int dflt) {
  bool present = true;
  const double d = NumberField(o, key, path, optional ? &present : nullptr);
  if (!present) return dflt;
  if (!std::isfinite(d) || std::floor(d) != d || d < lo || d > hi)
    throw Napi::RangeError::New(o.Env(), path + "." + key + " must be an integer in [" + to_string(lo) + ", " + to_string(hi) + "]");
  return static_cast<int>(d);
}

bool BoolField(const Napi::Object& o, const char* key, const std::string& path, bool dflt) {
  auto v = o.Get(key);
  if (v.IsUndefined()) return dflt;
  if (!v.IsBoolean()) throw Napi::TypeError::New(o.Env(), path + "." + key + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

int IntArg(const Napi::CallbackInfo& info, size_t i, const std::string& name, int lo, int hi) {
  if (info.Length() <= i || !info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), name + " must be a number");
  const double d = info[i].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || std::floor(d) != d || d < lo || d > hi)
    throw Napi::RangeError::New(info.Env(), name + " must be an integer in [" + to_string(lo) + ", " + to_string(hi) + "]");
  return static_cast<int>(d);
}

Geometry ParseGeometry(const Napi::Env& env, Napi::Value v) {
  auto o = ObjectArg(env, v, "geometry");
  Geometry g;
  g.layers = IntField(o, "layers", "geometry", 1, 4096);
  g.q_heads = IntField(o, "qHeads", "geometry", 1, 1024);
  g.kv_heads = IntField(o, "kvHeads", "geometry", 1, 1024);
  g.head_dim = IntField(o, "headDim", "geometry", 1, 1024);
  g.kv_dtype = static_cast<DType>(IntField(o, "kvDtype", "geometry", 1, 3, true, 1));
  if (g.q_heads % g.kv_heads != 0) throw Napi::RangeError::New(env, "geometry.qHeads must be a multiple of geometry.kvHeads");
  return g;
}

RetrievalConfig ParseRetrieval(const Napi::Env& env, Napi::Value v) {
  auto o = ObjectArg(env, v, "retrieval");
  RetrievalConfig c;
  const std::string p = "retrieval";
  constexpr int kAny = 1 << 30;
  c.page_size = IntField(o, "pageSize", p, -kAny, kAny, true, c.page_size);
  c.sink_tokens = IntField(o, "sinkTokens", p, -kAny, kAny, true, c.sink_tokens);
  c.window_tokens = IntField(o, "windowTokens", p, -kAny, kAny, true, c.window_tokens);
  c.select_tokens = IntField(o, "selectTokens", p, -kAny, kAny, true, c.select_tokens);
  bool has_tau = false;
  const double tau = NumberField(o, "tau", p, &has_tau);
  if (has_tau) c.tau = static_cast<float>(tau);
  c.summary = static_cast<SummaryKind>(IntField(o, "summary", p, -kAny, kAny, true, static_cast<int>(c.summary)));
  c.combine = static_cast<GroupCombine>(IntField(o, "combine", p, -kAny, kAny, true, static_cast<int>(c.combine)));
  c.mode = static_cast<Mode>(IntField(o, "mode", p, -kAny, kAny, true, static_cast<int>(c.mode)));
  c.recall = static_cast<RecallMode>(IntField(o, "recall", p, -kAny, kAny, true, static_cast<int>(c.recall)));
  auto dl = o.Get("denseLayers");
  if (!dl.IsUndefined()) {
    if (!dl.IsArray()) throw Napi::TypeError::New(env, "retrieval.denseLayers must be an array of layer indices");
    auto a = dl.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) {
      auto e = a.Get(i);
      if (!e.IsNumber()) throw Napi::TypeError::New(env, "retrieval.denseLayers[" + to_string(i) + "] must be a number");
      const double d = e.As<Napi::Number>().DoubleValue();
      if (std::floor(d) != d || std::fabs(d) > kAny)
        throw Napi::RangeError::New(env, "retrieval.denseLayers[" + to_string(i) + "] must be a layer index");
      c.dense_layers.push_back(static_cast<int>(d));
    }
  }
  return c;
}

RetrievalConfig ParseValidRetrieval(const Napi::Env& env, Napi::Value v, int layers) {
  auto c = ParseRetrieval(env, v);
  if (auto e = ValidateRetrieval(c, layers)) throw Napi::RangeError::New(env, "retrieval." + e->field + " " + e->message);
  return c;
}

namespace {

// The shortest decimal that reads back as the same float (0.9f -> 0.9, not 0.8999999761...).
double ShortestDecimal(float f) {
  char buf[32];
  for (int digits = 6; digits <= 9; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, static_cast<double>(f));
    if (std::strtof(buf, nullptr) == f) break;
  }
  return std::strtod(buf, nullptr);
}

Napi::Object RetrievalObject(const Napi::Env& env, const RetrievalConfig& c) {
  auto o = Napi::Object::New(env);
  o.Set("pageSize", c.page_size);
  o.Set("sinkTokens", c.sink_tokens);
  o.Set("windowTokens", c.window_tokens);
  o.Set("selectTokens", c.select_tokens);
  o.Set("tau", ShortestDecimal(c.tau));
  o.Set("summary", static_cast<int>(c.summary));
  o.Set("combine", static_cast<int>(c.combine));
  o.Set("mode", static_cast<int>(c.mode));
  o.Set("recall", static_cast<int>(c.recall));
  auto dl = Napi::Array::New(env, c.dense_layers.size());
  for (uint32_t i = 0; i < c.dense_layers.size(); ++i) dl.Set(i, c.dense_layers[i]);
  o.Set("denseLayers", dl);
  return o;
}

// layout(geometry, retrieval, capacityPages)
Napi::Value LayoutFn(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  const auto g = ParseGeometry(env, info.Length() > 0 ? info[0] : env.Undefined());
  const auto c = ParseValidRetrieval(env, info.Length() > 1 ? info[1] : env.Undefined(), g.layers);
  const int cap = IntArg(info, 2, "capacityPages", 1, 1 << 30);
  Layout l;
  try {
    l = ComputeLayout(g, c, cap);
  } catch (const std::invalid_argument& e) {
    throw Napi::RangeError::New(env, e.what());
  }
  auto o = Napi::Object::New(env);
  auto num = [&](const char* k, size_t v) { o.Set(k, Napi::Number::New(env, static_cast<double>(v))); };
  num("headPageBytes", l.head_page_bytes);
  num("pageBytes", l.page_bytes);
  num("layerStride", l.layer_stride);
  num("storeBytes", l.store_bytes);
  num("stagingBufferBytes", l.staging_buffer_bytes);
  num("tailLayerBytes", l.tail_layer_bytes);
  num("tailBytes", l.tail_bytes);
  num("manifestBytes", l.manifest_bytes);
  num("manifestQueryOffset", l.manifest_query_offset);
  num("manifestQueryRecordBytes", l.manifest_query_record_bytes);
  return o;
}

Napi::ArrayBuffer BufferArg(const Napi::CallbackInfo& info, size_t i, const std::string& name) {
  if (info.Length() <= i || !info[i].IsArrayBuffer()) throw Napi::TypeError::New(info.Env(), name + " must be an ArrayBuffer");
  auto ab = info[i].As<Napi::ArrayBuffer>();
  if (ab.IsDetached()) throw Napi::TypeError::New(info.Env(), name + " is detached");
  return ab;
}

// initManifest(buffer, layers)
Napi::Value InitManifestFn(const Napi::CallbackInfo& info) {
  auto ab = BufferArg(info, 0, "buffer");
  const int layers = IntArg(info, 1, "layers", 1, 1 << 20);
  try {
    InitManifest(static_cast<uint8_t*>(ab.Data()), ab.ByteLength(), layers);
  } catch (const std::exception& e) {
    throw Napi::RangeError::New(info.Env(), e.what());
  }
  return info.Env().Undefined();
}

// markManifestCorrupt(buffer), manifestCorrupt(buffer)
Napi::Value MarkManifestCorruptFn(const Napi::CallbackInfo& info) {
  auto ab = BufferArg(info, 0, "buffer");
  try {
    MarkManifestCorrupt(static_cast<uint8_t*>(ab.Data()), ab.ByteLength());
  } catch (const std::exception& e) {
    throw Napi::RangeError::New(info.Env(), e.what());
  }
  return info.Env().Undefined();
}
Napi::Value ManifestCorruptFn(const Napi::CallbackInfo& info) {
  auto ab = BufferArg(info, 0, "buffer");
  try {
    return Napi::Boolean::New(info.Env(), ManifestCorrupt(static_cast<const uint8_t*>(ab.Data()), ab.ByteLength()));
  } catch (const std::exception& e) {
    throw Napi::RangeError::New(info.Env(), e.what());
  }
}

// readManifest(buffer, layers)
Napi::Value ReadManifestFn(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto ab = BufferArg(info, 0, "buffer");
  const int layers = IntArg(info, 1, "layers", 1, 1 << 20);
  ManifestState s;
  try {
    s = ReadManifest(static_cast<const uint8_t*>(ab.Data()), ab.ByteLength(), layers);
  } catch (const std::exception& e) {
    throw Napi::RangeError::New(env, e.what());
  }
  auto o = Napi::Object::New(env);
  o.Set("valid", s.valid);
  o.Set("corrupt", s.corrupt);
  o.Set("layers", s.layers);
  o.Set("contextTokens", static_cast<double>(s.context_tokens));
  auto committed = Napi::Array::New(env, layers), tail = Napi::Array::New(env, layers);
  for (int l = 0; l < layers; ++l) {
    committed.Set(l, s.committed_pages[l]);
    tail.Set(l, s.tail_tokens[l]);
  }
  o.Set("committedPages", committed);
  o.Set("tailTokens", tail);
  return o;
}

Napi::Value RetrievalDefaultsFn(const Napi::CallbackInfo& info) { return RetrievalObject(info.Env(), RetrievalConfig{}); }

// validateRetrieval(retrieval, layers): null, or { field, message } of the first invalid field.
Napi::Value ValidateRetrievalFn(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  const auto c = ParseRetrieval(env, info.Length() > 0 ? info[0] : env.Undefined());
  const int layers = IntArg(info, 1, "layers", 1, 1 << 20);
  auto e = ValidateRetrieval(c, layers);
  if (!e) return env.Null();
  auto o = Napi::Object::New(env);
  o.Set("field", e->field);
  o.Set("message", e->message);
  return o;
}

Napi::Value EnumsFn(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto o = Napi::Object::New(env);
  for (const auto& t : kEnumTables) {
    auto names = Napi::Object::New(env);
    for (size_t i = 0; i < t.count; ++i) names.Set(t.names[i].name, t.names[i].value);
    o.Set(t.field, names);
  }
  return o;
}

// cosineBucketEdges(): the upper edges of the adjacent-cosine histogram's buckets but the last
// (engine/RetrievalStats.h).
Napi::Value CosineBucketEdgesFn(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto a = Napi::Array::New(env, kCosineBuckets - 1);
  for (int i = 0; i < kCosineBuckets - 1; ++i) a.Set(i, static_cast<double>(CosineBucketEdge(i)));
  return a;
}

}  // namespace

void InitContract(Napi::Env env, Napi::Object exports) {
  exports.Set("layout", Napi::Function::New(env, LayoutFn, "layout"));
  exports.Set("initManifest", Napi::Function::New(env, InitManifestFn, "initManifest"));
  exports.Set("readManifest", Napi::Function::New(env, ReadManifestFn, "readManifest"));
  exports.Set("markManifestCorrupt", Napi::Function::New(env, MarkManifestCorruptFn, "markManifestCorrupt"));
  exports.Set("manifestCorrupt", Napi::Function::New(env, ManifestCorruptFn, "manifestCorrupt"));
  exports.Set("retrievalDefaults", Napi::Function::New(env, RetrievalDefaultsFn, "retrievalDefaults"));
  exports.Set("validateRetrieval", Napi::Function::New(env, ValidateRetrievalFn, "validateRetrieval"));
  exports.Set("enums", Napi::Function::New(env, EnumsFn, "enums"));
  exports.Set("cosineBucketEdges", Napi::Function::New(env, CosineBucketEdgesFn, "cosineBucketEdges"));
}

}  // namespace freekv::addon
