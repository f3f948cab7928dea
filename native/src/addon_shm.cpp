// The freekv_shm native addon: shared-memory segments and the contract functions (layout,
// manifest, retrieval defaults and validator, enum names) without the engine, the model runner
// or CUDA. The kvstore loads this one (native/shm.ts); the full addon (addon.cpp) has the same
// functions built from the same sources.
#include "AddonModules.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  freekv::addon::InitShm(env, exports);
  freekv::addon::InitContract(env, exports);
  return exports;
}

NODE_API_MODULE(freekv_shm, Init)
