#include <napi.h>
namespace freekv::addon {
// Filled in by the engine module.
void InitEngine(Napi::Env env, Napi::Object exports) {}
}
