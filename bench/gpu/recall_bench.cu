// Section 2: recall GB/s per mode against the PCIe ceiling measured in section 1.
//
// The host store is what the kvstore gives the compute process: a shared mapping
// (mmap MAP_SHARED) registered with cudaHostRegister(cudaHostRegisterMapped), holding HND pages
// [kv_heads][2][P][D] bf16 of random bytes. A recall is a list of random (page, head) jobs, each
// one 16 KiB head-page, written to a distinct (slot, head) of an NHD device pool
// [slots][2][P][kv_heads][D]. Modes (native/src/engine/cuda/recall.cuh):
//   gather          LaunchRecallGather: a kernel on `blocks` SMs reading the mapped store
//   double_buffer   DoubleBufferRecall: one cudaMemcpyAsync per head-page into two staging
//                   buffers, each scattered while the other fills (the paper's method)
//   in_diff         the decode's own path: LaunchResidencyDiffBatch with the recall fused
//                   (residency.cuh, ResidencyParams::pool), batch 1, 4 and 16 of 8 KV heads
//                   selecting 32 pages each, two disjoint selections alternating so that every
//                   launch misses every page (the most a step can recall)
// Before timing, each mode recalls a job list into a poisoned pool and every byte of every
// recalled head-page is compared with the store; untouched slots must still hold the poison.
#include <sys/mman.h>

#include <cstring>
#include <numeric>
#include <random>

#include "bench.cuh"
#include "recall.cuh"
#include "residency.cuh"

