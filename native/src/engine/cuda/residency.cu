#include <string>

#include "cuda/cuda_check.cuh"
#include "residency.cuh"

#include "engine/ResidentPool.h"
#include "engine/Retrieval.h"

namespace freekv::cuda {
namespace {

constexpr int kMaxK = 1024;
constexpr int kMaxSlots = kMaxResidentSlots;

// One block per KV head: threads test selected entries against the resident set in parallel;
// thread 0 hands the misses the slots not kept, in order of slot without extra slots (R == k),
// else in the eviction order of engine/ResidentPool.h, which the threads rank first. Selected
// entries are k, slots R = p.slots (>= k).
// Batched (item blockIdx.y of `items`): head h writes its jobs to jobs[h * k ..] and their number
// to job_count[h] (0 for a masked head), so no count needs zeroing before the launch.
template <bool kBatch>
__global__ void ResidencyKernel(const ResidencyParams p0, const ResidencyParams* items) {
  const ResidencyParams p = kBatch ? items[blockIdx.y] : p0;
  const int h = blockIdx.x;
  if (p.head_mask && p.head_mask[h] == 0) {
    if (kBatch && threadIdx.x == 0) p.job_count[h] = 0;
    return;
  }
  __shared__ int sel[kMaxK], hit_slot[kMaxK], miss[kMaxK];
  __shared__ int res[kMaxSlots], age[kMaxSlots], victim[kMaxSlots];
  __shared__ unsigned char kept[kMaxSlots];
  const int k = p.k;
  const int R = p.slots > 0 ? p.slots : k;
  const bool extra = R > k;
  for (int j = threadIdx.x; j < k; j += blockDim.x) sel[j] = p.selected[(size_t)h * k + j];
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    res[j] = p.resident[(size_t)h * R + j];
    if (extra) age[j] = p.age ? p.age[(size_t)h * R + j] : 0;
    kept[j] = 0;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    int s = -1;
    if (sel[i] >= 0)
      for (int j = 0; j < R; ++j)
        if (res[j] == sel[i]) {
          s = j;
          break;
        }
    hit_slot[i] = s;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < k; i += blockDim.x)
    if (hit_slot[i] >= 0) kept[hit_slot[i]] = 1;
  __syncthreads();
  // With extra slots, the slots not kept in eviction order: victim[r] is the slot of rank r.
  // Without, the order is the slot index, which thread 0's scan below finds (the kernel's path
  // before the option, unchanged: no ages are read or kept).
  if (extra) {
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      if (kept[j]) continue;
      int rank = 0;
      for (int o = 0; o < R; ++o)
        if (!kept[o] && ResidentVictimBefore(res[o], age[o], o, res[j], age[j], j, true)) ++rank;
      victim[rank] = j;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    int next = 0, free_j = 0, nsel = 0, nhit = 0, nmiss = 0;
    for (int i = 0; i < k; ++i) {
      if (sel[i] < 0) continue;
      ++nsel;
      if (hit_slot[i] >= 0) {
        ++nhit;
        continue;
      }
      // A free slot exists: #misses <= #slots not kept.
      if (!extra)
        while (kept[free_j]) ++free_j;
      const int j = extra ? victim[next++] : free_j;
      kept[j] = 1;
      res[j] = sel[i];
      hit_slot[i] = j;
      miss[nmiss++] = i;
    }
    int base;
    if (kBatch) {
      base = h * k;
      p.job_count[h] = nmiss;
    } else {
      base = nmiss ? atomicAdd(p.job_count, nmiss) : 0;
    }
    for (int m = 0; m < nmiss; ++m) {
      RecallJob jb;
      jb.page = sel[miss[m]];
      jb.head = h;
      jb.slot = p.selected_base + hit_slot[miss[m]];
      jb.pad = 0;
      p.jobs[base + m] = jb;
    }
    if (p.counters) {
      atomicAdd(&p.counters[0], (unsigned long long)nsel);
      atomicAdd(&p.counters[1], (unsigned long long)nhit);
      atomicAdd(&p.counters[2], (unsigned long long)nmiss);
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < R; j += blockDim.x) {
    p.resident[(size_t)h * R + j] = res[j];
    if (extra && p.age) p.age[(size_t)h * R + j] = ResidentAgeAfter(res[j], age[j], kept[j] != 0);
  }
  for (int j = threadIdx.x; j < k; j += blockDim.x)
    p.selected_slot[(size_t)h * k + j] = sel[j] >= 0 ? p.selected_base + hit_slot[j] : -1;
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
  __shared__ int nsel, common;
  if (threadIdx.x == 0) {
    int r = nsink;
    for (int i = 0; i < p.k; ++i) {
      const int pg = p.selected[(size_t)h * p.k + i];
      if (pg < 0) continue;
      slot[r] = p.in_place ? pg : p.selected_slot[(size_t)h * p.k + i];
      toks[r] = P;
      ids[r] = pg;
      ++r;
    }
    nsel = r - nsink;
    common = 0;
    if (p.hits && r > nsink) {
      atomicAdd(&p.hits[0], (unsigned long long)(r - nsink));
      atomicAdd(&p.hits[1], (unsigned long long)(r - nsink));
    }
  }
  __syncthreads();
  if (p.prev_selected && p.k > 0) {
    const int* cur = p.selected + (size_t)h * p.k;
    int* prev = p.prev_selected + (size_t)h * p.k;
    if (p.overlap) {
      for (int i = threadIdx.x; i < p.k; i += blockDim.x) {
        const int pg = cur[i];
        if (pg < 0) continue;
        for (int j = 0; j < p.k; ++j)
          if (prev[j] == pg) {
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
}
void CheckAttendTable(const AttendTableParams& p) {
  Require(p.page_size > 0 && p.kv_heads > 0 && p.max_pages > 0, "attend table: bad geometry");
  Require(p.dense || p.window_pages >= 1, "attend table: window_pages must be >= 1");
  Require(p.page_slot && p.page_tokens && p.page_id && p.num_pages, "attend table: a device pointer is null");
  Require(p.k == 0 || (p.selected && (p.in_place || p.selected_slot)), "attend table: selected arrays are null");
  Require(!p.hits || p.in_place, "attend table: hits are counted for an in-place table only");
  Require(p.dense || p.sink_pages + p.k + p.window_pages <= p.max_pages, "attend table: max_pages too small");
}
}  // namespace

void LaunchResidencyDiff(const ResidencyParams& p, cudaStream_t stream) {
  CheckResidency(p);
  FKV_CUDA_CHECK(cudaMemsetAsync(p.job_count, 0, sizeof(int), stream));
  ResidencyKernel<false><<<p.kv_heads, 128, 0, stream>>>(p, nullptr);
  FKV_CUDA_CHECK_LAUNCH("ResidencyKernel");
}

void LaunchResidencyDiffBatch(const ResidencyParams* items, const ResidencyParams* host_items, int count,
                              cudaStream_t stream) {
  if (count == 0) return;
  Require(count > 0 && count <= 65535 && items && host_items, "residency batch: count must be in [1, 65535]");
  for (int i = 0; i < count; ++i) {
    CheckResidency(host_items[i]);
    Require(host_items[i].kv_heads == host_items[0].kv_heads, "residency batch: the items' kv_heads differ");
  }
  ResidencyKernel<true><<<dim3(host_items[0].kv_heads, count), 128, 0, stream>>>(host_items[0], items);
  FKV_CUDA_CHECK_LAUNCH("ResidencyKernel(batch)");
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
