// The CUDA backend's checks of a session when it is created: the retrieval config through the one
// validator every backend uses (engine/Retrieval.h), then the CUDA backend's own limits on top
// (head dims, bf16 K/V, group size, selected pages, candidates) and the host store's sizes.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "CudaEngine.h"
#include "selection.cuh"

namespace freekv::cuda {

using std::to_string;

void CudaEngine::Validate(const Geometry& g, const RetrievalConfig& c, const HostStore& h) {
  ValidateGeometry(g);
  if (g.q_heads / g.kv_heads > 8)
    throw std::invalid_argument("geometry: the CUDA backend supports at most 8 query heads per KV head");
  if (g.head_dim != 64 && g.head_dim != 128 && g.head_dim != 256)
    throw std::invalid_argument("geometry.headDim must be 64, 128 or 256 on the CUDA backend");
  if (g.kv_dtype != DType::BF16)
    throw std::invalid_argument("geometry.kvDtype: the CUDA backend stores K/V in bf16 (DType BF16)");
  if (auto e = ValidateRetrieval(c, g.layers)) throw std::invalid_argument("retrieval." + e->field + " " + e->message);
  if (c.select_tokens / c.page_size > 1024)
    throw std::invalid_argument("retrieval.selectTokens: at most 1024 selected pages on the CUDA backend");
  if (h.capacity_pages > kMaxSelectionCandidates)
    throw std::invalid_argument("host.capacityPages: at most " + to_string(kMaxSelectionCandidates) +
                                " pages per layer on the CUDA backend");
  // The CUDA backend does not use the staging buffers.
  ValidateHostStore(h, ComputeLayout(g, c, std::max(h.capacity_pages, 1)), false);
}

}  // namespace freekv::cuda
