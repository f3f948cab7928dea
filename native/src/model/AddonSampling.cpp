// argmaxF32(values, offset, n): index (relative to offset) of the first largest of n float32
// values. Greedy decoding takes it over every row of the logits, [batch][vocab] with a vocabulary
// of 128K for Llama 3: a tight native loop is several times faster than the same loop in
// JavaScript and keeps sampling off a decode step's critical path. Same semantics as the
// TypeScript fallback (a NaN never wins unless it comes first).
#include <napi.h>

#include <cstdint>

namespace freekv::addon {

static int64_t ArgmaxF32(const float* x, int64_t n) {
  int64_t best = 0;
  float bestValue = x[0];
  for (int64_t i = 1; i < n; ++i) {
    if (x[i] > bestValue) {
      bestValue = x[i];
      best = i;
    }
  }
  return best;
}

static Napi::Value Argmax(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (info.Length() < 3 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(env, "values must be a Float32Array");
  if (!info[1].IsNumber() || !info[2].IsNumber()) throw Napi::TypeError::New(env, "offset and n must be numbers");
  auto a = info[0].As<Napi::Float32Array>();
  const double off = info[1].As<Napi::Number>().DoubleValue();
  const double n = info[2].As<Napi::Number>().DoubleValue();
  if (!(off >= 0) || off != static_cast<double>(static_cast<int64_t>(off))) throw Napi::RangeError::New(env, "offset must be an integer >= 0");
  if (!(n >= 1) || n != static_cast<double>(static_cast<int64_t>(n))) throw Napi::RangeError::New(env, "n must be an integer >= 1");
  if (off + n > static_cast<double>(a.ElementLength()))
    throw Napi::RangeError::New(env, "offset + n is past the end of values");
  return Napi::Number::New(env, static_cast<double>(ArgmaxF32(a.Data() + static_cast<int64_t>(off), static_cast<int64_t>(n))));
}

void InitSampling(Napi::Env env, Napi::Object exports) { exports.Set("argmaxF32", Napi::Function::New(env, Argmax, "argmaxF32")); }

}  // namespace freekv::addon
