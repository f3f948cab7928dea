// Session lifetime on the CUDA engine: the device tier of every layer, the host segments
// registered for mapped access (the store per reserved extent), a fresh or re-attached manifest;
// growing the reservation; closing.
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <future>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "CudaEngine.h"
#include "Parallel.h"
#include "cuda/cuda_check.cuh"
#include "selection.cuh"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace freekv::cuda {

using std::to_string;

// Registers a shared segment for mapped device access; an already registered range is used as is.
uint8_t* RegisterMapped(uint8_t* p, size_t bytes, bool& registered, const char* what) {
  registered = false;
  if (!p || bytes == 0) return nullptr;
  cudaError_t e = cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (e == cudaErrorHostMemoryAlreadyRegistered) {
    cudaGetLastError();
  } else {
    Check(e, what);
    registered = true;
  }
  void* d = nullptr;
  Check(cudaHostGetDevicePointer(&d, p, 0), what);
  return static_cast<uint8_t*>(d);
}

// The store is not registered whole: the kvstore commits its memory in extents as the context
// grows (a session of a 128K-token limit may hold a few thousand tokens), and registering pins, so
// commits, every page registered. Each layer's reserved range [0, reserved_pages) of pages is
// registered as the reservation grows, rounded out to OS pages (the kvstore allocates the same
// rounded ranges) and never twice: only the OS pages not yet covered are registered. Kernels keep
// addressing the store as one array from one base pointer, which needs the device to use the host's
// addresses for registered memory (cudaDevAttrCanUseHostPointerForRegisteredMem, checked at
// CreateSession); every registration checks that cudaHostGetDevicePointer agrees.
//
// Pinning a freshly mapped 4 GiB from one thread took 1.88 s on the H200 machine (the first touch
// of fallocated tmpfs pages zeroes them; then page-table faults and the driver's page lists), more
// than the device needs to prefill those tokens below ~64K tokens of an 8B model. Each new range
// (one per layer, split at kRegisterPieceBytes) has its page tables filled (MADV_POPULATE_WRITE)
// and is then registered, on up to RegisterThreads() threads at once (FREEKV_REGISTER_THREADS,
// default kDefaultRegisterThreads). bench/gpu section hoststore, 4 GiB already touched once:
// registration alone 0.50-0.66 s from 2-16 threads (the driver does not scale past 2), populate
// from 8 threads 0.11-0.16 s then register 0.13-0.19 s.
namespace {
constexpr size_t kRegisterPieceBytes = size_t(64) << 20;
constexpr int kDefaultRegisterThreads = 8;

int RegisterThreads() {
  static const int n = [] {
    const char* e = std::getenv("FREEKV_REGISTER_THREADS");
    if (!e || !*e) return kDefaultRegisterThreads;
    char* end = nullptr;
    long v = std::strtol(e, &end, 10);
    if (*end != 0 || v < 1 || v > 64)
      throw std::runtime_error(std::string("FREEKV_REGISTER_THREADS must be an integer from 1 to 64, got '") + e + "'");
    return (int)v;
  }();
  return n;
}
}  // namespace

