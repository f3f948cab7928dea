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
  if (g.layers < 1) throw std::invalid_argument("geometry.layers must be >= 1");
  if (g.kv_heads < 1 || g.q_heads < 1 || g.q_heads % g.kv_heads != 0)
    throw std::invalid_argument("geometry.qHeads must be a positive multiple of geometry.kvHeads");
  if (g.q_heads / g.kv_heads > 8)
    throw std::invalid_argument("geometry: the CUDA backend supports at most 8 query heads per KV head");
  if (g.head_dim != 64 && g.head_dim != 128 && g.head_dim != 256)
    throw std::invalid_argument("geometry.headDim must be 64, 128 or 256 on the CUDA backend");
  if (g.kv_dtype != DType::BF16)
    throw std::invalid_argument("geometry.kvDtype: the CUDA backend stores K/V in bf16 (DType BF16)");
  if (auto e = ValidateRetrieval(c, g.layers)) throw std::invalid_argument("retrieval." + e->field + " " + e->message);
  if (c.select_tokens / c.page_size > 1024)
    throw std::invalid_argument("retrieval.selectTokens: at most 1024 selected pages on the CUDA backend");
  if (h.capacity_pages < 1) throw std::invalid_argument("host.capacityPages must be >= 1");
  if (h.capacity_pages > kMaxSelectionCandidates)
    throw std::invalid_argument("host.capacityPages: at most " + to_string(kMaxSelectionCandidates) +
                                " pages per layer on the CUDA backend");
  const Layout lay = ComputeLayout(g, c, h.capacity_pages);
  if (!h.store || h.store_bytes < lay.store_bytes)
    throw std::invalid_argument("host.store is smaller than the layout's storeBytes (" + to_string(lay.store_bytes) + ")");
  if (!h.tail || h.tail_bytes < lay.tail_bytes)
    throw std::invalid_argument("host.tail is smaller than the layout's tailBytes (" + to_string(lay.tail_bytes) + ")");
  if (!h.manifest || h.manifest_bytes < lay.manifest_bytes)
    throw std::invalid_argument("host.manifest is smaller than the layout's manifestBytes (" +
                                to_string(lay.manifest_bytes) + ")");
}

}  // namespace freekv::cuda
