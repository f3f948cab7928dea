#include <climits>
#include <string>

#include "cuda/cuda_check.cuh"
#include "residency.cuh"

#include "engine/ResidentPool.h"
#include "engine/Retrieval.h"

namespace freekv::cuda {
namespace {

constexpr int kMaxK = 1024;
constexpr int kMaxSlots = kMaxResidentSlots;

constexpr int kResidencyThreads = 128;  // a multiple of 32 (the miss scan works warp by warp)
// With the recall fused in: more threads, so that a block keeps enough 16-byte reads in flight
// over PCIe (512 x kFusedUnroll x 16 B = 32 KiB a block).
constexpr int kFusedResidencyThreads = 512;
constexpr int kFusedUnroll = 4;

// One block per KV head, every phase spread over the block's threads (no thread walks the
// selection alone): a hit is a slot whose page the selection lists, each thread testing its slots
// against the selection; the misses are numbered in selection order by a block-wide scan; the slots
// not kept are ranked by their ResidentVictimKey (engine/ResidentPool.h: with extra slots empty
// first, then the page chosen longest ago, then the lowest page; without, the lowest slot) by
// counting smaller keys, and miss m takes the slot of rank m. The pages kept, the slots the misses
// land in and the job order are those of the rule applied miss by miss in selection order, as the
// CPU engine does (cpu/Residency.cpp); the GPU engine cases compare the two exactly. A group
// whose selection has no miss skips the ranking.
// Selected entries are k, slots R = p.slots (>= k). Batched (item blockIdx.y of `items`): head h
// writes its jobs to jobs[h * k ..] and their number to job_count[h] (0 for a masked head), so no
// count needs zeroing before the launch. With p.pool set, the block then copies its misses' head-pages
// (the recall fused in: no job list read back, no second launch).
template <bool kBatch, int kThreads>
__global__ void __launch_bounds__(kThreads) ResidencyKernel(const ResidencyParams p0, const ResidencyParams* items) {
  const ResidencyParams p = kBatch ? items[blockIdx.y] : p0;
  const int h = blockIdx.x;
  if (p.head_mask && p.head_mask[h] == 0) {
    if (kBatch && threadIdx.x == 0) p.job_count[h] = 0;
    return;
  }
  __shared__ int sel[kMaxK], hit_slot[kMaxK], miss_rank[kMaxK];
  __shared__ int res[kMaxSlots], age[kMaxSlots], victim[kMaxSlots];
  __shared__ unsigned long long key[kMaxSlots];
  __shared__ unsigned char kept[kMaxSlots];
  __shared__ int warp_count[kThreads / 32];
  __shared__ int n_sel, n_hit, n_miss, job_base;
  const int k = p.k;
  const int R = p.slots > 0 ? p.slots : k;
  const bool extra = R > k;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) n_sel = 0, n_hit = 0, n_miss = 0;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    sel[j] = p.selected[(size_t)h * k + j];
    hit_slot[j] = INT_MAX;
    miss_rank[j] = -1;
  }
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    res[j] = p.resident[(size_t)h * R + j];
    age[j] = extra && p.age ? p.age[(size_t)h * R + j] : 0;
    kept[j] = 0;
  }
  __syncthreads();
  // Hits: entry i's slot is the lowest that holds its page.
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    const int page = res[j];
    if (page < 0) continue;
    for (int i = 0; i < k; ++i)
      if (sel[i] == page) atomicMin(&hit_slot[i], j);
  }
  __syncthreads();
  int my_sel = 0, my_hit = 0;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    if (hit_slot[i] == INT_MAX || sel[i] < 0) hit_slot[i] = -1;
    if (sel[i] >= 0) ++my_sel;
    if (hit_slot[i] >= 0) ++my_hit, kept[hit_slot[i]] = 1;
  }
  if (my_sel) atomicAdd(&n_sel, my_sel);
  if (my_hit) atomicAdd(&n_hit, my_hit);
  __syncthreads();
  // Misses (selected, not resident) numbered in selection order: a scan, blockDim entries at a time.
  for (int c = 0; c < k; c += blockDim.x) {
    const int i = c + threadIdx.x;
    const bool is_miss = i < k && sel[i] >= 0 && hit_slot[i] < 0;
    const unsigned bits = __ballot_sync(0xffffffffu, is_miss);
    if (lane == 0) warp_count[warp] = __popc(bits);
    __syncthreads();
    int before = n_miss;
    for (int w = 0; w < warp; ++w) before += warp_count[w];
    if (is_miss) miss_rank[i] = before + __popc(bits & ((1u << lane) - 1u));
    __syncthreads();
    if (threadIdx.x == 0)
      for (int w = 0; w < (int)(blockDim.x >> 5); ++w) n_miss += warp_count[w];
    __syncthreads();
  }
  const int nmiss = n_miss;
  if (nmiss > 0) {
    // The slots not kept, in the order misses take them: victim[r] is the slot of rank r.
    for (int j = threadIdx.x; j < R; j += blockDim.x)
      key[j] = kept[j] ? ~0ull : ResidentVictimKey(res[j], age[j], j, extra);
    __syncthreads();
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      const unsigned long long mine = key[j];
      if (mine == ~0ull) continue;
      int rank = 0;
      for (int o = 0; o < R; ++o) rank += key[o] < mine ? 1 : 0;
      if (rank < nmiss) victim[rank] = j;
    }
    __syncthreads();
    // Miss m takes victim[m] (#misses <= #slots not kept, as R >= k).
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      if (miss_rank[i] < 0) continue;
      const int j = victim[miss_rank[i]];
      kept[j] = 1;
      res[j] = sel[i];
      hit_slot[i] = j;
    }
  }
  if (threadIdx.x == 0) {
    if (kBatch) {
      job_base = h * k;
      p.job_count[h] = nmiss;
    } else {
      job_base = nmiss ? atomicAdd(p.job_count, nmiss) : 0;
    }
    if (p.counters) {
      atomicAdd(&p.counters[0], (unsigned long long)n_sel);
      atomicAdd(&p.counters[1], (unsigned long long)n_hit);
      atomicAdd(&p.counters[2], (unsigned long long)nmiss);
    }
  }
  __syncthreads();
  // The jobs in miss order, each entry's slot, and the pool's pages and ages. (victim[] is free
  // again: it now maps a miss to its entry for the fused recall.)
  const int base = job_base;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    if (miss_rank[i] >= 0) {
      victim[miss_rank[i]] = i;
      RecallJob jb;
      jb.page = sel[i];
      jb.head = h;
      jb.slot = p.selected_base + hit_slot[i];
      jb.pad = 0;
      p.jobs[base + miss_rank[i]] = jb;
    }
    p.selected_slot[(size_t)h * k + i] = sel[i] >= 0 ? p.selected_base + hit_slot[i] : -1;
  }
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    p.resident[(size_t)h * R + j] = res[j];
    if (extra && p.age) p.age[(size_t)h * R + j] = ResidentAgeAfter(res[j], age[j], kept[j] != 0);
  }
  if (!p.pool || nmiss == 0) return;
  __syncthreads();
  // The recall: every 16-byte vector of the misses' head-pages, kFusedUnroll loads in flight per
  // thread before their stores (the gather kernel's loop, for one head).
  const int D = p.head_dim, P = p.page_size;
  const int vpj = 2 * P * D / kRecallVec;
  const size_t hp_bytes = (size_t)vpj * 16;
  const int total = nmiss * vpj;
  const uint8_t* src = p.src + (size_t)h * hp_bytes;
  for (int x0 = threadIdx.x; x0 < total; x0 += blockDim.x * kFusedUnroll) {
    uint4 v[kFusedUnroll];
    int dst_slot[kFusedUnroll];
#pragma unroll
    for (int u = 0; u < kFusedUnroll; ++u) {
      const int x = x0 + u * blockDim.x;
      if (x < total) {
        const int i = victim[x / vpj];
        dst_slot[u] = p.selected_base + hit_slot[i];
        v[u] = *reinterpret_cast<const uint4*>(src + (size_t)sel[i] * p.src_page_stride + (size_t)(x % vpj) * 16);
      }
    }
#pragma unroll
    for (int u = 0; u < kFusedUnroll; ++u) {
      const int x = x0 + u * blockDim.x;
      if (x < total)
        *reinterpret_cast<uint4*>(p.pool + RecallNhdOffset(dst_slot[u], h, x % vpj, p.kv_heads, D, P)) = v[u];
    }
  }
}

