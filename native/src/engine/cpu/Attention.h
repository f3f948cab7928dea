// Attention on the CPU backend: softmax(q.k / sqrt(D)) v with float32 accumulation.
//   Decode: one KV head's query group over a list of NHD pages (sink, selected, window; or every
//   page of a dense layer), visited in page order, so that a budget covering the whole context
//   computes exactly what dense attention computes.
//   Prefill: exact causal attention of a chunk of queries over contiguous per-head K/V rows.
#pragma once

#include <vector>

#include "engine/cpu/PageGeometry.h"

namespace freekv::cpu {

struct AttendedPage {
  int page;              // page index in the context
  const uint8_t* base;   // the NHD page
  int tokens;            // valid tokens (P for a full page)
};

// q, out: the group's query heads, [group][D] (query heads h*group .. h*group+group-1).
void AttendDecodeGroup(const PageGeometry& g, int h, const float* q, const std::vector<AttendedPage>& pages, float* out);

// Causal attention for n queries at positions start..start+n-1 of the G query heads of one KV head
// (q rows: [G][D] at stride q_stride floats per query; out likewise) over K, V rows [start+n][D]
// (float). Each key/value row is read once for the whole group and (blocked: the n rows against
// tiles of keys, online softmax) once for all n rows while its tile is in cache.
void AttendPrefillGroup(int D, int G, const float* k, const float* v, int start, int n, const float* q, size_t q_stride,
                        float* out, size_t out_stride);

}  // namespace freekv::cpu
