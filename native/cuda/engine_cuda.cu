// CUDA engine factory. Placeholder until the CUDA backend's kernels land.
#include <stdexcept>

#include "engine/Engine.h"

namespace freekv {
std::unique_ptr<Engine> MakeCudaEngine(int device) {
  throw std::runtime_error("no CUDA device: the CUDA engine is not implemented in this build");
}
}  // namespace freekv
