// Status checking for every CUDA call of the CUDA backend: a failure becomes a
// std::runtime_error naming the call (never an abort), which the N-API layer turns into a JS error.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace freekv::cuda {

inline void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(e) + " (" +
                             cudaGetErrorString(e) + ")");
  }
}

// Shape / argument checks of the host launchers.
inline void Require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

}  // namespace freekv::cuda

#define FKV_CUDA_CHECK(call) ::freekv::cuda::Check((call), #call)
// After a kernel launch: catches bad launch configurations at once (asynchronous faults surface
// at the next synchronising call, which is checked too).
#define FKV_CUDA_CHECK_LAUNCH(name) ::freekv::cuda::Check(cudaGetLastError(), name)
