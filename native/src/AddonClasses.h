// The constructors of the addon's classes, per JavaScript environment. The main thread and every
// worker thread that loads the addon get their own environment; a constructor kept in a
// process-wide static would be the last environment's, and used after that environment ended
// (a worker's exit) it is a reference into a dead heap. So each environment keeps its own, as its
// instance data, released with it.
#pragma once

#include <napi.h>

namespace freekv::addon {

struct AddonClasses {
  Napi::FunctionReference shm_segment, engine, model;
};

// This environment's constructors (created empty on first use; each Init fills its own).
AddonClasses& Classes(Napi::Env env);

}  // namespace freekv::addon
