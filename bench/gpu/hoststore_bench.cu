// Section hoststore: what a fresh session's host store costs before the device can use it, on the
// primitives the product uses (native/src/shm/ShmSegment.cpp, native/src/engine/cuda/CudaSession.cu):
//   fallocate      the kvstore commits a reservation's memory in a POSIX shared-memory segment
//   register       the CUDA engine pins the mapped store (cudaHostRegister, Mapped | Portable), in
//                  extents of `extent` bytes, from T threads at once (T = 1, 2, 4, 8, 16)
//   populate+reg   the mapping's page tables filled first (MADV_POPULATE_WRITE, several threads),
//                  then registered from T threads
//   populate-commit the memory committed by write faults from T threads (MADV_POPULATE_WRITE)
//                  instead of fallocate, optionally with MADV_HUGEPAGE; then, as the compute
//                  process would, a second mapping populated and registered
// Each case maps the segment afresh (no page tables) and checks the device reads back what the
// host wrote at both ends of every extent. GB/s are of store bytes; the ceiling is the fallocate
// rate (the memory must be committed once in any case).
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <thread>

#include "bench.cuh"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace fkbench {

namespace {

struct Shm {
  std::string name;
  int fd = -1;
  size_t bytes = 0;
  uint8_t* p = nullptr;
  ~Shm() {
    if (p) munmap(p, bytes);
    if (fd >= 0) close(fd);
    if (!name.empty()) shm_unlink(name.c_str());
  }
  void Map() {
    if (p) munmap(p, bytes);
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) throw std::runtime_error("mmap failed");
    p = static_cast<uint8_t*>(m);
  }
};

template <class F>
void OnThreads(int threads, size_t items, F f) {
  std::atomic<size_t> next{0};
  std::vector<std::thread> ts;
  std::atomic<bool> failed{false};
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < items;)
        if (!f(i)) failed = true;
    });
  for (auto& t : ts) t.join();
  if (failed) throw std::runtime_error("a worker failed");
}

__global__ void ReadEnds(const uint8_t* base, size_t extent, size_t extents, size_t bytes, uint8_t* out) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= extents) return;
  size_t a = i * extent, b = std::min(bytes, a + extent) - 1;
  out[2 * i] = base[a];
  out[2 * i + 1] = base[b];
}

}  // namespace

