#include "engine/cpu/Recall.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace freekv::cpu {

// Scatters one HND head-page (contiguous [2][P][D]) into head h's rows of an NHD slot.
static void ScatterHeadPage(const PageGeometry& g, const uint8_t* head_page, uint8_t* slot, int h) {
  for (int i = 0; i < g.P; ++i) {
    std::memcpy(slot + g.NhdK(i, h), head_page + static_cast<size_t>(i) * g.row_bytes, g.row_bytes);
    std::memcpy(slot + g.NhdV(i, h), head_page + static_cast<size_t>(g.P + i) * g.row_bytes, g.row_bytes);
  }
}

static const uint8_t* HeadPageInStore(const PageGeometry& g, const uint8_t* store_layer, const RecallOp& op) {
  return store_layer + static_cast<size_t>(op.page) * g.hnd_page_bytes + static_cast<size_t>(op.head) * g.head_page_bytes;
}

void RecallGather(const PageGeometry& g, const uint8_t* store_layer, uint8_t* slots, const std::vector<RecallOp>& ops) {
  for (const auto& op : ops)
    ScatterHeadPage(g, HeadPageInStore(g, store_layer, op), slots + static_cast<size_t>(op.slot) * g.nhd_page_bytes, op.head);
}

void RecallDoubleBuffer(const PageGeometry& g, const uint8_t* store_layer, uint8_t* slots,
                        const std::vector<RecallOp>& ops, uint8_t* staging, size_t buffer_bytes) {
  // A chunk is at most one KV head's selection (and at most one buffer), so a recall of several
  // heads alternates between the two buffers.
  const size_t per_buffer = std::min(buffer_bytes / g.head_page_bytes, static_cast<size_t>(std::max(1, g.select_pages)));
  if (per_buffer == 0) throw std::runtime_error("staging buffer is smaller than one head-page");
  const size_t n = ops.size();
  const size_t chunks = (n + per_buffer - 1) / per_buffer;
  auto fill = [&](size_t c) {  // host store -> staging buffer c % 2, one contiguous copy per head-page
    uint8_t* buf = staging + (c % 2) * buffer_bytes;
    const size_t end = std::min(n, (c + 1) * per_buffer);
    for (size_t i = c * per_buffer; i < end; ++i)
      std::memcpy(buf + (i - c * per_buffer) * g.head_page_bytes, HeadPageInStore(g, store_layer, ops[i]), g.head_page_bytes);
  };
  auto scatter = [&](size_t c) {  // staging buffer c % 2 -> NHD slots
    const uint8_t* buf = staging + (c % 2) * buffer_bytes;
    const size_t end = std::min(n, (c + 1) * per_buffer);
    for (size_t i = c * per_buffer; i < end; ++i)
      ScatterHeadPage(g, buf + (i - c * per_buffer) * g.head_page_bytes,
                      slots + static_cast<size_t>(ops[i].slot) * g.nhd_page_bytes, ops[i].head);
  };
  if (chunks == 0) return;
  fill(0);
  for (size_t c = 1; c < chunks; ++c) {
    // Buffer c % 2 fills while buffer (c - 1) % 2 is scattered; the sections end together, so a
    // buffer is never refilled before its scatter is done.
#pragma omp parallel sections num_threads(2)
    {
#pragma omp section
      fill(c);
#pragma omp section
      scatter(c - 1);
    }
  }
  scatter(chunks - 1);
}

}  // namespace freekv::cpu
