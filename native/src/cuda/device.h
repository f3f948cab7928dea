// Host-callable entry points of the CUDA backend (compiled by nvcc into libfreekv_cuda.a).
#pragma once
#include <string>

namespace freekv::cuda {

struct DeviceInfo {
  bool available = false;
  int device_count = 0;
  std::string name;
  int cc_major = 0, cc_minor = 0;
  size_t total_memory = 0;
  int sm_count = 0;
  int runtime_version = 0;
  int driver_version = 0;
  std::string reason;  // why CUDA is unavailable
};

// Never throws; a machine without a driver or device gives available=false and a reason.
DeviceInfo Probe();

// Opens or closes a profiler collection range (cudaProfilerStart / Stop), for a profiler started
// with collection off (e.g. `ncu --profile-from-start off`). Returns false without a device.
bool ProfilerRange(bool on);

}  // namespace freekv::cuda
