// Recall: brings selected head-pages back from the host store (HND) into the device tier's
// selected slots (NHD), converting the layout on the way.
//   Gather: each head-page is copied straight from the store into its slot's rows.
//   DoubleBuffer (the paper's streamed recall): head-pages are copied whole (one contiguous block
//   each) into one of the two staging buffers of the session's staging segment while the other
//   buffer, filled before, is scattered HND -> NHD into the slots; then the roles swap.
// The staging buffers belong to the session: callers hold the session's staging mutex, so a
// synchronous correction recall and a background speculative recall never share them.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/cpu/PageGeometry.h"

namespace freekv::cpu {

struct RecallOp {
  int head;
  int page;
  int slot;
};

// store_layer: the layer's first HND page in the store; slots: the layer's NHD selected slots.
void RecallGather(const PageGeometry& g, const uint8_t* store_layer, uint8_t* slots, const std::vector<RecallOp>& ops);

// staging: the two buffers back to back, each `buffer_bytes` long.
void RecallDoubleBuffer(const PageGeometry& g, const uint8_t* store_layer, uint8_t* slots,
                        const std::vector<RecallOp>& ops, uint8_t* staging, size_t buffer_bytes);

}  // namespace freekv::cpu