void RunHostStore(Bench& B) {
  // 32K tokens of an 8B model (32 layers, 8 KV heads, head dim 128, bf16): 4 GiB.
  const size_t bytes = B.quick ? (size_t(512) << 20) : (size_t(4) << 30);
  const size_t extent = size_t(64) << 20;
  const size_t extents = (bytes + extent - 1) / extent;
  Json sec = Json::Obj();
  sec.Set("store_bytes", double(bytes)).Set("extent_bytes", double(extent));
  Shm shm;
  shm.name = "/freekv-bench-hoststore-" + std::to_string(getpid());
  shm.bytes = bytes;
  shm.fd = shm_open(shm.name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (shm.fd < 0) throw std::runtime_error("shm_open failed");
  if (ftruncate(shm.fd, (off_t)bytes) != 0) throw std::runtime_error("ftruncate failed");
  double t0 = WallSeconds();
  if (fallocate(shm.fd, 0, 0, (off_t)bytes) != 0) throw std::runtime_error("fallocate failed");
  const double falloc_s = WallSeconds() - t0;
  const double falloc_gbs = bytes / falloc_s / 1e9;
  B.AddRow({"hoststore", "fallocate", "GB/s", falloc_gbs, 0, "one call over the whole segment (the kvstore's reservation)"});
  sec.Set("fallocate_s", falloc_s);
  std::printf("[hoststore] %.2f GiB segment: fallocate %.3f s (%.2f GB/s)\n", bytes / double(1 << 30), falloc_s, falloc_gbs);

  int device = 0;
  CK(cudaGetDevice(&device));
  // Committing the memory by write faults from T threads instead (MADV_POPULATE_WRITE over a
  // mapping: allocated and zeroed in parallel; fallocate holds the file's lock, and tmpfs zeroes
  // fallocated pages only at their first touch, in whichever process touches them first).
  {
    std::string thp = "?";
    if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "r")) {
      char buf[256] = {0};
      if (std::fgets(buf, sizeof buf, f)) thp = buf;
      std::fclose(f);
      while (!thp.empty() && (thp.back() == '\n' || thp.back() == ' ')) thp.pop_back();
    }
    sec.Set("shmem_enabled", thp);
    std::printf("[hoststore] /sys/kernel/mm/transparent_hugepage/shmem_enabled: %s\n", thp.c_str());
    Json pw = Json::Arr();
    for (bool huge : {false, true}) {
      for (int threads : {1, 4, 8, 16}) {
        if (!B.TimeLeft(8)) break;
        Shm f2;
        f2.name = shm.name + "-pw";
        f2.bytes = bytes;
        f2.fd = shm_open(f2.name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
        if (f2.fd < 0 || ftruncate(f2.fd, (off_t)bytes) != 0) throw std::runtime_error("shm_open/ftruncate failed");
        f2.Map();
        if (huge && madvise(f2.p, bytes, MADV_HUGEPAGE) != 0) {
          std::printf("[hoststore] MADV_HUGEPAGE refused on a shared mapping\n");
          break;
        }
        double a = WallSeconds();
        OnThreads(threads, extents, [&](size_t i) {
          size_t off = i * extent, n = std::min(extent, bytes - off);
          return madvise(f2.p + off, n, MADV_POPULATE_WRITE) == 0;
        });
        const double pop_s = WallSeconds() - a;
        struct stat st;
        fstat(f2.fd, &st);
        // The compute process's side: a fresh mapping of the populated segment, populated and registered.
        f2.Map();
        a = WallSeconds();
        OnThreads(8, extents, [&](size_t i) {
          size_t off = i * extent, n = std::min(extent, bytes - off);
          return madvise(f2.p + off, n, MADV_POPULATE_WRITE) == 0;
        });
        const double pop2_s = WallSeconds() - a;
        a = WallSeconds();
        OnThreads(4, extents, [&](size_t i) {
          if (cudaSetDevice(device) != cudaSuccess) return false;
          size_t off = i * extent, n = std::min(extent, bytes - off);
          return cudaHostRegister(f2.p + off, n, cudaHostRegisterMapped | cudaHostRegisterPortable) == cudaSuccess;
        });
        const double reg_s = WallSeconds() - a;
        OnThreads(4, extents, [&](size_t i) {
          if (cudaSetDevice(device) != cudaSuccess) return false;
          return cudaHostUnregister(f2.p + i * extent) == cudaSuccess;
        });
        const std::string name = std::string(huge ? "huge " : "") + "populate-commit x" + std::to_string(threads);
        B.AddRow({"hoststore", name, "GB/s", bytes / pop_s / 1e9, falloc_gbs, "committing by write faults from T threads; ceiling: the fallocate rate"});
        Json c = Json::Obj();
        c.Set("threads", threads).Set("huge", Json::Bool(huge)).Set("commit_s", pop_s).Set("allocated_bytes", double(st.st_blocks) * 512);
        c.Set("compute_populate_s", pop2_s).Set("compute_register_s", reg_s);
        pw.Push(c);
        std::printf("[hoststore] %-22s commit %.3f s (%.2f GB/s, %.2f GiB allocated); then a second mapping: populate x8 %.3f s, register x4 %.3f s\n",
                    name.c_str(), pop_s, bytes / pop_s / 1e9, st.st_blocks * 512.0 / double(1 << 30), pop2_s, reg_s);
      }
    }
    sec.Set("populate_commit", pw);
  }

  uint8_t* ends = nullptr;
  CK(cudaMalloc(&ends, 2 * extents));
  std::vector<uint8_t> got(2 * extents);
  Json cases = Json::Arr();
  for (bool populate : {false, true}) {
    for (int threads : {1, 2, 4, 8, 16}) {
      if (!B.TimeLeft(8)) break;
      shm.Map();
      // Host-written marks at both ends of every extent (through this mapping, before timing).
      double tp = 0;
      if (populate) {
        double a = WallSeconds();
        OnThreads(8, extents, [&](size_t i) {
          size_t off = i * extent, n = std::min(extent, bytes - off);
          return madvise(shm.p + off, n, MADV_POPULATE_WRITE) == 0;
        });
        tp = WallSeconds() - a;
      }
      for (size_t i = 0; i < extents; ++i) {
        shm.p[i * extent] = uint8_t(i * 7 + threads);
        shm.p[std::min(bytes, (i + 1) * extent) - 1] = uint8_t(i * 13 + threads + 1);
      }
      double a = WallSeconds();
      OnThreads(threads, extents, [&](size_t i) {
        if (cudaSetDevice(device) != cudaSuccess) return false;
        size_t off = i * extent, n = std::min(extent, bytes - off);
        return cudaHostRegister(shm.p + off, n, cudaHostRegisterMapped | cudaHostRegisterPortable) == cudaSuccess;
      });
      const double reg_s = WallSeconds() - a;
      ReadEnds<<<unsigned((extents + 127) / 128), 128, 0, B.stream>>>(shm.p, extent, extents, bytes, ends);
      CK(cudaGetLastError());
      CK(cudaMemcpyAsync(got.data(), ends, got.size(), cudaMemcpyDeviceToHost, B.stream));
      CK(cudaStreamSynchronize(B.stream));
      for (size_t i = 0; i < extents; ++i)
        if (got[2 * i] != uint8_t(i * 7 + threads) || got[2 * i + 1] != uint8_t(i * 13 + threads + 1))
          throw std::runtime_error("the device read other bytes than the host wrote (extent " + std::to_string(i) + ")");
      a = WallSeconds();
      OnThreads(threads, extents, [&](size_t i) {
        if (cudaSetDevice(device) != cudaSuccess) return false;
        return cudaHostUnregister(shm.p + i * extent) == cudaSuccess;
      });
      const double unreg_s = WallSeconds() - a;
      const double total = tp + reg_s;
      const std::string name = std::string(populate ? "populate+register" : "register") + " x" + std::to_string(threads);
      B.AddRow({"hoststore", name, "GB/s", bytes / total / 1e9, falloc_gbs,
                "store bytes per second of set-up; ceiling: the fallocate rate"});
      Json c = Json::Obj();
      c.Set("threads", threads).Set("populate", Json::Bool(populate)).Set("populate_s", tp).Set("register_s", reg_s);
      c.Set("unregister_s", unreg_s).Set("GBps", bytes / total / 1e9);
      cases.Push(c);
      std::printf("[hoststore] %-20s populate %.3f s  register %.3f s  (%.2f GB/s)  unregister %.3f s\n", name.c_str(), tp,
                  reg_s, bytes / total / 1e9, unreg_s);
    }
  }
  CK(cudaFree(ends));
  sec.Set("cases", cases);
  B.json.Set("hoststore", sec);
}

}  // namespace fkbench