void RegisterStore(Session& s, int reserved_pages) {
  teardown::Foreground foreground;  // closed sessions' teardowns wait meanwhile (shm/TeardownGate.h)
  static const uintptr_t os_page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t base = reinterpret_cast<uintptr_t>(s.host.store);
  const uintptr_t limit = base + s.host.store_bytes;
  // The pieces not covered yet: per layer, the gaps of [a, b) in the cover, split at kRegisterPieceBytes.
  std::vector<std::pair<uintptr_t, uintptr_t>> pieces;
  for (int l = 0; l < s.geo.layers && reserved_pages > 0; ++l) {
    const uintptr_t a = (base + s.layout.layer_stride * l) / os_page * os_page;
    uintptr_t b = base + s.layout.layer_stride * l + s.layout.page_bytes * (size_t)reserved_pages;
    b = std::min(limit, (b + os_page - 1) / os_page * os_page);
    uintptr_t at = a;
    const auto add = [&](uintptr_t x, uintptr_t y) {
      if (!pieces.empty() && pieces.back().second > x) x = pieces.back().second;  // layers' rounded ends may meet
      for (; x < y; x += kRegisterPieceBytes) pieces.emplace_back(x, std::min(y, x + kRegisterPieceBytes));
    };
    for (const auto& r : s.store_cover) {
      if (r.second <= at) continue;
      if (r.first >= b) break;
      if (r.first > at) add(at, r.first);
      at = std::max(at, r.second);
    }
    if (at < b) add(at, b);
  }
  if (pieces.empty()) return;
  // 0: registered here; 1: already registered (another session over the same mapping), used as is;
  // else the error.
  std::vector<cudaError_t> result(pieces.size(), cudaSuccess);
  std::vector<char> found(pieces.size(), 0);
  std::vector<int> populate_errno(pieces.size(), 0);
  int device = 0;
  Check(cudaGetDevice(&device), "cudaGetDevice");
  const auto work = [&](size_t i) {
    uint8_t* p = reinterpret_cast<uint8_t*>(pieces[i].first);
    const size_t n = pieces[i].second - pieces[i].first;
    // Page tables filled first, from this thread: registering a populated range is ~3x faster
    // than letting the driver fault it in, and the faults run in parallel where registrations
    // do not (bench/gpu hoststore). A kernel without MADV_POPULATE_WRITE (EINVAL) registers as is.
    if (madvise(p, n, MADV_POPULATE_WRITE) != 0 && errno != EINVAL) {
      populate_errno[i] = errno;
      return;
    }
    cudaError_t e = cudaHostRegister(p, n, cudaHostRegisterMapped | cudaHostRegisterPortable);
    if (e == cudaErrorHostMemoryAlreadyRegistered) {
      cudaGetLastError();
      found[i] = 1;
      e = cudaSuccess;
    }
    result[i] = e;
  };
  const unsigned threads = (unsigned)std::min<size_t>(pieces.size(), (size_t)RegisterThreads());
  std::atomic<size_t> next{0};
  RunOnThreads(threads, [&] {
    if (cudaSetDevice(device) != cudaSuccess) return;  // pieces left unclaimed are done below
    for (size_t i; (i = next.fetch_add(1)) < pieces.size();) work(i);
  });
  for (size_t i; (i = next.fetch_add(1)) < pieces.size();) work(i);
  // Every piece registered here is the session's to unregister, whatever failed beside it.
  std::string error;
  for (size_t i = 0; i < pieces.size(); ++i) {
    uint8_t* p = reinterpret_cast<uint8_t*>(pieces[i].first);
    const size_t n = pieces[i].second - pieces[i].first;
    if (populate_errno[i] != 0) {
      // EFAULT: a write would have raised SIGBUS, which on tmpfs means it is full.
      const int e = populate_errno[i];
      if (error.empty())
        error = (e == ENOSPC || e == EFAULT || e == ENOMEM)
                    ? std::string("the session's host memory could not be committed: /dev/shm is full (madvise(MADV_POPULATE_WRITE): ") +
                          std::strerror(e) + ")"
                    : std::string("madvise(MADV_POPULATE_WRITE, host.store extent): ") + std::strerror(e);
      continue;
    }
    if (result[i] != cudaSuccess) {
      if (error.empty()) error = std::string("cudaHostRegister(host.store extent): ") + cudaGetErrorString(result[i]);
      continue;
    }
    if (!found[i]) s.store_regs.push_back(p);
    s.store_cover.emplace_back(pieces[i]);
    if (!error.empty()) continue;
    for (uint8_t* q : {p, p + n - 1}) {
      void* d = nullptr;
      cudaError_t e = cudaHostGetDevicePointer(&d, q, 0);
      if (e != cudaSuccess)
        error = std::string("cudaHostGetDevicePointer(host.store extent): ") + cudaGetErrorString(e);
      else if (d != q)
        error = "cudaHostGetDevicePointer(host.store extent): the device address of registered host memory differs "
                "from the host's; the store cannot be registered per extent";
    }
  }
  {
    std::lock_guard<std::mutex> g(s.reg_mu);
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (populate_errno[i] != 0 || result[i] != cudaSuccess) continue;
      if (found[i])
        s.foreign_reg = true;
      else
        s.reg_starts.push_back(pieces[i].first);
    }
    std::sort(s.reg_starts.begin(), s.reg_starts.end());
  }
  std::sort(s.store_cover.begin(), s.store_cover.end());
  std::vector<std::pair<uintptr_t, uintptr_t>> merged;
  for (const auto& r : s.store_cover) {
    if (!merged.empty() && r.first <= merged.back().second)
      merged.back().second = std::max(merged.back().second, r.second);
    else
      merged.push_back(r);
  }
  s.store_cover.swap(merged);
  cudaGetLastError();  // a failed registration's error is reported below, not by the next call
  if (!error.empty()) throw std::runtime_error(error);
}

