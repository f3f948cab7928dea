// The JS class `Engine` (AddonEngine.cpp). Other native modules (the model runner) get the
// freekv::Engine behind a JS Engine object from here; the shared_ptr keeps it alive while used.
#pragma once

#include <napi.h>

#include <memory>

#include "engine/Engine.h"

namespace freekv::addon {

// Throws a JS TypeError when `v` is not an Engine.
std::shared_ptr<freekv::Engine> UnwrapEngine(Napi::Value v);

}  // namespace freekv::addon
