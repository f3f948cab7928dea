// The Init functions of the addon's modules, each registering its classes and functions on the
// exports: the full addon (addon.cpp) calls all of them, freekv_shm (addon_shm.cpp) the first two.
#pragma once

#include <napi.h>

namespace freekv::addon {
void InitShm(Napi::Env env, Napi::Object exports);       // shm/AddonShm.cpp (with InitCrc32c)
void InitCrc32c(Napi::Env env, Napi::Object exports);    // shm/AddonCrc32c.cpp
void InitContract(Napi::Env env, Napi::Object exports);  // engine/AddonContract.cpp
void InitDevice(Napi::Env env, Napi::Object exports);    // cuda/AddonDevice.cpp
void InitEngine(Napi::Env env, Napi::Object exports);    // engine/AddonEngine.cpp
void InitModel(Napi::Env env, Napi::Object exports);     // model/AddonModel.cpp
void InitSampling(Napi::Env env, Napi::Object exports);  // model/AddonSampling.cpp
}  // namespace freekv::addon
