// backendInfo(): which backends this build has and whether a CUDA device is usable.
#include <napi.h>

#ifdef FREEKV_WITH_CUDA
#include "cuda/device.h"
#endif

namespace freekv::addon {

static Napi::Value BackendInfo(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  auto out = Napi::Object::New(env);
  auto cuda = Napi::Object::New(env);
#ifdef FREEKV_WITH_CUDA
  out.Set("cudaBuilt", true);
  auto d = freekv::cuda::Probe();
  cuda.Set("available", d.available);
  cuda.Set("deviceCount", d.device_count);
  cuda.Set("runtimeVersion", d.runtime_version);
  cuda.Set("driverVersion", d.driver_version);
  if (d.available) {
    cuda.Set("name", d.name);
    cuda.Set("computeCapability", std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor));
    cuda.Set("totalMemory", static_cast<double>(d.total_memory));
    cuda.Set("smCount", d.sm_count);
  } else {
    cuda.Set("reason", d.reason);
  }
#else
  out.Set("cudaBuilt", false);
  cuda.Set("available", false);
  cuda.Set("deviceCount", 0);
  cuda.Set("reason", "no CUDA device: this build has no CUDA backend (nvcc was not found when it was built)");
#endif
  out.Set("cuda", cuda);
  auto backends = Napi::Array::New(env);
  backends.Set(0u, "cpu");
#ifdef FREEKV_WITH_CUDA
  if (cuda.Get("available").ToBoolean()) backends.Set(1u, "cuda");
#endif
  out.Set("backends", backends);
  return out;
}

// profilerRange(on): opens or closes a CUDA profiler collection range (for `ncu
// --profile-from-start off`); false where there is no CUDA device or backend.
static Napi::Value ProfilerRange(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (info.Length() < 1 || !info[0].IsBoolean()) throw Napi::TypeError::New(env, "profilerRange(on: boolean)");
#ifdef FREEKV_WITH_CUDA
  return Napi::Boolean::New(env, freekv::cuda::ProfilerRange(info[0].As<Napi::Boolean>().Value()));
#else
  return Napi::Boolean::New(env, false);
#endif
}

void InitDevice(Napi::Env env, Napi::Object exports) {
  exports.Set("backendInfo", Napi::Function::New(env, BackendInfo, "backendInfo"));
  exports.Set("profilerRange", Napi::Function::New(env, ProfilerRange, "profilerRange"));
}

}  // namespace freekv::addon