// One block per KV head. Rows: sink pages, then selected pages, then window pages. Batched: table
// blockIdx.y of `items`.
template <bool kBatch>
__global__ void AttendTableKernel(const AttendTableParams p0, const AttendTableParams* items) {
  const AttendTableParams p = kBatch ? items[blockIdx.y] : p0;
  const int h = blockIdx.x;
  const int P = p.page_size;
  const int npages = (p.context + P - 1) / P;  // pages holding tokens, the partial one included
  const int nfull = p.context / P;
  int* slot = p.page_slot + (size_t)h * p.max_pages;
  int* toks = p.page_tokens + (size_t)h * p.max_pages;
  int* ids = p.page_id + (size_t)h * p.max_pages;
  auto tokens_of = [&](int pg) { return min(P, p.context - pg * P); };
  if (p.dense) {
    for (int pg = threadIdx.x; pg < npages && pg < p.max_pages; pg += blockDim.x) {
      slot[pg] = pg;
      toks[pg] = tokens_of(pg);
      ids[pg] = pg;
    }
    if (threadIdx.x == 0) p.num_pages[h] = min(npages, p.max_pages);
    return;
  }
  const int nsink = min(p.sink_pages, npages);
  const int wfirst = max(p.sink_pages, nfull - (p.window_pages - 1));
  const int nwin = max(0, npages - wfirst);
  for (int pg = threadIdx.x; pg < nsink; pg += blockDim.x) {
    slot[pg] = pg;
    toks[pg] = tokens_of(pg);
    ids[pg] = pg;
  }
  // The selected pages (entries >= 0) in selection order, numbered by a block-wide scan,
  // blockDim entries at a time (one thread walking the selection with its dependent loads and
  // stores took 2.4 us more a launch on an H100: 9.9 against 7.5 us, PERF.md).
  __shared__ int nsel, common, placed;
  __shared__ int warp_count[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) placed = 0, common = 0;
  __syncthreads();
  for (int c = 0; c < p.k; c += blockDim.x) {
    const int i = c + threadIdx.x;
    const int pg = i < p.k ? p.selected[(size_t)h * p.k + i] : -1;
    const unsigned bits = __ballot_sync(0xffffffffu, pg >= 0);
    if (lane == 0) warp_count[warp] = __popc(bits);
    __syncthreads();
    if (pg >= 0) {
      int r = nsink + placed + __popc(bits & ((1u << lane) - 1u));
      for (int w = 0; w < warp; ++w) r += warp_count[w];
      slot[r] = p.in_place ? pg : p.selected_slot[(size_t)h * p.k + i];
      toks[r] = P;
      ids[r] = pg;
    }
    __syncthreads();
    if (threadIdx.x == 0)
      for (int w = 0; w < (int)(blockDim.x >> 5); ++w) placed += warp_count[w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    nsel = placed;
    if (p.hits && placed > 0) {
      atomicAdd(&p.hits[0], (unsigned long long)placed);
      atomicAdd(&p.hits[1], (unsigned long long)placed);
    }
  }
  __syncthreads();
  if (p.prev_selected && p.k > 0) {
    const int* cur = p.selected + (size_t)h * p.k;
    int* prev = p.prev_selected + (size_t)h * p.k;
    if (p.overlap) {
      // The previous selection staged in shared memory first: each thread compares its entries
      // with all of it (from global memory, k loads a thread: 0.8 us more a launch on an H100).
      __shared__ int prev_s[kMaxK];
      for (int j = threadIdx.x; j < p.k; j += blockDim.x) prev_s[j] = prev[j];
      __syncthreads();
      for (int i = threadIdx.x; i < p.k; i += blockDim.x) {
        const int pg = cur[i];
        if (pg < 0) continue;
        for (int j = 0; j < p.k; ++j)
          if (prev_s[j] == pg) {
            atomicAdd(&common, 1);
            break;
          }
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        atomicAdd(&p.overlap[0], (unsigned long long)common);
        atomicAdd(&p.overlap[1], (unsigned long long)nsel);
      }
    }
    for (int i = threadIdx.x; i < p.k; i += blockDim.x) prev[i] = cur[i];
  }
  const int r0 = nsink + nsel;
  for (int w = threadIdx.x; w < nwin; w += blockDim.x) {
    const int pg = wfirst + w;
    slot[r0 + w] = p.in_place ? pg : p.window_base + pg % p.window_pages;
    toks[r0 + w] = tokens_of(pg);
    ids[r0 + w] = pg;
  }
  if (threadIdx.x == 0) p.num_pages[h] = r0 + nwin;
}

}  // namespace

