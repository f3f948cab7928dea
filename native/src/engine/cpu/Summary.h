// Page summaries: per (page, KV head) a per-channel upper and lower bound of the page's keys.
//   MaxMin (Quest): hi = max_i k_i, lo = min_i k_i per channel.
//   CuboidMean (ArkVale): center c = (max + min) / 2, radius r = mean_i |k_i - c|; stored as
//   hi = c + r, lo = c - r, so one scoring rule serves both (sum_j max(q_j hi_j, q_j lo_j)
//   = q.c + |q|.r for the cuboid).
// Summaries are computed from the stored (dtype-rounded) keys of a full NHD page and kept as
// bf16 (as Quest keeps its metadata in half precision), hi rounded up and lo rounded down so they
// remain bounds: scoring every page each step reads the summaries of the whole context, and on
// the CPU that read is memory-bound, so half the bytes is half the time.
#pragma once

#include <vector>

#include "engine/cpu/PageGeometry.h"

namespace freekv::cpu {

// Layout of one layer's summaries: [page][Hkv][2 (hi, lo)][D] bf16.
inline size_t SummaryFloatsPerPage(const PageGeometry& g) { return static_cast<size_t>(g.Hkv) * 2 * g.D; }

// Summarises the full NHD page `page` into out[Hkv][2][D].
void SummarisePage(const PageGeometry& g, SummaryKind kind, const uint8_t* nhd_page, uint16_t* out);

}  // namespace freekv::cpu