void WaitAhead(Session& s) {
  if (!s.ahead.valid()) return;
  std::future<void> job = std::move(s.ahead);
  try {
    job.get();
    s.registered_pages = std::max(s.registered_pages, s.ahead_pages);
  } catch (...) {
    // Not thrown from here: a prompt's last job reaches past the prompt, so its pages may never
    // be needed, and a decode step that needs them must not fail its whole batch on an earlier
    // error. registered_pages stays where it was, so the caller (EnsureRegistered) registers what
    // it needs itself, which throws the error as it stands then; the next RegisterAhead tries again.
    // What the failed job did register is in store_cover and store_regs (RegisterStore records
    // every piece it registered), so nothing is registered twice or left behind.
  }
}

void EnsureRegistered(Session& s, int pages) {
  pages = std::min(pages, s.host.reserved_pages);
  if (pages <= s.registered_pages) return;
  WaitAhead(s);
  if (pages <= s.registered_pages) return;
  RegisterStore(s, pages);
  s.registered_pages = pages;
}

void CudaEngine::ReserveStore(int session, int reserved_pages) {
  auto lock = LockOutsideStep("reserveStore");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  Session& s = Find(session);
  CheckReservation(s.host, reserved_pages);
  // Registered as the context reaches it (EnsureRegistered), not here.
  s.host.reserved_pages = reserved_pages;
}

// FREEKV_REGISTER_AHEAD: thread (the default) registers ahead on a thread of its own while the
// caller goes on issuing; inline registers before RegisterAhead returns.
namespace {
bool RegisterAheadOnThread() {
  static const bool on = [] {
    const char* e = std::getenv("FREEKV_REGISTER_AHEAD");
    if (!e || !*e) return true;
    const std::string v = e;
    if (v != "thread" && v != "inline")
      throw std::runtime_error("FREEKV_REGISTER_AHEAD must be thread or inline, got '" + v + "'");
    return v == "thread";
  }();
  return on;
}
}  // namespace

void CudaEngine::RegisterAhead(int session, int64_t tokens) {
  auto lock = LockOutsideStep("registerAhead");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  Session& s = Find(session);
  if (tokens <= 0) return;
  const int pages = (int)std::min<int64_t>((tokens + s.P - 1) / s.P + 1, s.host.reserved_pages);
  if (!RegisterAheadOnThread()) {
    EnsureRegistered(s, pages);
    return;
  }
  // One job at a time: the previous one (normally done by now: it was started a chunk ago) first.
  WaitAhead(s);
  if (pages <= s.registered_pages) return;
  const int device = device_;
  Session* sp = &s;
  s.ahead_pages = pages;
  BackgroundFailures* failures = &failures_;
  s.ahead = std::async(std::launch::async, [sp, pages, device, session, failures] {
    try {
      FKV_CUDA_CHECK(cudaSetDevice(device));
      RegisterStore(*sp, pages);
    } catch (const std::exception& e) {
      // Reported here, once: WaitAhead keeps it from the calls (see there), and pages that are
      // needed later are registered inline, which throws the error as it stands then.
      failures->Add(session, "registering the host store ahead to page " + to_string(pages) + " failed: " + e.what());
      throw;
    }
  });
}

int CudaEngine::CreateSession(const Geometry& g, const RetrievalConfig& c, const HostStore& h, bool reattach) {
  teardown::Foreground foreground;  // closed sessions' teardowns wait meanwhile (shm/TeardownGate.h)
  auto lock = LockOutsideStep("createSession");
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  if (!pctx_pool_ && !session_pool_) return CreateSessionLocked(g, c, h, reattach);
  try {
    return CreateSessionLocked(g, c, h, reattach);
  } catch (const std::runtime_error& e) {
    if (!std::strstr(e.what(), "out of memory")) throw;
    // The pools keep freed memory (the prefill contexts' up to their budget, for the next prompt;
    // closed sessions' arrays, for the next sessions); a session that needs it gets it back, and
    // its creation is tried once more.
    cudaGetLastError();
    if (pctx_pool_) {
      FKV_CUDA_CHECK(cudaStreamSynchronize(main_->get()));  // the contexts' frees are queued there
      FKV_CUDA_CHECK(cudaMemPoolTrimTo(pctx_pool_, 0));
    }
    if (session_pool_) {
      FKV_CUDA_CHECK(cudaStreamSynchronize(init_->get()));  // the sessions' frees are queued there
      FKV_CUDA_CHECK(cudaMemPoolTrimTo(session_pool_, 0));
    }
    return CreateSessionLocked(g, c, h, reattach);
  }
}