namespace {
void CheckResidency(const ResidencyParams& p) {
  Require(p.kv_heads > 0 && p.k > 0 && p.k <= kMaxK, "residency: k must be in [1, 1024]");
  Require(p.slots == 0 || (p.slots >= p.k && p.slots <= kMaxSlots), "residency: slots must be 0 or in [k, 1024]");
  Require(p.selected && p.resident && p.selected_slot && p.jobs && p.job_count, "residency: a device pointer is null");
  Require(!p.pool || (p.src && p.head_dim > 0 && p.head_dim % kRecallVec == 0 && p.page_size > 0 &&
                      p.src_page_stride >= (size_t)p.kv_heads * 2 * p.page_size * p.head_dim * sizeof(__nv_bfloat16)),
          "residency: a fused recall needs src, head_dim (a multiple of 8), page_size and the store's page stride");
}
void CheckAttendTable(const AttendTableParams& p) {
  Require(p.page_size > 0 && p.kv_heads > 0 && p.max_pages > 0, "attend table: bad geometry");
  Require(p.k >= 0 && p.k <= kMaxK, "attend table: k must be in [0, 1024]");
  Require(p.dense || p.window_pages >= 1, "attend table: window_pages must be >= 1");
  Require(p.page_slot && p.page_tokens && p.page_id && p.num_pages, "attend table: a device pointer is null");
  Require(p.k == 0 || (p.selected && (p.in_place || p.selected_slot)), "attend table: selected arrays are null");
  Require(!p.hits || p.in_place, "attend table: hits are counted for an in-place table only");
  Require(p.dense || p.sink_pages + p.k + p.window_pages <= p.max_pages, "attend table: max_pages too small");
}
}  // namespace

