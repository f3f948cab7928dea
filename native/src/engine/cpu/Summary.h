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

// SummarisePage's output for one page: [Hkv][2 (hi, lo)][D] bf16.
inline size_t SummaryFloatsPerPage(const PageGeometry& g) { return static_cast<size_t>(g.Hkv) * 2 * g.D; }

// A layer keeps its summaries head-major: per KV head [page][2 (hi, lo)][D] bf16, one row of
// SummaryRow elements per page, so the selection's scan over one head's pages reads one
// contiguous stream. (Page-major rows put a head's consecutive pages Hkv x 512 bytes apart, a new
// 4 KiB page each at 8 KV heads of 128: the hardware prefetcher does not cross them and every
// page costs a TLB miss. The scan of 2048 cold pages took 624 us strided against 223 us
// contiguous, tools/dev/hier-select-bench.cpp.)
inline size_t SummaryRow(const PageGeometry& g) { return static_cast<size_t>(2) * g.D; }

// Summarises the full NHD page `page` into out[Hkv][2][D].
void SummarisePage(const PageGeometry& g, SummaryKind kind, const uint8_t* nhd_page, uint16_t* out);

}  // namespace freekv::cpu