int CudaEngine::CreateSessionLocked(const Geometry& g, const RetrievalConfig& c, const HostStore& h, bool reattach) {
  Validate(g, c, h);
  auto s = std::make_unique<Session>();
  s->geo = g;
  s->cfg = c;
  s->host = h;
  s->layout = ComputeLayout(g, c, h.capacity_pages);
  s->P = c.page_size;
  s->SP = c.sink_tokens / c.page_size;
  s->WP = c.window_tokens / c.page_size;
  s->K = c.select_tokens / c.page_size;
  s->R = ResidentSlots(s->K, h.capacity_pages, ResidentFactor());
  s->page_elems = (size_t)2 * s->P * g.kv_heads * g.head_dim;
  {
    int same_address = 0;
    FKV_CUDA_CHECK(cudaDeviceGetAttribute(&same_address, cudaDevAttrCanUseHostPointerForRegisteredMem, device_));
    if (!same_address)
      throw std::runtime_error("device " + to_string(device_) +
                               " cannot use host pointers for registered memory "
                               "(cudaDevAttrCanUseHostPointerForRegisteredMem = 0); the store is registered per "
                               "extent and addressed from one host pointer");
  }
  s->store_dev = h.store;
  if (!reattach) s->opening = std::make_unique<teardown::Foreground>();
  // A re-attached session's committed pages are read back at once: its whole reservation is
  // registered. A fresh one registers its first pages; the rest as its context grows.
  EnsureRegistered(*s, reattach ? h.reserved_pages : kRegisterAheadPages);
  s->tail_dev = RegisterMapped(h.tail, h.tail_bytes, s->tail_registered, "cudaHostRegister(host.tail)");
  s->manifest_dev =
      RegisterMapped(h.manifest, h.manifest_bytes, s->manifest_registered, "cudaHostRegister(host.manifest)");
  // Initial contents are written on a stream of their own (the legacy default stream does not order
  // against the engine's non-blocking streams), then waited for once: the session is nobody's
  // until this returns, so nothing else needs to order after them, and the wait is not behind
  // other sessions' queued work (the engine lock is held meanwhile, and a prompt prefilling
  // beside would stop being issued).
  cudaStream_t st = init_->get();
  if (session_pool_) {
    // From here on the session's arrays come from the pool in st's order (valid on every stream
    // once st is waited for, below), and a destruction frees them there after the engine's queued
    // work (Session::free_after).
    s->free_stream = st;
    s->free_after = {main_->get(), side_->get(), offload_->get()};
    s->counters = PoolArray<unsigned long long>(session_pool_, st);
  }
  s->counters.Resize((size_t)g.layers * kLayerWords);
  FKV_CUDA_CHECK(cudaMemsetAsync(s->counters.get(), 0, s->counters.bytes(), st));
  const int Hkv = g.kv_heads, D = g.head_dim, cap = h.capacity_pages, K = s->K;
  for (int l = 0; l < g.layers; ++l) {
    auto L = std::make_unique<LayerTier>();
    if (session_pool_) L->BindPool(session_pool_, st);
    L->dense = c.mode == Mode::Dense ||
               std::find(c.dense_layers.begin(), c.dense_layers.end(), l) != c.dense_layers.end();
    L->keeps_all = L->dense || KeepsAllPages(c.mode);
    L->pool_slots = L->keeps_all ? cap + 1 : s->SP + s->WP + s->R;
    L->pool.Resize(std::max(1, L->pool_slots) * s->page_elems);
    if (!L->dense) {
      L->summaries.Resize((size_t)cap * Hkv * 2 * D);
      L->groups.Resize((size_t)((cap + kSelGroupPages - 1) / kSelGroupPages) * Hkv * 2 * D);
    }
    if (s->Retrieves(*L)) {
      L->selected.Resize((size_t)Hkv * K);
      L->selected_slot.Resize((size_t)Hkv * K);
      L->resident.Resize((size_t)Hkv * s->R);
      FKV_CUDA_CHECK(cudaMemsetAsync(L->resident.get(), 0xff, L->resident.bytes(), st));  // -1: empty
      L->slot_age.Resize((size_t)Hkv * s->R);
      FKV_CUDA_CHECK(cudaMemsetAsync(L->slot_age.get(), 0, L->slot_age.bytes(), st));
      FKV_CUDA_CHECK(cudaMemsetAsync(L->selected.get(), 0xff, L->selected.bytes(), st));
      FKV_CUDA_CHECK(cudaMemsetAsync(L->selected_slot.get(), 0xff, L->selected_slot.bytes(), st));
      L->prev_selected.Resize((size_t)Hkv * K);
      FKV_CUDA_CHECK(cudaMemsetAsync(L->prev_selected.get(), 0xff, L->prev_selected.bytes(), st));
      L->flags.Resize(Hkv);
      SelectionParams sp;
      sp.q_heads = g.q_heads;
      sp.kv_heads = Hkv;
      sp.num_candidates = cap;
      L->scratch.Resize(SelectionScratchBytes(sp) / sizeof(float));
      sp.k = K;
      L->sel_ws.Resize((SelectionWorkspaceBytes(sp) + 7) / 8);
      L->jobs.Resize((size_t)Hkv * K);
      L->job_count.Resize(1 + Hkv);
    }
    for (auto& q : L->q) q.Resize((size_t)g.q_heads * D);
    L->table_rows = L->dense ? cap + 1 : s->SP + K + s->WP;
    L->t_slot.Resize((size_t)Hkv * L->table_rows);
    L->t_tokens.Resize((size_t)Hkv * L->table_rows);
    L->t_id.Resize((size_t)Hkv * L->table_rows);
    L->t_num.Resize(Hkv);
    s->layers.push_back(std::move(L));
  }
  if (c.recall == RecallMode::DoubleBuffer && c.mode != Mode::ResidentSparse)  // (which recalls nothing)
    s->db = std::make_unique<DoubleBufferRecall>(s->Recall().HeadPageBytes(), DoubleBufferRecall::kMaxChunk);
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  if (reattach) {
    Reattach(*s);
  } else {
    // A fresh manifest: header, no pages, no query records (the kvstore only initialised it).
    InitManifest(*s);
  }
  const int id = next_id_++;
  sessions_[id] = std::move(s);
  return id;
}

