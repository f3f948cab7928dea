// Residency of the device tier, on the device.
//
// Device tier of one (session, layer), NHD slots:
//   sink slots     [sink_base, sink_base + sink_pages): page p < sink_pages lives in slot p;
//   window slots   [window_base, window_base + window_pages): a ring, page p in slot p % window_pages
//                  while it is in the window (the partial page plus window_pages - 1 full pages);
//   selected slots [selected_base, selected_base + R): per KV head, the selected middle pages
//                  and (R > k, FREEKV_RESIDENT_FACTOR) pages selected before; resident[h][j] is
//                  the page whose head-h K/V is in selected slot j (-1: none).
//
// ResidencyDiff: given the new selection per KV head, reuses slots already holding a selected
// page (hits), assigns each miss a slot whose page is not selected, in the eviction order of
// engine/ResidentPool.h (with R = k every page no longer selected leaves; with more slots the page
// chosen longest ago), and appends a recall job per miss. Nothing leaves the device.
//
// AttendTable: the attention table of a step (sink + selected + window, or every page in dense
// mode) with each page's slot, valid tokens and page id. A layer that keeps every page (page p in
// slot p) but attends a selection is `in_place`: no residency diff, no recall.
#pragma once
#include <cuda_runtime.h>

#include "recall.cuh"

namespace freekv::cuda {

struct ResidencyParams {
  const int* selected = nullptr;  // [kv_heads][k] pages, -1 = none
  int* resident = nullptr;        // [kv_heads][slots] updated in place
  int* age = nullptr;             // optional [kv_heads][slots]: selections since last chosen, updated in place
  int* selected_slot = nullptr;   // [kv_heads][k] out: slot (selected_base + j) of each selected page, -1 = none
  RecallJob* jobs = nullptr;      // out: one per miss (capacity kv_heads * k)
  int* job_count = nullptr;       // out: number of jobs (zeroed by the launcher first)
  int kv_heads = 0, k = 0, selected_base = 0;
  int slots = 0;                  // R, the selected slots per head (0: k)
  const int* head_mask = nullptr;           // optional [kv_heads]: only heads with mask != 0
  unsigned long long* counters = nullptr;   // optional [3]: += selected pages, hits, misses
  // Optional, the recall in the same launch (batched diffs only; every item or none): each block
  // copies its head's misses itself once its diff is done, from `src` (the store layer's HND pages,
  // device-mapped host memory, pages src_page_stride bytes apart) into the NHD `pool`, as
  // LaunchRecallGather would from the job list (still written). Null: no copy.
  const uint8_t* src = nullptr;
  size_t src_page_stride = 0;
  __nv_bfloat16* pool = nullptr;
  int head_dim = 0, page_size = 0;
};

void LaunchResidencyDiff(const ResidencyParams& p, cudaStream_t stream);

// `count` diffs in one launch (grid kv_heads x count); items: device array, host_items: the same
// on the host (checks). Same resident/selected_slot/counter results as LaunchResidencyDiff, but
// the job list is kept per head: head h's jobs at jobs[h * k ..], their number in job_count[h]
// (job_count is [kv_heads] here). With `pool` set (every item) the recall runs in the same
// launch, one block per (item, head) copying its misses.
void LaunchResidencyDiffBatch(const ResidencyParams* items, const ResidencyParams* host_items, int count,
                              cudaStream_t stream);

struct AttendTableParams {
  int context = 0;  // tokens after this step's append
  int page_size = 0, sink_pages = 0, window_pages = 0;
  int kv_heads = 0;
  bool dense = false;  // every page p in slot p
  // Not dense, but every page p in slot p (a layer that keeps all its pages: resident_sparse):
  // the selected and window pages are read where they are (selected_slot is not read).
  bool in_place = false;
  int window_base = 0, selected_base = 0;
  const int* selected = nullptr;       // [kv_heads][k] or null when k == 0
  const int* selected_slot = nullptr;  // [kv_heads][k] (unless in_place)
  int k = 0;
  int max_pages = 0;                   // row length of the outputs
  int* page_slot = nullptr;            // [kv_heads][max_pages]
  int* page_tokens = nullptr;          // [kv_heads][max_pages]
  int* page_id = nullptr;              // [kv_heads][max_pages]
  int* num_pages = nullptr;            // [kv_heads]
  // Top-k overlap (engine/RetrievalStats.h), optional: prev_selected [kv_heads][k] holds the
  // selection read at the previous decode and is replaced by `selected`; with `overlap`, first
  // overlap[0] += |selected & prev_selected| and overlap[1] += |selected| per head.
  int* prev_selected = nullptr;
  unsigned long long* overlap = nullptr;
  // Optional, in_place only: hits[0] += |selected| and hits[1] += |selected| per head (the layer's
  // selected and hit pages: kept pages are all hits, and no residency diff counts them).
  unsigned long long* hits = nullptr;
};

// Rows needed by the attention table: sink + k + window pages, or every page when dense.
int AttendTableRows(int context, int page_size, int sink_pages, int window_pages, int k, bool dense);

void LaunchAttendTable(const AttendTableParams& p, cudaStream_t stream);

// `count` tables in one launch (grid kv_heads x count); items: device array, host_items: the same on
// the host (checks).
void LaunchAttendTableBatch(const AttendTableParams* items, const AttendTableParams* host_items, int count,
                            cudaStream_t stream);

}  // namespace freekv::cuda
