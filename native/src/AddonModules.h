// The Init functions of the addon's modules, each registering its classes and functions on the
// exports: the full addon (addon.cpp) calls all of them, freekv_shm (addon_shm.cpp) the first two.
#pragma once

#include <napi.h>

#include <cstddef>

namespace freekv::addon {

// The largest external ArrayBuffer the addon hands to JavaScript (Node's limit for one buffer on
// 64-bit Node 20). Past it Node runs the finalizer itself and then fails: callers refuse first.
constexpr size_t kMaxExternalBufferBytes = size_t{1} << 32;

void InitShm(Napi::Env env, Napi::Object exports);       // shm/AddonShm.cpp (with InitCrc32c)
void InitCrc32c(Napi::Env env, Napi::Object exports);    // shm/AddonCrc32c.cpp
void InitContract(Napi::Env env, Napi::Object exports);  // engine/AddonContract.cpp
void InitDevice(Napi::Env env, Napi::Object exports);    // cuda/AddonDevice.cpp
void InitEngine(Napi::Env env, Napi::Object exports);    // engine/AddonEngine.cpp
void InitModel(Napi::Env env, Napi::Object exports);     // model/AddonModel.cpp
void InitSampling(Napi::Env env, Napi::Object exports);  // model/AddonSampling.cpp
}  // namespace freekv::addon
