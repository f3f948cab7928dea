// The freekv native addon: registers each module's classes and functions. Its shm/ and contract
// part (the engine's layout, manifest, retrieval defaults and validator) is also built alone as
// freekv_shm.node (addon_shm.cpp), which the kvstore loads.
// One module per folder: shm/ (shared-memory segments), engine/ (the FreeKV engine and its
// backends), model/ (the model runner), cuda/ (device probe and the CUDA runtime pieces shared by engine/cuda/ and model/cuda/).
#include "AddonModules.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  freekv::addon::InitShm(env, exports);
  freekv::addon::InitDevice(env, exports);
  freekv::addon::InitContract(env, exports);
  freekv::addon::InitEngine(env, exports);
  freekv::addon::InitModel(env, exports);
  freekv::addon::InitSampling(env, exports);
  return exports;
}

NODE_API_MODULE(freekv, Init)
