#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include "cuda/device.h"

namespace freekv::cuda {

DeviceInfo Probe() {
  DeviceInfo info;
  cudaRuntimeGetVersion(&info.runtime_version);
  cudaDriverGetVersion(&info.driver_version);
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    info.reason = info.driver_version == 0
                      ? std::string("no CUDA device: no NVIDIA driver is installed on this machine")
                      : std::string("no CUDA device: ") + cudaGetErrorString(err);
    cudaGetLastError();
    return info;
  }
  if (n == 0) {
    info.reason = "no CUDA device: none found";
    return info;
  }
  cudaDeviceProp p{};
  err = cudaGetDeviceProperties(&p, 0);
  if (err != cudaSuccess) {
    info.reason = std::string("no CUDA device: ") + cudaGetErrorString(err);
    return info;
  }
  info.available = true;
  info.device_count = n;
  info.name = p.name;
  info.cc_major = p.major;
  info.cc_minor = p.minor;
  info.total_memory = p.totalGlobalMem;
  info.sm_count = p.multiProcessorCount;
  return info;
}

bool ProfilerRange(bool on) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    return false;
  }
  const cudaError_t e = on ? cudaProfilerStart() : cudaProfilerStop();
  if (e != cudaSuccess) cudaGetLastError();
  return e == cudaSuccess;
}

}  // namespace freekv::cuda
