// Offload: every page that fills is converted NHD -> HND and written to the host store, so the
// store always holds the whole context but the partial last page; that partial page is written
// through, token by token, to the session's tail area, so a restarted process loses nothing.
#pragma once

#include <cstdint>

#include "engine/cpu/PageGeometry.h"

namespace freekv::cpu {

// Writes the full NHD page into the store as HND (store_page: the page's place in the store).
void OffloadPage(const PageGeometry& g, const uint8_t* nhd_page, uint8_t* store_page);

// Reads an HND store page back as NHD (re-attach).
void LoadStorePage(const PageGeometry& g, const uint8_t* store_page, uint8_t* nhd_page, int tokens);

// Tail area of one layer: NHD rows [P][2 (K,V)][Hkv][D]. Row i of the partial page.
inline size_t TailRowBytes(const PageGeometry& g) { return 2ull * g.Hkv * g.row_bytes; }
void WriteTailRow(const PageGeometry& g, uint8_t* tail_layer, int i, const uint8_t* nhd_page);
void ReadTailRows(const PageGeometry& g, const uint8_t* tail_layer, int rows, uint8_t* nhd_page);

}  // namespace freekv::cpu
