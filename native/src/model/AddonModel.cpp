#include <napi.h>
namespace freekv::addon {
// Filled in by the model module.
void InitModel(Napi::Env env, Napi::Object exports) {}
}
