// The CUDA backend's limits on a session (geometry, retrieval config, host store sizes), checked
// when a session is created: the one place the CUDA engine validates a session.
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
    throw std::invalid_argument("geometry.kvDtype: the CUDA backend stores K/V in bf16 (KvDType.BF16)");
  if (c.page_size < 1) throw std::invalid_argument("retrieval.pageSize must be >= 1");
  if (c.sink_tokens < 0 || c.sink_tokens % c.page_size)
    throw std::invalid_argument("retrieval.sinkTokens must be a non-negative multiple of retrieval.pageSize");
  if (c.select_tokens < 0 || c.select_tokens % c.page_size)
    throw std::invalid_argument("retrieval.selectTokens must be a non-negative multiple of retrieval.pageSize");
  if (c.window_tokens < c.page_size || c.window_tokens % c.page_size)
    throw std::invalid_argument("retrieval.windowTokens must be a positive multiple of retrieval.pageSize");
  if (c.select_tokens / c.page_size > 1024)
    throw std::invalid_argument("retrieval.selectTokens: at most 1024 selected pages on the CUDA backend");
  if (c.summary != SummaryKind::MaxMin && c.summary != SummaryKind::CuboidMean)
    throw std::invalid_argument("retrieval.summary is unknown");
  if (h.capacity_pages < 1) throw std::invalid_argument("host.capacityPages must be >= 1");
  if (h.capacity_pages > kMaxSelectionCandidates)
    throw std::invalid_argument("host.capacityPages: at most " + to_string(kMaxSelectionCandidates) +
                                " pages per layer on the CUDA backend");
  for (int l : c.dense_layers)
    if (l < 0 || l >= g.layers) throw std::invalid_argument("retrieval.denseLayers has layer " + to_string(l) + " out of range");
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
