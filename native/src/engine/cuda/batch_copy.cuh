// Batched device-to-device copies of equal-sized fp32 vectors (one launch for a whole batch, where
// one cudaMemcpyAsync per item would cost a call each): the decode step's queries into the
// per-(session, layer) query buffers.
#pragma once
#include <cuda_runtime.h>

namespace freekv::cuda {

struct CopyItem {
  const float* src;
  float* dst;
};

// items: device array of count copies of n floats each.
void LaunchCopyBatch(const CopyItem* items, int count, int n, cudaStream_t stream);

// Row r of src ([rows][n], device) to dst[r] (a device array of rows pointers, device or mapped
// host memory): the decode step's queries straight into the manifests' query records.
void LaunchScatterRows(const float* src, float* const* dst, int rows, int n, cudaStream_t stream);

}  // namespace freekv::cuda