void LaunchResidencyDiff(const ResidencyParams& p, cudaStream_t stream) {
  CheckResidency(p);
  Require(!p.pool, "residency: the recall is fused only into batched diffs");
  FKV_CUDA_CHECK(cudaMemsetAsync(p.job_count, 0, sizeof(int), stream));
  ResidencyKernel<false, kResidencyThreads><<<p.kv_heads, kResidencyThreads, 0, stream>>>(p, nullptr);
  FKV_CUDA_CHECK_LAUNCH("ResidencyKernel");
}

void LaunchResidencyDiffBatch(const ResidencyParams* items, const ResidencyParams* host_items, int count,
                              cudaStream_t stream) {
  if (count == 0) return;
  Require(count > 0 && count <= 65535 && items && host_items, "residency batch: count must be in [1, 65535]");
  for (int i = 0; i < count; ++i) {
    CheckResidency(host_items[i]);
    Require(host_items[i].kv_heads == host_items[0].kv_heads, "residency batch: the items' kv_heads differ");
    Require((host_items[i].pool != nullptr) == (host_items[0].pool != nullptr),
            "residency batch: the recall is fused for every item or for none");
  }
  const dim3 grid(host_items[0].kv_heads, count);
  if (host_items[0].pool) {
    ResidencyKernel<true, kFusedResidencyThreads><<<grid, kFusedResidencyThreads, 0, stream>>>(host_items[0], items);
    FKV_CUDA_CHECK_LAUNCH("ResidencyKernel(batch, recall)");
  } else {
    ResidencyKernel<true, kResidencyThreads><<<grid, kResidencyThreads, 0, stream>>>(host_items[0], items);
    FKV_CUDA_CHECK_LAUNCH("ResidencyKernel(batch)");
  }
}

int AttendTableRows(int context, int page_size, int sink_pages, int window_pages, int k, bool dense) {
  const int npages = (context + page_size - 1) / page_size;
  if (dense) return npages;
  return sink_pages + k + window_pages;
}

void LaunchAttendTable(const AttendTableParams& p, cudaStream_t stream) {
  CheckAttendTable(p);
  AttendTableKernel<false><<<p.kv_heads, 128, 0, stream>>>(p, nullptr);
  FKV_CUDA_CHECK_LAUNCH("AttendTableKernel");
}

void LaunchAttendTableBatch(const AttendTableParams* items, const AttendTableParams* host_items, int count,
                            cudaStream_t stream) {
  if (count == 0) return;
  Require(count > 0 && count <= 65535 && items && host_items, "attend table batch: count must be in [1, 65535]");
  for (int i = 0; i < count; ++i) {
    CheckAttendTable(host_items[i]);
    Require(host_items[i].kv_heads == host_items[0].kv_heads, "attend table batch: the items' kv_heads differ");
  }
  AttendTableKernel<true><<<dim3(host_items[0].kv_heads, count), 128, 0, stream>>>(host_items[0], items);
  FKV_CUDA_CHECK_LAUNCH("AttendTableKernel(batch)");
}

}  // namespace freekv::cuda