void CudaEngine::CloseSession(int session) {
  // Work queued so far may still use the session's memory and registered segments: it is waited
  // for, and the session destroyed (its store unregistered: ~0.1 s per 4 GB; its device memory
  // freed), outside the engine lock: under it, the wait and the destruction held off every other
  // session (a prompt prefilling beside stopped being issued, and the device drained). That was
  // not what made a prompt's first chunk slow after another request (PERF.md, "A prompt among other
  // requests"): the same visit after this change measured the same first-chunk times.
  // The calling thread's device first: the fences are made on it (a pool thread of the binding
  // may have none current yet, and events of device 0 cannot be recorded on device_'s streams).
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  std::unique_ptr<Session> closing;
  Event fences[3];
  {
    auto lock = LockOutsideStep("closeSession");
    auto it = sessions_.find(session);
    if (it == sessions_.end()) throw std::invalid_argument("session " + to_string(session) + " is not open");
    EndPrefill(*it->second);
    const Stream* streams[3] = {main_.get(), side_.get(), offload_.get()};
    for (int i = 0; i < 3; ++i) FKV_CUDA_CHECK(cudaEventRecord(fences[i].get(), streams[i]->get()));
    closing = std::move(it->second);
    sessions_.erase(it);
  }
  // The session is no longer the engine's: it goes whatever the wait says, and the close
  // succeeds, so that the binding lets go of its segments. A failed wait is an earlier
  // asynchronous error, which is sticky: the next call on the device reports it.
  for (auto& f : fences)
    if (cudaEventSynchronize(f.get()) != cudaSuccess) {
      cudaDeviceSynchronize();  // nothing may still use the session when it goes
      break;
    }
  // The store is unregistered a registration at a time, stepping aside while another session is
  // being opened or its store registered (FREEKV_TEARDOWN_YIELD_MS; shm/TeardownGate.h); then the
  // session's device memory is freed.
  teardown::Pacer pacer;
  closing->UnregisterStore(&pacer);
}

}  // namespace freekv::cuda
