#include "AddonClasses.h"

namespace freekv::addon {

AddonClasses& Classes(Napi::Env env) {
  auto* c = env.GetInstanceData<AddonClasses>();
  if (!c) {
    c = new AddonClasses();
    env.SetInstanceData(c);  // deleted when the environment is torn down
  }
  return *c;
}

}  // namespace freekv::addon
