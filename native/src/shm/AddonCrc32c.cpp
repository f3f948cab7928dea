// JS functions `crc32c(bytes, seed?)` and `crc32cPages(bytes, byteOffset, pageBytes, count)`: the
// page checksums of commits and of the kvstore's scrubber, on the crc32 instruction (shm/Crc32c.h).
// Synchronous: callers hand over bounded slices (a commit's pages, a scrub slice).
#include <napi.h>

#include <cmath>
#include <cstring>

#include "shm/Crc32c.h"

namespace freekv::addon {
namespace {

struct Bytes {
  const uint8_t* data = nullptr;
  size_t size = 0;
};

Bytes BytesOf(const Napi::Env& env, const Napi::Value& v, const char* what) {
  if (v.IsArrayBuffer()) {
    auto ab = v.As<Napi::ArrayBuffer>();
    return {static_cast<const uint8_t*>(ab.Data()), ab.ByteLength()};
  }
  if (v.IsTypedArray()) {
    auto ta = v.As<Napi::TypedArray>();
    auto ab = ta.ArrayBuffer();
    return {static_cast<const uint8_t*>(ab.Data()) + ta.ByteOffset(), ta.ByteLength()};
  }
  if (v.IsDataView()) {
    auto dv = v.As<Napi::DataView>();
    return {static_cast<const uint8_t*>(dv.ArrayBuffer().Data()) + dv.ByteOffset(), dv.ByteLength()};
  }
  throw Napi::TypeError::New(env, std::string(what) + " must be an ArrayBuffer or a typed array");
}

// A non-negative integer argument no larger than `max`.
size_t Count(const Napi::Env& env, const Napi::Value& v, const char* what, double max) {
  if (!v.IsNumber()) throw Napi::TypeError::New(env, std::string(what) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d > max || std::floor(d) != d)
    throw Napi::RangeError::New(env, std::string(what) + " must be an integer in [0, " + std::to_string(static_cast<uint64_t>(max)) + "]");
  return static_cast<size_t>(d);
}

Napi::Value Crc32cJs(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  Bytes b = BytesOf(env, info[0], "bytes");
  uint32_t seed = info.Length() > 1 && !info[1].IsUndefined() ? static_cast<uint32_t>(Count(env, info[1], "seed", 4294967295.0)) : 0;
  return Napi::Number::New(env, Crc32c(b.data, b.size, seed));
}

Napi::Value Crc32cPagesJs(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  Bytes b = BytesOf(env, info[0], "bytes");
  size_t offset = Count(env, info[1], "byteOffset", static_cast<double>(b.size));
  size_t page = Count(env, info[2], "pageBytes", static_cast<double>(b.size));
  size_t count = Count(env, info[3], "count", 1u << 30);
  if (page == 0 && count > 0) throw Napi::RangeError::New(env, "pageBytes must be > 0");
  if (count > 0 && (b.size - offset) / page < count)
    throw Napi::RangeError::New(env, "pages [byteOffset, byteOffset + pageBytes * count) run past the end of bytes");
  auto out = Napi::Uint32Array::New(env, count);
  if (count > 0) freekv::Crc32cPages(b.data + offset, page, count, out.Data());
  return out;
}

}  // namespace

void InitCrc32c(Napi::Env env, Napi::Object exports) {
  exports.Set("crc32c", Napi::Function::New(env, Crc32cJs, "crc32c"));
  exports.Set("crc32cPages", Napi::Function::New(env, Crc32cPagesJs, "crc32cPages"));
  exports.Set("crc32cHardware", Napi::Boolean::New(env, Crc32cHardware()));
}

}  // namespace freekv::addon