namespace fkbench {
namespace fc = freekv::cuda;

namespace {
constexpr int kH = 8, kD = 128, kP = 32;
constexpr size_t kHeadPage = size_t(2) * kP * kD * 2;  // 16 KiB
constexpr size_t kPage = kHeadPage * kH;               // 128 KiB

std::vector<fc::RecallJob> RandomJobs(int n, int store_pages, int slots, uint64_t seed) {
  // distinct destinations (slot, head): job j -> slot j / kH' ... shuffled
  std::vector<int> dst(size_t(slots) * kH);
  std::iota(dst.begin(), dst.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(dst.begin(), dst.end(), rng);
  std::vector<fc::RecallJob> jobs(n);
  for (int j = 0; j < n; ++j) {
    jobs[j].page = int(rng() % store_pages);
    jobs[j].head = dst[j] % kH;
    jobs[j].slot = dst[j] / kH;
    jobs[j].pad = 0;
  }
  return jobs;
}

// Compares every recalled head-page in the pool with the store, and checks that (slot, head)
// pairs no job wrote still hold the poison byte. Returns the number of mismatching head-pages.
long CheckPool(const uint8_t* store, const std::vector<fc::RecallJob>& jobs, const std::vector<uint8_t>& pool,
               int slots, uint8_t poison) {
  std::vector<char> written(size_t(slots) * kH, 0);
  long bad = 0;
  const size_t row = size_t(kH) * kD * 2;  // one NHD token row (all heads)
  for (const auto& jb : jobs) {
    written[size_t(jb.slot) * kH + jb.head] = 1;
    const uint8_t* src = store + size_t(jb.page) * kPage + size_t(jb.head) * kHeadPage;
    bool ok = true;
    for (int kv = 0; kv < 2 && ok; ++kv)
      for (int t = 0; t < kP && ok; ++t) {
        const uint8_t* s = src + (size_t(kv) * kP + t) * kD * 2;
        const uint8_t* d = pool.data() + size_t(jb.slot) * kPage + (size_t(kv) * kP + t) * row + size_t(jb.head) * kD * 2;
        ok = std::memcmp(s, d, kD * 2) == 0;
      }
    bad += !ok;
  }
  for (int s = 0; s < slots; ++s)
    for (int h = 0; h < kH; ++h) {
      if (written[size_t(s) * kH + h]) continue;
      const uint8_t* d = pool.data() + size_t(s) * kPage + size_t(h) * kD * 2;
      for (int r = 0; r < 2 * kP; ++r)
        for (int b = 0; b < kD * 2; ++b)
          if (d[r * row + b] != poison) { ++bad; r = 2 * kP; break; }
    }
  return bad;
}
}  // namespace

void RunRecall(Bench& B) {
  cudaStream_t s = B.stream;
  const size_t store_bytes = size_t(B.quick ? 1 : 4) << 30;
  const int store_pages = int(store_bytes / kPage);
  const int slots = 2048;  // 256 MiB pool
  const int jobs_n = B.quick ? 4096 : 16384;  // 256 MiB per recall (64 MiB quick)

  double t0 = WallSeconds();
  // FKB_STORE_PAGES: how the store's host memory is mapped. "shared" (the default: a MAP_SHARED
  // mapping of 4 KiB pages, as the kvstore's /dev/shm segments are), "thp" (private anonymous
  // memory with madvise(MADV_HUGEPAGE): 2 MiB pages where the kernel's THP allows) or "hugetlb"
  // (MAP_HUGETLB: reserved 2 MiB pages, which need vm.nr_hugepages). Where an IOMMU translates the
  // GPU's reads page by page, the page size could set the SMs' read rate; on an H100 whose SMs
  // already read host memory at 51 GB/s all three gave the same rates to within 2%, and only the
  // fill was faster (bench/results/topics-gpu-20261206/1356-host-pages/). A machine whose SMs stop
  // near 30 GB/s is where it is still to be tried.
  const char* pages_env = std::getenv("FKB_STORE_PAGES");
  const std::string store_pages_mode = pages_env && *pages_env ? pages_env : "shared";
  int map_flags = MAP_SHARED | MAP_ANONYMOUS;
  if (store_pages_mode == "thp") map_flags = MAP_PRIVATE | MAP_ANONYMOUS;
  else if (store_pages_mode == "hugetlb") map_flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB;
  else if (store_pages_mode != "shared") throw std::runtime_error("FKB_STORE_PAGES must be shared, thp or hugetlb");
  void* map = mmap(nullptr, store_bytes, PROT_READ | PROT_WRITE, map_flags, -1, 0);
  if (map == MAP_FAILED) throw std::runtime_error("recall: mmap of the host store failed (FKB_STORE_PAGES=" + store_pages_mode + ")");
  if (store_pages_mode == "thp" && madvise(map, store_bytes, MADV_HUGEPAGE) != 0)
    throw std::runtime_error("recall: madvise(MADV_HUGEPAGE) failed");
  uint8_t* store = static_cast<uint8_t*>(map);
  FillHostBytes(store, store_bytes, 21);
  double t_fill = WallSeconds() - t0;
  // How much of the process's anonymous memory the kernel backs with huge pages now (kB).
  double anon_huge_kb = -1;
  if (FILE* f = std::fopen("/proc/self/smaps_rollup", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "AnonHugePages: %lf kB", &anon_huge_kb) == 1) break;
    std::fclose(f);
  }
  std::printf("[bench] recall store: %s pages, AnonHugePages %.0f kB\n", store_pages_mode.c_str(), anon_huge_kb);
  t0 = WallSeconds();
  CK(cudaHostRegister(store, store_bytes, cudaHostRegisterMapped));
  double t_reg = WallSeconds() - t0;
  uint8_t* store_dev = nullptr;
  CK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&store_dev), store, 0));

  bf16* pool;
  CK(cudaMalloc(&pool, size_t(slots) * kPage));
  fc::RecallJob* djobs;
  int* dcount;
  CK(cudaMalloc(&djobs, sizeof(fc::RecallJob) * slots * kH));
  CK(cudaMalloc(&dcount, sizeof(int)));
  fc::RecallGeometry g;
  g.kv_heads = kH;
  g.head_dim = kD;
  g.page_size = kP;
  g.src_page_stride = kPage;

  Json sec = Json::Obj(), modes = Json::Obj();
  sec.Set("store_pages", store_pages_mode).Set("anon_huge_pages_kB", anon_huge_kb);
  sec.Set("store_GiB", store_bytes / double(1 << 30)).Set("store_fill_s", t_fill).Set("cudaHostRegister_s", t_reg);
  sec.Set("head_page_bytes", double(kHeadPage)).Set("jobs_per_recall", jobs_n).Set("bytes_per_recall", double(jobs_n) * kHeadPage);

  std::vector<uint8_t> host_pool(size_t(slots) * kPage);
  auto check = [&](const char* mode, const std::function<void(const std::vector<fc::RecallJob>&)>& run) {
    auto jobs = RandomJobs(slots * kH / 2, store_pages, slots, 100 + std::strlen(mode));
    const uint8_t poison = 0xA5;
    CK(cudaMemsetAsync(pool, poison, size_t(slots) * kPage, s));
    run(jobs);
    CK(cudaStreamSynchronize(s));
    CK(cudaMemcpy(host_pool.data(), pool, host_pool.size(), cudaMemcpyDeviceToHost));
    long bad = CheckPool(store, jobs, host_pool, slots, poison);
    if (bad) throw std::runtime_error(std::string("recall ") + mode + ": " + std::to_string(bad) + " head-pages wrong");
    return jobs.size();
  };
  auto gather = [&](const std::vector<fc::RecallJob>& jobs, int blocks) {
    fc::LaunchRecallGather(store_dev, g, djobs, dcount, int(jobs.size()), pool, blocks, s);
  };
  auto upload = [&](const std::vector<fc::RecallJob>& jobs) {
    int n = int(jobs.size());
    CK(cudaMemcpyAsync(djobs, jobs.data(), sizeof(fc::RecallJob) * n, cudaMemcpyHostToDevice, s));
    CK(cudaMemcpyAsync(dcount, &n, sizeof n, cudaMemcpyHostToDevice, s));
    CK(cudaStreamSynchronize(s));
  };

  // --- gather
  size_t checked = check("gather", [&](const std::vector<fc::RecallJob>& jobs) { upload(jobs); gather(jobs, 8); });
  auto jobs = RandomJobs(jobs_n, store_pages, slots, 7);
  upload(jobs);
  Json sweep = Json::Obj();
  double best = 0;
  int best_blocks = 0;
  for (int blocks : {4, 8, 16, 32, 132}) {
    double ms = MedianMs(s, 2, 7, [&] { gather(jobs, blocks); });
    double gbs = jobs_n * double(kHeadPage) / ms / 1e6;
    sweep.Set(std::to_string(blocks) + "_blocks_GBps", gbs);
    if (blocks == 8 || gbs > best) {
      if (gbs > best) { best = gbs; best_blocks = blocks; }
    }
    if (blocks == 8) {
      B.AddRow({"recall", "gather, 8 blocks of 1024 (8 SMs)", "GB/s", gbs, B.pcie_gbs, "random 16 KiB head-pages -> NHD"});
    }
  }
  Json gm = Json::Obj();
  gm.Set("GBps", best).Set("best_blocks", best_blocks).Set("by_blocks", sweep).Set("checked_head_pages", double(checked));
  modes.Set("gather", gm);
  B.AddRow({"recall", "gather, best (" + std::to_string(best_blocks) + " blocks)", "GB/s", best, B.pcie_gbs, ""});

  // --- double buffer (the paper's method)
  {
    fc::DoubleBufferRecall db(kHeadPage, 64);
    checked = check("double_buffer", [&](const std::vector<fc::RecallJob>& j) { db.Run(store, g, j.data(), int(j.size()), pool, s); });
    const int n = B.quick ? 2048 : 8192;  // ~5 GB/s: keep a run near 25 ms
    double ms = MedianMs(s, 1, 5, [&] { db.Run(store, g, jobs.data(), n, pool, s); });
    double gbs = n * double(kHeadPage) / ms / 1e6;
    Json dm = Json::Obj();
    dm.Set("GBps", gbs).Set("jobs", n).Set("chunk", 64).Set("checked_head_pages", double(checked));
    modes.Set("double_buffer", dm);
    B.AddRow({"recall", "double buffer: memcpy per head-page + scatter", "GB/s", gbs, B.pcie_gbs, "paper's method"});
  }
  // --- in the residency diff: what the batched decode runs
  {
    constexpr int K = 32, kMaxItems = 16;
    const size_t per_item = size_t(kH) * K;
    bf16* pools;
    int *sel, *res, *sslot, *counts;
    fc::RecallJob* rjobs;
    CK(cudaMalloc(&pools, size_t(kMaxItems) * K * kPage));
    CK(cudaMalloc(&sel, sizeof(int) * 2 * kMaxItems * per_item));
    CK(cudaMalloc(&res, sizeof(int) * kMaxItems * per_item));
    CK(cudaMalloc(&sslot, sizeof(int) * kMaxItems * per_item));
    CK(cudaMalloc(&rjobs, sizeof(fc::RecallJob) * kMaxItems * per_item));
    CK(cudaMalloc(&counts, sizeof(int) * kMaxItems * kH));
    // Per (item, head): 2K distinct random pages, the first K selection A, the rest B.
    std::vector<int> hsel(2 * kMaxItems * per_item);
    std::mt19937_64 rng(31);
    std::vector<int> pages(store_pages);
    std::iota(pages.begin(), pages.end(), 0);
    for (int i = 0; i < kMaxItems; ++i)
      for (int h = 0; h < kH; ++h) {
        for (int j = 0; j < 2 * K; ++j) std::swap(pages[j], pages[j + rng() % (store_pages - j)]);
        for (int set = 0; set < 2; ++set)
          for (int j = 0; j < K; ++j) hsel[(size_t(set) * kMaxItems + i) * per_item + size_t(h) * K + j] = pages[set * K + j];
      }
    CK(cudaMemcpy(sel, hsel.data(), sizeof(int) * hsel.size(), cudaMemcpyHostToDevice));
    std::vector<fc::ResidencyParams> items[2];
    fc::ResidencyParams* ditems[2];
    for (int set = 0; set < 2; ++set) {
      items[set].resize(kMaxItems);
      for (int i = 0; i < kMaxItems; ++i) {
        fc::ResidencyParams& p = items[set][i];
        p.selected = sel + (size_t(set) * kMaxItems + i) * per_item;
        p.resident = res + i * per_item;
        p.slots = K;
        p.selected_slot = sslot + i * per_item;
        p.jobs = rjobs + i * per_item;
        p.job_count = counts + i * kH;
        p.kv_heads = kH;
        p.k = K;
        p.selected_base = 0;
        p.src = store_dev;
        p.src_page_stride = kPage;
        p.pool = pools + size_t(i) * K * (kPage / sizeof(bf16));
        p.head_dim = kD;
        p.page_size = kP;
      }
      CK(cudaMalloc(&ditems[set], sizeof(fc::ResidencyParams) * kMaxItems));
      CK(cudaMemcpy(ditems[set], items[set].data(), sizeof(fc::ResidencyParams) * kMaxItems, cudaMemcpyHostToDevice));
    }
    // Check: an empty pool poisoned, selection A for every item; each item's pool then holds, in
    // the slot the diff reports for each selected page, that page's head-page, and nothing else.
    const uint8_t poison = 0x5A;
    CK(cudaMemset(res, 0xff, sizeof(int) * kMaxItems * per_item));
    CK(cudaMemset(pools, poison, size_t(kMaxItems) * K * kPage));
    fc::LaunchResidencyDiffBatch(ditems[0], items[0].data(), kMaxItems, s);
    CK(cudaStreamSynchronize(s));
    std::vector<int> hslot(kMaxItems * per_item);
    CK(cudaMemcpy(hslot.data(), sslot, sizeof(int) * hslot.size(), cudaMemcpyDeviceToHost));
    std::vector<uint8_t> item_pool(size_t(K) * kPage);
    long bad = 0;
    for (int i = 0; i < kMaxItems; ++i) {
      std::vector<fc::RecallJob> done;
      for (int h = 0; h < kH; ++h)
        for (int j = 0; j < K; ++j)
          done.push_back(fc::RecallJob{hsel[size_t(i) * per_item + size_t(h) * K + j], h, hslot[size_t(i) * per_item + size_t(h) * K + j], 0});
      CK(cudaMemcpy(item_pool.data(), reinterpret_cast<const uint8_t*>(pools) + size_t(i) * K * kPage, item_pool.size(),
                    cudaMemcpyDeviceToHost));
      bad += CheckPool(store, done, item_pool, K, poison);
    }
    if (bad) throw std::runtime_error("recall in_diff: " + std::to_string(bad) + " head-pages wrong");
    Json dm = Json::Obj();
    dm.Set("checked_head_pages", double(kMaxItems * per_item)).Set("pages_per_head", K);
    // Every launch misses every page: A is resident after the check, so B, then A, ...
    int set = 1;
    for (int batch : {1, 2, 4, 8, 12, 16}) {
      const double ms = MedianMs(s, 2, 9, [&] {
        fc::LaunchResidencyDiffBatch(ditems[set], items[set].data(), batch, s);
        set ^= 1;
      });
      const double gbs = double(batch) * per_item * kHeadPage / ms / 1e6;
      dm.Set("batch_" + std::to_string(batch) + "_GBps", gbs).Set("batch_" + std::to_string(batch) + "_us", ms * 1e3);
      if (batch == 1 || batch == 4 || batch == 16)
        B.AddRow({"recall", "in the residency diff (decode), batch " + std::to_string(batch) + ": " +
                                std::to_string(batch * kH) + " blocks, " + std::to_string(batch * per_item) + " head-pages",
                  "GB/s", gbs, B.pcie_gbs, "every page a miss"});
    }
    // Batch 16 as four launches of 4 items on the stream (fewer blocks copying at once), and the
    // diff alone (no pool: the same misses numbered and written as jobs, nothing copied): where a
    // batch-16 launch loses against batch 4, these say whether the blocks' concurrency or the diff does.
    {
      const double ms = MedianMs(s, 2, 9, [&] {
        for (int q = 0; q < kMaxItems; q += 4) fc::LaunchResidencyDiffBatch(ditems[set] + q, items[set].data() + q, 4, s);
        set ^= 1;
      });
      const double gbs = double(kMaxItems) * per_item * kHeadPage / ms / 1e6;
      dm.Set("batch_16_as_4x4_GBps", gbs).Set("batch_16_as_4x4_us", ms * 1e3);
      B.AddRow({"recall", "in the residency diff, batch 16 as 4 launches of 4", "GB/s", gbs, B.pcie_gbs, "every page a miss"});
    }
    {
      std::vector<fc::ResidencyParams> bare[2];
      fc::ResidencyParams* dbare[2];
      for (int b = 0; b < 2; ++b) {
        bare[b] = items[b];
        for (auto& p : bare[b]) p.pool = nullptr;
        CK(cudaMalloc(&dbare[b], sizeof(fc::ResidencyParams) * kMaxItems));
        CK(cudaMemcpy(dbare[b], bare[b].data(), sizeof(fc::ResidencyParams) * kMaxItems, cudaMemcpyHostToDevice));
      }
      const double ms = MedianMs(s, 2, 9, [&] {
        fc::LaunchResidencyDiffBatch(dbare[set], bare[set].data(), kMaxItems, s);
        set ^= 1;
      });
      dm.Set("batch_16_diff_only_us", ms * 1e3);
      B.AddRow({"recall", "the residency diff alone (no copy), batch 16", "us", ms * 1e3, 0, "every page a miss"});
      for (int b = 0; b < 2; ++b) CK(cudaFree(dbare[b]));
    }
    modes.Set("in_diff", dm);
    for (int set = 0; set < 2; ++set) CK(cudaFree(ditems[set]));
    CK(cudaFree(pools));
    CK(cudaFree(sel));
    CK(cudaFree(res));
    CK(cudaFree(sslot));
    CK(cudaFree(rjobs));
    CK(cudaFree(counts));
  }
  // --- contiguous reference: the same bytes as one copy
  {
    double ms = MedianMs(s, 1, 5, [&] {
      CK(cudaMemcpyAsync(pool, store, size_t(jobs_n) * kHeadPage, cudaMemcpyHostToDevice, s));
    });
    Json cm = Json::Obj();
    cm.Set("GBps", jobs_n * double(kHeadPage) / ms / 1e6);
    sec.Set("contiguous_same_bytes", cm);
  }
  sec.Set("modes", modes);
  B.json.Set("recall", sec);

  CK(cudaFree(pool));
  CK(cudaFree(djobs));
  CK(cudaFree(dcount));
  CK(cudaHostUnregister(store));
  munmap(map, store_bytes);
}

}  // namespace fkbench
