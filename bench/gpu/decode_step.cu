// Section 4: decode-step latency at Llama-3.1-8B shapes, built from the CUDA backend's kernel
// launchers (native/cuda: selection, correction, residency diff, recall, attention tables, decode
// attention), our cuBLASLt GEMMs and the small kernels of llama_kernels.cu.
//
// Shapes: 32 layers, 32 query heads, 8 KV heads, head dim 128, hidden 4096, FFN 14336, vocab
// 128256, random bf16 weights; page 32 tokens; budget 512 sink + 1024 selected + 512 window.
// Modes (one decode step = the whole model for `batch` sequences of `context` tokens):
//   dense          GPU-resident full KV, attention over every page (where it fits)
//   sparse         GPU-resident: selection with q_t, attention over the budget; nothing recalled
//   freekv_gather  FreeKV, sync-free: per layer, correction check on the device, re-selection and
//                  recall of flagged groups only, attention; after attention the speculative
//                  selection + residency diff + gather recall for step t+1 run on side streams
//   freekv_memcpy  the same with the paper's recall: job lists read back by the host, one
//                  cudaMemcpyAsync per head-page through two staging buffers (a recall thread),
//                  and the paper's per-layer host read of the correction flags
//   arkvale        selection and recall synchronous every layer of every step (no speculation):
//                  selection, diff, host read-back, double-buffered memcpy recall, attention
//   full_offload   all KV lives in host memory and each layer's KV is copied back every step
//                  (one bulk copy per layer, prefetched one layer ahead)
// The modes without host round trips (dense, sparse, freekv_gather) are captured as one CUDA
// graph per step; the others run eagerly (their host round trips are the point).
//
// The step input changes from step to step (llama_kernels: StepInput) so that consecutive
// queries are similar but not identical; the recall volume and the correction rate that result
// are measured with the backend's device counters and written next to each time.
//
// Host memory: the host store is one shared mapping registered with cudaHostRegisterMapped, like
// the kvstore's segments. 128K x 16 sequences of KV (256 GiB) does not fit in the machine's
// 128 GiB, so each (sequence, layer) store points into one pool of 8 GiB (aliasing); PCIe traffic
// is the same, the CPU memory footprint is not.
#include <sys/mman.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <queue>
#include <thread>

#include "attention_decode.cuh"
#include "bench.cuh"
#include "correction.cuh"
#include "gemm_cublaslt.cuh"
#include "llama_kernels.cuh"
#include "recall.cuh"
#include "residency.cuh"
#include "selection.cuh"

namespace fkbench {
namespace fc = freekv::cuda;

namespace {
constexpr int L = 32, Hq = 32, Hkv = 8, D = 128, HID = 4096, FFN = 14336, VOCAB = 128256, P = 32;
constexpr int QKV = (Hq + 2 * Hkv) * D;
constexpr int SINK = 16, WIN = 16, K = 32, SLOTS = SINK + WIN + K;  // pages
constexpr int WIN_BASE = SINK, SEL_BASE = SINK + WIN;  // sink slots start at 0
constexpr size_t PAGE = size_t(2) * P * Hkv * D;  // elements of an NHD page (all heads)
constexpr size_t PAGE_BYTES = PAGE * 2;          // 128 KiB
constexpr size_t HEAD_PAGE = size_t(2) * P * D * 2;
constexpr float TAU = 0.9f;
constexpr int NBR = 16;  // branch streams per role

enum Mode { kDense, kSparse, kGather, kMemcpy, kArkVale, kFullOffload, kModelOnly, kModes };
const char* kModeName[kModes] = {"dense", "sparse", "freekv_gather", "freekv_memcpy", "arkvale", "full_offload",
                                 "model_only"};

struct Arena {
  std::vector<void*> ptrs;
  template <class T>
  T* Alloc(size_t n) {
    void* p = nullptr;
    CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
    ptrs.push_back(p);
    return static_cast<T*>(p);
  }
  void FreeAll() {
    for (void* p : ptrs) cudaFree(p);
    ptrs.clear();
  }
  ~Arena() { FreeAll(); }
};

struct Weights {
  bf16 *wqkv[L], *wo[L], *wgu[L], *wd[L], *n1[L], *n2[L], *nf = nullptr, *lm = nullptr;
  double bytes = 0;  // bytes one step streams (every weight once; the input row is negligible)
};

void InitWeights(Arena& A, Weights& W, cudaStream_t s) {
  auto mk = [&](size_t n, uint64_t seed, float scale, float offset = 0.f) {
    bf16* p = A.Alloc<bf16>(n);
    FillBf16(p, n, seed, scale, s);
    W.bytes += n * 2.0;
    (void)offset;
    return p;
  };
  for (int l = 0; l < L; ++l) {
    W.wqkv[l] = mk(size_t(QKV) * HID, 1000 + l, 0.02f);
    W.wo[l] = mk(size_t(HID) * HID, 2000 + l, 0.02f);
    W.wgu[l] = mk(size_t(2) * FFN * HID, 3000 + l, 0.02f);
    W.wd[l] = mk(size_t(HID) * FFN, 4000 + l, 0.02f);
    W.n1[l] = mk(HID, 5000 + l, 1.0f);
    W.n2[l] = mk(HID, 6000 + l, 1.0f);
  }
  W.nf = mk(HID, 7000, 1.0f);
  W.lm = mk(size_t(VOCAB) * HID, 7001, 0.02f);  // also the embedding table of StepInput
}

// Valid bf16 values (finite, never zero) in host memory, many threads.
void FillHostBf16(void* p, size_t bytes, uint64_t seed) {
  FillHostBytes(p, bytes, seed);
  uint16_t* h = static_cast<uint16_t*>(p);
  size_t n = bytes / 2;
  unsigned nt = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> th;
  for (unsigned t = 0; t < nt; ++t)
    th.emplace_back([=] {
      for (size_t i = n * t / nt; i < n * (t + 1) / nt; ++i) {
        uint16_t u = h[i];
        h[i] = uint16_t((u & 0x807F) | ((0x78 + ((u >> 7) % 7)) << 7));  // |x| in [2^-7, 1)
      }
    });
  for (auto& x : th) x.join();
}

struct HostPool {
  uint8_t* host = nullptr;
  uint8_t* dev = nullptr;  // mapped device pointer
  size_t bytes = 0;
  double fill_s = 0, register_s = 0;
  void Init(size_t n) {
    bytes = n;
    void* m = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("decode step: mmap of the host pool failed");
    host = static_cast<uint8_t*>(m);
    double t = WallSeconds();
    FillHostBf16(host, n, 77);
    fill_s = WallSeconds() - t;
    t = WallSeconds();
    CK(cudaHostRegister(host, n, cudaHostRegisterMapped));
    register_s = WallSeconds() - t;
    CK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev), host, 0));
  }
  void Release() {
    if (!host) return;
    cudaHostUnregister(host);
    munmap(host, bytes);
    host = dev = nullptr;
  }
};

// A queue of recall tasks for the freekv_memcpy mode's recall thread.
struct RecallTask {
  int layer;
  long step;
};

class StepBench {
 public:
  StepBench(Bench& B, const Weights& W, HostPool& H, int ctx, int batch)
      : B_(B), W_(W), H_(H), ctx_(ctx), batch_(batch) {}
  ~StepBench() { StopWorker(); Release(); }

  void Setup();
  Json RunMode(Mode m, const std::string& label);
  float input_a = 0.99f;  // StepInput's a: adjacent inputs have cosine about a^2
  bool DenseFits() const;
  double FloorMs(Mode m) const;
  double KvAttendedBytes(Mode m) const;

 private:
  // geometry of this config
  int Npages() const { return ctx_ / P + 1; }  // pages holding tokens after this step's append
  int Nfull() const { return (ctx_ + 1) / P; }
  int FirstCand() const { return SINK; }
  int NumCand() const { return std::max(SINK, Nfull() - (WIN - 1)) - SINK; }
  int Row() const { return ctx_ % P; }
  size_t SeqLayer(int b, int l) const { return size_t(b) * L + l; }
  uint8_t* StoreHost(int b, int l) const {
    size_t per = size_t(Nfull()) * PAGE_BYTES, n = H_.bytes / per;
    return H_.host + (SeqLayer(b, l) % n) * per;
  }
  uint8_t* StoreDev(int b, int l) const { return H_.dev + (StoreHost(b, l) - H_.host); }

  void Step(Mode m, bool capturing);
  void Fork(cudaStream_t from, cudaStream_t* to, int n);
  void Join(cudaStream_t* from, int n, cudaStream_t to);
  fc::SelectionParams Sel(int b, int l, float* scratch, const int* mask) const;
  fc::ResidencyParams Diff(int b, int l, const int* mask, unsigned long long* ctr) const;
  fc::AttendTableParams Table(int b, int l) const;
  void Attention(int l, Mode m, cudaStream_t s);
  void CopyJobsToHost(int b, int l, fc::RecallJob* jobs_h, int* count_h, cudaStream_t s);
  void StartWorker();
  void StopWorker();
  void Release();

  Bench& B_;
  const Weights& W_;
  HostPool& H_;
  int ctx_, batch_;
  Arena A_, dense_A_, off_A_;
  cudaStream_t main_ = nullptr, copy_ = nullptr, recall_ = nullptr;
  cudaStream_t mb_[NBR] = {}, sb_[NBR] = {};
  cudaEvent_t fork_ev_ = nullptr, join_ev_[NBR] = {}, attn_done_[L] = {}, spec_done_[L][NBR] = {};
  cudaEvent_t copied_[2] = {}, buf_free_[2] = {}, jobs_ready_[L][NBR] = {}, recall_done_[L] = {};
  // activations
  bf16 *hidden_, *xn_, *qkv_, *attn_bf_, *gu_, *act_, *logits_;
  float *q_now_, *q_prev_, *attn_out_;
  int *step_ctr_, *tokens_;
  // budget device tier
  bf16* pools_;                 // [B][L][SLOTS] pages
  bf16** pool_ptrs_;            // [L][B]
  bf16** append_budget_;        // [L][B]
  float* summ_;                 // [B][L][Nfull][Hkv][2][D]
  int *selected_, *resident_, *sel_slot_, *job_count_, *flags_;
  fc::RecallJob* jobs_;
  float* scratch_;              // [2 roles][B][Hq * NumCand]
  int *tab_slot_, *tab_tokens_, *tab_id_, *tab_num_;  // [B][Hkv][SLOTS]
  unsigned long long* ctr_;     // [0..2] main/corrective diff, [3..5] speculative diff, [6] corrections
  void* attn_ws_ = nullptr;
  size_t attn_ws_bytes_ = 0;
  // dense / full offload
  bf16* dense_ = nullptr;       // [B][L][Npages] or, full offload, [2][B][Npages]
  bf16** dense_ptrs_ = nullptr; // [L][B] (full offload: [2][B])
  bf16** append_dense_ = nullptr;
  int *dtab_slot_ = nullptr, *dtab_tokens_ = nullptr, *dtab_id_ = nullptr, *dtab_num_ = nullptr;
  void* dattn_ws_ = nullptr;
  size_t dattn_ws_bytes_ = 0;
  // host side of the memcpy modes
  fc::RecallJob* jobs_h_ = nullptr;  // pinned [L][B][Hkv*K] (speculative) + [B][Hkv*K] (main)
  int* counts_h_ = nullptr;          // pinned [L][B] + [B]
  int* flags_h_ = nullptr;           // pinned [B][Hkv]
  std::unique_ptr<fc::DoubleBufferRecall> db_main_, db_side_;
  fc::RecallGeometry geo_;
  long step_no_ = 0;
  long mode_first_step_ = 0;  // the first step of the mode being measured
  // recall thread
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::queue<RecallTask> tasks_;
  long enqueued_[L];
  bool stop_ = false;
  std::string worker_error_;
};

bool StepBench::DenseFits() const {
  size_t f = 0, t = 0;
  cudaMemGetInfo(&f, &t);
  return double(batch_) * L * Npages() * PAGE_BYTES + (6ull << 30) < double(f);
}

double StepBench::KvAttendedBytes(Mode m) const {
  double tokens;
  if (m == kModelOnly) return 0;
  if (m == kDense || m == kFullOffload) tokens = ctx_ + 1;
  else {
    int wfirst = std::max(SINK, Nfull() - (WIN - 1));
    tokens = SINK * P + K * P + (ctx_ + 1 - wfirst * P);
  }
  return double(batch_) * L * Hkv * tokens * D * 2 * 2;
}

double StepBench::FloorMs(Mode m) const { return (W_.bytes + KvAttendedBytes(m)) / B_.hbm_gbs / 1e6; }

void StepBench::Setup() {
  const int Bn = batch_;
  CK(cudaStreamCreateWithFlags(&main_, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithFlags(&copy_, cudaStreamNonBlocking));
  CK(cudaStreamCreateWithFlags(&recall_, cudaStreamNonBlocking));
  for (int i = 0; i < NBR; ++i) {
    CK(cudaStreamCreateWithFlags(&mb_[i], cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&sb_[i], cudaStreamNonBlocking));
    CK(cudaEventCreateWithFlags(&join_ev_[i], cudaEventDisableTiming));
  }
  CK(cudaEventCreateWithFlags(&fork_ev_, cudaEventDisableTiming));
  for (int l = 0; l < L; ++l) {
    CK(cudaEventCreateWithFlags(&attn_done_[l], cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&recall_done_[l], cudaEventDisableTiming));
    for (int b = 0; b < NBR; ++b) {
      CK(cudaEventCreateWithFlags(&spec_done_[l][b], cudaEventDisableTiming));
      CK(cudaEventCreateWithFlags(&jobs_ready_[l][b], cudaEventDisableTiming));
    }
  }
  for (int i = 0; i < 2; ++i) {
    CK(cudaEventCreateWithFlags(&copied_[i], cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&buf_free_[i], cudaEventDisableTiming));
  }
  cudaStream_t s = main_;
  hidden_ = A_.Alloc<bf16>(size_t(Bn) * HID);
  xn_ = A_.Alloc<bf16>(size_t(Bn) * HID);
  qkv_ = A_.Alloc<bf16>(size_t(Bn) * QKV);
  attn_bf_ = A_.Alloc<bf16>(size_t(Bn) * Hq * D);
  gu_ = A_.Alloc<bf16>(size_t(Bn) * 2 * FFN);
  act_ = A_.Alloc<bf16>(size_t(Bn) * FFN);
  logits_ = A_.Alloc<bf16>(size_t(Bn) * VOCAB);
  q_now_ = A_.Alloc<float>(size_t(L) * Bn * Hq * D);
  q_prev_ = A_.Alloc<float>(size_t(L) * Bn * Hq * D);
  attn_out_ = A_.Alloc<float>(size_t(Bn) * Hq * D);
  step_ctr_ = A_.Alloc<int>(1);
  tokens_ = A_.Alloc<int>(Bn);
  CK(cudaMemsetAsync(step_ctr_, 0, 4, s));
  std::vector<int> tok(Bn);
  for (int b = 0; b < Bn; ++b) tok[b] = int(HashWord(99, b) % VOCAB);
  CK(cudaMemcpyAsync(tokens_, tok.data(), 4 * Bn, cudaMemcpyHostToDevice, s));
  FillBf16(hidden_, size_t(Bn) * HID, 5, 1.0f, s);
  FillF32(q_prev_, size_t(L) * Bn * Hq * D, 6, 1.0f, s);

  pools_ = A_.Alloc<bf16>(size_t(Bn) * L * SLOTS * PAGE);
  FillBf16(pools_, size_t(Bn) * L * SLOTS * PAGE, 8, 1.0f, s);
  summ_ = A_.Alloc<float>(size_t(Bn) * L * Nfull() * Hkv * 2 * D);
  FillF32(summ_, size_t(Bn) * L * Nfull() * Hkv * 2 * D, 9, 1.0f, s);
  std::vector<bf16*> pp(size_t(L) * Bn), ap(size_t(L) * Bn);
  for (int l = 0; l < L; ++l)
    for (int b = 0; b < Bn; ++b) {
      bf16* pool = pools_ + SeqLayer(b, l) * SLOTS * PAGE;
      pp[size_t(l) * Bn + b] = pool;
      ap[size_t(l) * Bn + b] = pool + size_t(WIN_BASE + (ctx_ / P) % WIN) * PAGE;
    }
  pool_ptrs_ = A_.Alloc<bf16*>(pp.size());
  append_budget_ = A_.Alloc<bf16*>(ap.size());
  CK(cudaMemcpyAsync(pool_ptrs_, pp.data(), pp.size() * sizeof(bf16*), cudaMemcpyHostToDevice, s));
  CK(cudaMemcpyAsync(append_budget_, ap.data(), ap.size() * sizeof(bf16*), cudaMemcpyHostToDevice, s));
  const size_t sl = size_t(Bn) * L;
  selected_ = A_.Alloc<int>(sl * Hkv * K);
  resident_ = A_.Alloc<int>(sl * Hkv * K);
  sel_slot_ = A_.Alloc<int>(sl * Hkv * K);
  job_count_ = A_.Alloc<int>(sl);
  flags_ = A_.Alloc<int>(sl * Hkv);
  jobs_ = A_.Alloc<fc::RecallJob>(sl * Hkv * K);
  CK(cudaMemsetAsync(selected_, 0xFF, sl * Hkv * K * 4, s));  // -1: nothing selected yet
  CK(cudaMemsetAsync(resident_, 0xFF, sl * Hkv * K * 4, s));  // -1: no page resident yet
  CK(cudaMemsetAsync(sel_slot_, 0xFF, sl * Hkv * K * 4, s));
  CK(cudaMemsetAsync(flags_, 0, sl * Hkv * 4, s));
  CK(cudaMemsetAsync(job_count_, 0, sl * 4, s));
  scratch_ = A_.Alloc<float>(size_t(2) * Bn * Hq * std::max(NumCand(), 1));
  tab_slot_ = A_.Alloc<int>(size_t(Bn) * Hkv * SLOTS);
  tab_tokens_ = A_.Alloc<int>(size_t(Bn) * Hkv * SLOTS);
  tab_id_ = A_.Alloc<int>(size_t(Bn) * Hkv * SLOTS);
  tab_num_ = A_.Alloc<int>(size_t(Bn) * Hkv);
  ctr_ = A_.Alloc<unsigned long long>(8);
  CK(cudaMemsetAsync(ctr_, 0, 64, s));
  for (int b = 0; b < Bn; ++b) fc::LaunchAttendTable(Table(b, 0), s);  // valid tables before any attention

  fc::DecodeAttentionParams p{};
  p.batch = Bn, p.q_heads = Hq, p.kv_heads = Hkv, p.head_dim = D, p.page_size = P, p.max_pages = SLOTS;
  attn_ws_bytes_ = fc::DecodeAttentionWorkspaceBytes(p);
  if (attn_ws_bytes_) attn_ws_ = A_.Alloc<char>(attn_ws_bytes_);

  CK(cudaHostAlloc(&jobs_h_, sizeof(fc::RecallJob) * (sl + Bn) * Hkv * K, cudaHostAllocDefault));
  CK(cudaHostAlloc(&counts_h_, sizeof(int) * (sl + Bn), cudaHostAllocDefault));
  CK(cudaHostAlloc(&flags_h_, sizeof(int) * Bn * Hkv, cudaHostAllocDefault));
  geo_.kv_heads = Hkv, geo_.head_dim = D, geo_.page_size = P, geo_.src_page_stride = PAGE_BYTES;
  db_main_ = std::make_unique<fc::DoubleBufferRecall>(HEAD_PAGE, 64);
  db_side_ = std::make_unique<fc::DoubleBufferRecall>(HEAD_PAGE, 64);
  CK(cudaStreamSynchronize(s));
}

void StepBench::Release() {
  dense_A_.FreeAll();
  off_A_.FreeAll();
  A_.FreeAll();
  db_main_.reset();
  db_side_.reset();
  if (jobs_h_) cudaFreeHost(jobs_h_), jobs_h_ = nullptr;
  if (counts_h_) cudaFreeHost(counts_h_), counts_h_ = nullptr;
  if (flags_h_) cudaFreeHost(flags_h_), flags_h_ = nullptr;
  auto ds = [](cudaStream_t& x) { if (x) cudaStreamDestroy(x), x = nullptr; };
  auto de = [](cudaEvent_t& x) { if (x) cudaEventDestroy(x), x = nullptr; };
  ds(main_), ds(copy_), ds(recall_);
  for (int i = 0; i < NBR; ++i) ds(mb_[i]), ds(sb_[i]), de(join_ev_[i]);
  de(fork_ev_);
  for (int l = 0; l < L; ++l) {
    de(attn_done_[l]), de(recall_done_[l]);
    for (int b = 0; b < NBR; ++b) de(spec_done_[l][b]), de(jobs_ready_[l][b]);
  }
  for (int i = 0; i < 2; ++i) de(copied_[i]), de(buf_free_[i]);
}

fc::SelectionParams StepBench::Sel(int b, int l, float* scratch, const int* mask) const {
  fc::SelectionParams p{};
  p.q = q_now_ + (size_t(l) * batch_ + b) * Hq * D;
  p.summaries = summ_ + SeqLayer(b, l) * Nfull() * Hkv * 2 * D;
  p.first_page = FirstCand();
  p.num_candidates = NumCand();
  p.q_heads = Hq, p.kv_heads = Hkv, p.head_dim = D, p.k = K;
  p.combine = fc::kCombineSoftmaxMean;
  p.head_mask = mask;
  p.scratch = scratch;
  p.selected = selected_ + SeqLayer(b, l) * Hkv * K;
  return p;
}

fc::ResidencyParams StepBench::Diff(int b, int l, const int* mask, unsigned long long* ctr) const {
  fc::ResidencyParams p{};
  size_t o = SeqLayer(b, l);
  p.selected = selected_ + o * Hkv * K;
  p.resident = resident_ + o * Hkv * K;
  p.selected_slot = sel_slot_ + o * Hkv * K;
  p.jobs = jobs_ + o * Hkv * K;
  p.job_count = job_count_ + o;
  p.kv_heads = Hkv, p.k = K, p.selected_base = SEL_BASE;
  p.head_mask = mask;
  p.counters = ctr;
  return p;
}

fc::AttendTableParams StepBench::Table(int b, int l) const {
  fc::AttendTableParams p{};
  size_t o = SeqLayer(b, l);
  p.context = ctx_ + 1;
  p.page_size = P, p.sink_pages = SINK, p.window_pages = WIN, p.kv_heads = Hkv;
  p.dense = false;
  p.window_base = WIN_BASE, p.selected_base = SEL_BASE;
  p.selected = selected_ + o * Hkv * K;
  p.selected_slot = sel_slot_ + o * Hkv * K;
  p.k = K;
  p.max_pages = SLOTS;
  p.page_slot = tab_slot_ + size_t(b) * Hkv * SLOTS;
  p.page_tokens = tab_tokens_ + size_t(b) * Hkv * SLOTS;
  p.page_id = tab_id_ + size_t(b) * Hkv * SLOTS;
  p.num_pages = tab_num_ + size_t(b) * Hkv;
  return p;
}

void StepBench::Attention(int l, Mode m, cudaStream_t s) {
  fc::DecodeAttentionParams p{};
  p.q = q_now_ + size_t(l) * batch_ * Hq * D;
  p.out = attn_out_;
  p.batch = batch_, p.q_heads = Hq, p.kv_heads = Hkv, p.head_dim = D, p.page_size = P;
  p.scale = 1.0f / std::sqrt(float(D));
  if (m == kDense || m == kFullOffload) {
    p.pools = m == kDense ? dense_ptrs_ + size_t(l) * batch_ : dense_ptrs_ + size_t(l % 2) * batch_;
    p.page_slot = dtab_slot_, p.page_tokens = dtab_tokens_, p.num_pages = dtab_num_;
    p.max_pages = Npages();
    fc::LaunchDecodeAttention(p, dattn_ws_, dattn_ws_bytes_, s);
  } else {
    p.pools = pool_ptrs_ + size_t(l) * batch_;
    p.page_slot = tab_slot_, p.page_tokens = tab_tokens_, p.num_pages = tab_num_;
    p.max_pages = SLOTS;
    fc::LaunchDecodeAttention(p, attn_ws_, attn_ws_bytes_, s);
  }
}

void StepBench::Fork(cudaStream_t from, cudaStream_t* to, int n) {
  CK(cudaEventRecord(fork_ev_, from));
  for (int i = 0; i < n; ++i) CK(cudaStreamWaitEvent(to[i], fork_ev_, 0));
}

void StepBench::Join(cudaStream_t* from, int n, cudaStream_t to) {
  for (int i = 0; i < n; ++i) {
    CK(cudaEventRecord(join_ev_[i], from[i]));
    CK(cudaStreamWaitEvent(to, join_ev_[i], 0));
  }
}

void StepBench::CopyJobsToHost(int b, int l, fc::RecallJob* jobs_h, int* count_h, cudaStream_t s) {
  size_t o = SeqLayer(b, l);
  CK(cudaMemcpyAsync(count_h, job_count_ + o, 4, cudaMemcpyDeviceToHost, s));
  CK(cudaMemcpyAsync(jobs_h, jobs_ + o * Hkv * K, sizeof(fc::RecallJob) * Hkv * K, cudaMemcpyDeviceToHost, s));
}

void StepBench::StartWorker() {
  for (int l = 0; l < L; ++l) enqueued_[l] = -1;
  stop_ = false;
  worker_error_.clear();
  worker_ = std::thread([this] {
    for (;;) {
      RecallTask t;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !tasks_.empty(); });
        if (tasks_.empty()) return;
        t = tasks_.front();
        tasks_.pop();
      }
      try {
        for (int b = 0; b < batch_; ++b) {
          CK(cudaEventSynchronize(jobs_ready_[t.layer][b]));
          size_t o = SeqLayer(b, t.layer);
          int n = counts_h_[o];
          // the speculative recall may run while the main stream attends other layers: it writes
          // only slots that layer t.layer's attention no longer reads (the diff frees slots whose
          // pages left the selection), and main waits recall_done before that layer's next use.
          db_side_->Run(StoreHost(b, t.layer), geo_, jobs_h_ + o * Hkv * K, n, pools_ + o * SLOTS * PAGE, recall_);
        }
        CK(cudaEventRecord(recall_done_[t.layer], recall_));
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lk(mu_);
        worker_error_ = e.what();
      }
      {
        std::lock_guard<std::mutex> lk(mu_);
        enqueued_[t.layer] = t.step;
      }
      cv_.notify_all();
    }
  });
}

void StepBench::StopWorker() {
  if (!worker_.joinable()) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

// Enqueues one decode step of mode m on main_ (and its branch streams).
void StepBench::Step(Mode m, bool capturing) {
  const int Bn = batch_, nb = std::min(Bn, NBR);
  cudaStream_t s = main_;
  const long step = step_no_++;
  AdvanceStep(step_ctr_, s);
  StepInput(W_.lm, tokens_, step_ctr_, 4242, input_a, 0.0115f, hidden_, Bn, HID, s);
  const bool spec = m == kGather || m == kMemcpy;
  const int gather_blocks = std::max(1, 8 / Bn);
  if (m == kFullOffload) {  // prefetch layer 0
    CK(cudaStreamWaitEvent(copy_, buf_free_[0], 0));
    CK(cudaMemcpyAsync(dense_, H_.host, size_t(Bn) * Npages() * PAGE_BYTES, cudaMemcpyHostToDevice, copy_));
    CK(cudaEventRecord(copied_[0], copy_));
  }
  for (int l = 0; l < L; ++l) {
    RmsNorm(hidden_, W_.n1[l], xn_, Bn, HID, 1e-5f, s);
    freekv::cuda::GemmBf16(xn_, W_.wqkv[l], qkv_, Bn, QKV, HID, s);
    if (spec && !capturing && step > mode_first_step_) {  // the speculative work of the previous step for layer l
      if (m == kGather) {
        for (int b = 0; b < Bn; ++b) CK(cudaStreamWaitEvent(s, spec_done_[l][b % NBR], 0));
      } else {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return enqueued_[l] >= step - 1; });
        if (!worker_error_.empty()) throw std::runtime_error("recall thread: " + worker_error_);
        lk.unlock();
        CK(cudaStreamWaitEvent(s, recall_done_[l], 0));
      }
    }
    if (m == kFullOffload) CK(cudaStreamWaitEvent(s, copied_[l % 2], 0));
    bf16** app = m == kDense ? append_dense_ + size_t(l) * Bn
                 : m == kFullOffload ? append_dense_ + size_t(l % 2) * Bn
                                     : append_budget_ + size_t(l) * Bn;
    float* qn = q_now_ + size_t(l) * Bn * Hq * D;
    RopeAppend(qkv_, qn, ctx_, app, Row(), Bn, Hq, Hkv, D, P, 500000.f, s);

    switch (m) {
      case kDense:
      case kFullOffload:
      case kModelOnly:
        break;
      case kSparse:
        Fork(s, mb_, nb);
        for (int b = 0; b < Bn; ++b) {
          cudaStream_t bs = mb_[b % NBR];
          fc::LaunchSelection(Sel(b, l, scratch_ + size_t(b) * Hq * NumCand(), nullptr), bs);
          fc::LaunchResidencyDiff(Diff(b, l, nullptr, ctr_), bs);
          fc::LaunchAttendTable(Table(b, l), bs);
        }
        Join(mb_, nb, s);
        break;
      case kGather:
        Fork(s, mb_, nb);
        for (int b = 0; b < Bn; ++b) {
          cudaStream_t bs = mb_[b % NBR];
          size_t o = SeqLayer(b, l);
          int* fl = flags_ + o * Hkv;
          fc::LaunchCorrectionCheck(qn + size_t(b) * Hq * D, q_prev_ + (size_t(l) * Bn + b) * Hq * D, Hq, Hkv, D, TAU,
                                    fl, ctr_ + 6, bs);
          fc::LaunchSelection(Sel(b, l, scratch_ + size_t(b) * Hq * NumCand(), fl), bs);
          fc::LaunchResidencyDiff(Diff(b, l, fl, ctr_), bs);
          fc::LaunchRecallGather(StoreDev(b, l), geo_, jobs_ + o * Hkv * K, job_count_ + o, Hkv * K,
                                 pools_ + o * SLOTS * PAGE, gather_blocks, bs);
          fc::LaunchAttendTable(Table(b, l), bs);
        }
        Join(mb_, nb, s);
        break;
      case kMemcpy: {
        // the paper's correction: flags read back by the host every layer
        Fork(s, mb_, nb);
        for (int b = 0; b < Bn; ++b) {
          cudaStream_t bs = mb_[b % NBR];
          int* fl = flags_ + SeqLayer(b, l) * Hkv;
          fc::LaunchCorrectionCheck(qn + size_t(b) * Hq * D, q_prev_ + (size_t(l) * Bn + b) * Hq * D, Hq, Hkv, D, TAU,
                                    fl, ctr_ + 6, bs);
          CK(cudaMemcpyAsync(flags_h_ + b * Hkv, fl, 4 * Hkv, cudaMemcpyDeviceToHost, bs));
        }
        Join(mb_, nb, s);
        CK(cudaStreamSynchronize(s));
        std::vector<int> flagged;
        for (int b = 0; b < Bn; ++b)
          for (int h = 0; h < Hkv; ++h)
            if (flags_h_[b * Hkv + h]) { flagged.push_back(b); break; }
        if (!flagged.empty()) {
          Fork(s, mb_, nb);
          for (int b : flagged) {
            cudaStream_t bs = mb_[b % NBR];
            int* fl = flags_ + SeqLayer(b, l) * Hkv;
            fc::LaunchSelection(Sel(b, l, scratch_ + size_t(b) * Hq * NumCand(), fl), bs);
            fc::LaunchResidencyDiff(Diff(b, l, fl, ctr_), bs);
            CopyJobsToHost(b, l, jobs_h_ + (size_t(L) * Bn + b) * Hkv * K, counts_h_ + size_t(L) * Bn + b, bs);
          }
          Join(mb_, nb, s);
          CK(cudaStreamSynchronize(s));
          for (int b : flagged)
            db_main_->Run(StoreHost(b, l), geo_, jobs_h_ + (size_t(L) * Bn + b) * Hkv * K, counts_h_[size_t(L) * Bn + b],
                          pools_ + SeqLayer(b, l) * SLOTS * PAGE, s);
        }
        Fork(s, mb_, nb);
        for (int b = 0; b < Bn; ++b) fc::LaunchAttendTable(Table(b, l), mb_[b % NBR]);
        Join(mb_, nb, s);
        break;
      }
      case kArkVale: {
        Fork(s, mb_, nb);
        for (int b = 0; b < Bn; ++b) {
          cudaStream_t bs = mb_[b % NBR];
          fc::LaunchSelection(Sel(b, l, scratch_ + size_t(b) * Hq * NumCand(), nullptr), bs);
          fc::LaunchResidencyDiff(Diff(b, l, nullptr, ctr_), bs);
          CopyJobsToHost(b, l, jobs_h_ + (size_t(L) * Bn + b) * Hkv * K, counts_h_ + size_t(L) * Bn + b, bs);
        }
        Join(mb_, nb, s);
        CK(cudaStreamSynchronize(s));
        for (int b = 0; b < Bn; ++b)
          db_main_->Run(StoreHost(b, l), geo_, jobs_h_ + (size_t(L) * Bn + b) * Hkv * K, counts_h_[size_t(L) * Bn + b],
                        pools_ + SeqLayer(b, l) * SLOTS * PAGE, s);
        Fork(s, mb_, nb);
        for (int b = 0; b < Bn; ++b) fc::LaunchAttendTable(Table(b, l), mb_[b % NBR]);
        Join(mb_, nb, s);
        break;
      }
      default:
        break;
    }

    if (m != kModelOnly) Attention(l, m, s);
    if (m == kFullOffload) {
      CK(cudaEventRecord(buf_free_[l % 2], s));
      if (l + 1 < L) {  // prefetch layer l + 1 into the other buffer once layer l - 1's attention is done
        int nbuf = (l + 1) % 2;
        CK(cudaStreamWaitEvent(copy_, buf_free_[nbuf], 0));
        CK(cudaMemcpyAsync(dense_ + size_t(nbuf) * Bn * Npages() * PAGE, H_.host, size_t(Bn) * Npages() * PAGE_BYTES,
                           cudaMemcpyHostToDevice, copy_));
        CK(cudaEventRecord(copied_[nbuf], copy_));
      }
    }
    if (spec) {  // speculative selection + recall for step t+1 of this layer, after its attention
      CK(cudaEventRecord(attn_done_[l], s));
      for (int b = 0; b < Bn; ++b) {
        cudaStream_t ss = sb_[b % NBR];
        size_t o = SeqLayer(b, l);
        if (b < NBR) CK(cudaStreamWaitEvent(ss, attn_done_[l], 0));
        fc::LaunchSelection(Sel(b, l, scratch_ + size_t(Bn + b) * Hq * NumCand(), nullptr), ss);
        fc::LaunchResidencyDiff(Diff(b, l, nullptr, ctr_ + 3), ss);
        if (m == kGather)
          fc::LaunchRecallGather(StoreDev(b, l), geo_, jobs_ + o * Hkv * K, job_count_ + o, Hkv * K,
                                 pools_ + o * SLOTS * PAGE, gather_blocks, ss);
        else
          CopyJobsToHost(b, l, jobs_h_ + o * Hkv * K, counts_h_ + o, ss);
        CK(cudaMemcpyAsync(q_prev_ + (size_t(l) * Bn + b) * Hq * D, qn + size_t(b) * Hq * D, sizeof(float) * Hq * D,
                           cudaMemcpyDeviceToDevice, ss));
        if (m == kMemcpy) CK(cudaEventRecord(jobs_ready_[l][b], ss));
        if (b + NBR >= Bn) CK(cudaEventRecord(spec_done_[l][b % NBR], ss));
      }
      if (m == kMemcpy) {
        {
          std::lock_guard<std::mutex> lk(mu_);
          tasks_.push({l, step});
        }
        cv_.notify_all();
      }
    }
    F32ToBf16(attn_out_, attn_bf_, size_t(Bn) * Hq * D, s);
    freekv::cuda::GemmBf16(attn_bf_, W_.wo[l], hidden_, Bn, HID, HID, s, 1.f, 1.f);
    RmsNorm(hidden_, W_.n2[l], xn_, Bn, HID, 1e-5f, s);
    freekv::cuda::GemmBf16(xn_, W_.wgu[l], gu_, Bn, 2 * FFN, HID, s);
    SwiGLU(gu_, act_, Bn, FFN, s);
    freekv::cuda::GemmBf16(act_, W_.wd[l], hidden_, Bn, HID, FFN, s, 1.f, 1.f);
  }
  RmsNorm(hidden_, W_.nf, xn_, Bn, HID, 1e-5f, s);
  freekv::cuda::GemmBf16(xn_, W_.lm, logits_, Bn, VOCAB, HID, s);
  if (spec && capturing) Join(sb_, nb, s);  // a captured step ends with its side work joined
}

Json StepBench::RunMode(Mode m, const std::string& label) {
  Json j = Json::Obj();
  j.Set("context", ctx_).Set("batch", batch_).Set("mode", label).Set("input_cosine", double(input_a) * input_a);
  const int Bn = batch_;
  cudaStream_t s = main_;
  if (m == kDense || m == kFullOffload) {
    dense_A_.FreeAll();
    const int np = Npages();
    size_t per_seq_layer = size_t(np) * PAGE;
    int layers_held = m == kDense ? L : 2;
    dense_ = dense_A_.Alloc<bf16>(size_t(layers_held) * Bn * per_seq_layer);
    if (m == kDense) FillBf16(dense_, size_t(layers_held) * Bn * per_seq_layer, 10, 1.0f, s);
    std::vector<bf16*> pp(size_t(layers_held) * Bn), ap(pp.size());
    for (int l = 0; l < layers_held; ++l)
      for (int b = 0; b < Bn; ++b) {
        bf16* pool = m == kDense ? dense_ + SeqLayer(b, l) * per_seq_layer : dense_ + (size_t(l) * Bn + b) * per_seq_layer;
        pp[size_t(l) * Bn + b] = pool;
        ap[size_t(l) * Bn + b] = pool + size_t(ctx_ / P) * PAGE;
      }
    dense_ptrs_ = dense_A_.Alloc<bf16*>(pp.size());
    append_dense_ = dense_A_.Alloc<bf16*>(ap.size());
    CK(cudaMemcpyAsync(dense_ptrs_, pp.data(), pp.size() * sizeof(bf16*), cudaMemcpyHostToDevice, s));
    CK(cudaMemcpyAsync(append_dense_, ap.data(), ap.size() * sizeof(bf16*), cudaMemcpyHostToDevice, s));
    dtab_slot_ = dense_A_.Alloc<int>(size_t(Bn) * Hkv * np);
    dtab_tokens_ = dense_A_.Alloc<int>(size_t(Bn) * Hkv * np);
    dtab_id_ = dense_A_.Alloc<int>(size_t(Bn) * Hkv * np);
    dtab_num_ = dense_A_.Alloc<int>(size_t(Bn) * Hkv);
    for (int b = 0; b < Bn; ++b) {
      fc::AttendTableParams t{};
      t.context = ctx_ + 1, t.page_size = P, t.kv_heads = Hkv, t.dense = true, t.max_pages = np;
      t.page_slot = dtab_slot_ + size_t(b) * Hkv * np, t.page_tokens = dtab_tokens_ + size_t(b) * Hkv * np;
      t.page_id = dtab_id_ + size_t(b) * Hkv * np, t.num_pages = dtab_num_ + size_t(b) * Hkv;
      fc::LaunchAttendTable(t, s);
    }
    fc::DecodeAttentionParams p{};
    p.batch = Bn, p.q_heads = Hq, p.kv_heads = Hkv, p.head_dim = D, p.page_size = P, p.max_pages = np;
    dattn_ws_bytes_ = fc::DecodeAttentionWorkspaceBytes(p);
    dattn_ws_ = dattn_ws_bytes_ ? dense_A_.Alloc<char>(dattn_ws_bytes_) : nullptr;
    for (int i = 0; i < 2; ++i) CK(cudaEventRecord(buf_free_[i], s));
    CK(cudaStreamSynchronize(s));
  }
  mode_first_step_ = step_no_;
  if (m == kMemcpy) StartWorker();
  const bool graph = m == kDense || m == kSparse || m == kGather || m == kModelOnly;
  j.Set("cuda_graph", Json::Bool(graph));
  cudaGraphExec_t exec = nullptr;
  auto run_one = [&] {
    if (graph) CK(cudaGraphLaunch(exec, s));
    else Step(m, false);
  };
  try {
    double t0 = WallSeconds();
    Step(m, false);  // eager warm-up: GEMM plans, selection state, first recalls
    CK(cudaDeviceSynchronize());
    double first_s = WallSeconds() - t0;
    if (graph) {
      cudaGraph_t g;
      CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
      Step(m, true);
      CK(cudaStreamEndCapture(s, &g));
      CK(cudaGraphInstantiate(&exec, g, 0));
      size_t nodes = 0;
      CK(cudaGraphGetNodes(g, nullptr, &nodes));
      CK(cudaGraphDestroy(g));
      j.Set("graph_nodes", double(nodes));
    }
    double probe_s = first_s;
    if (first_s < 2.0) {  // a probe step (steady state: the warm-up filled the slots) sizes the timing
      t0 = WallSeconds();
      run_one();
      CK(cudaDeviceSynchronize());
      probe_s = WallSeconds() - t0;
      j.Set("probe_step_s", probe_s);
    }
    int warm = probe_s > 1.0 ? 0 : 2, reps = probe_s > 2.0 ? 1 : probe_s > 1.0 ? 2 : probe_s > 0.2 ? 4 : 12;
    for (int i = 0; i < warm; ++i) run_one();
    CK(cudaStreamSynchronize(s));
    if (m == kMemcpy) {  // drain the recall thread's queue before counting
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return tasks_.empty(); });
    }
    CK(cudaDeviceSynchronize());
    CK(cudaMemset(ctr_, 0, 64));
    std::vector<double> t;
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < reps; ++i) {
      CK(cudaEventRecord(a, s));
      run_one();
      CK(cudaEventRecord(b, s));
      CK(cudaEventSynchronize(b));
      float ms;
      CK(cudaEventElapsedTime(&ms, a, b));
      t.push_back(ms);
    }
    CK(cudaDeviceSynchronize());
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    std::sort(t.begin(), t.end());
    unsigned long long c[8];
    CK(cudaMemcpy(c, ctr_, 64, cudaMemcpyDeviceToHost));
    std::vector<bf16> lg(size_t(Bn) * VOCAB);
    CK(cudaMemcpy(lg.data(), logits_, lg.size() * 2, cudaMemcpyDeviceToHost));
    bool finite = true;
    for (size_t i = 0; i < lg.size() && finite; i += 7) finite = std::isfinite(__bfloat162float(lg[i]));
    double ms = t[t.size() / 2];
    j.Set("ms", ms).Set("min_ms", t.front()).Set("max_ms", t.back()).Set("reps", reps).Set("first_step_s", first_s);
    j.Set("floor_ms", FloorMs(m)).Set("ratio_to_floor", ms / FloorMs(m));
    j.Set("kv_attended_bytes", KvAttendedBytes(m)).Set("weight_bytes", W_.bytes);
    j.Set("logits_finite", Json::Bool(finite));
    double per_step = 1.0 / reps, groups = double(Bn) * L * Hkv;
    if (m != kDense && m != kFullOffload && m != kModelOnly) {
      double main_miss = c[2] * per_step, spec_miss = c[5] * per_step;
      j.Set("selected_pages_per_step", (c[0] + c[3]) * per_step);
      j.Set("recalled_head_pages_per_step", m == kSparse ? 0.0 : main_miss + spec_miss);
      j.Set("misses_on_critical_path_per_step", m == kSparse ? 0.0 : main_miss);
      j.Set("speculative_misses_per_step", spec_miss);
      j.Set("recall_MB_per_step", (m == kSparse ? 0.0 : main_miss + spec_miss) * HEAD_PAGE / 1e6);
      if (m == kSparse) j.Set("would_recall_head_pages_per_step", main_miss);
      if (m == kGather || m == kMemcpy) j.Set("corrected_group_fraction", c[6] * per_step / groups);
    }
    if (m == kFullOffload) j.Set("recall_MB_per_step", double(Bn) * L * Npages() * PAGE_BYTES / 1e6);
  } catch (...) {
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(s, &cs) == cudaSuccess && cs != cudaStreamCaptureStatusNone) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(s, &g);  // leave the stream usable for the next mode
      if (g) cudaGraphDestroy(g);
    }
    cudaGetLastError();
    if (exec) cudaGraphExecDestroy(exec);
    if (m == kMemcpy) StopWorker();
    throw;
  }
  if (exec) CK(cudaGraphExecDestroy(exec));
  if (m == kMemcpy) StopWorker();
  if (m == kDense || m == kFullOffload) dense_A_.FreeAll();
  return j;
}

}  // namespace

void RunDecodeStep(Bench& B) {
  std::string why;
  if (!freekv::cuda::CublasLtAvailable(&why)) throw std::runtime_error(why);
  Arena WA;
  Weights W;
  InitWeights(WA, W, B.stream);
  CK(cudaStreamSynchronize(B.stream));
  HostPool H;
  const size_t pool_bytes = (size_t(8) << 30) + (size_t(64) << 20);
  H.Init(pool_bytes);
  Json sec = Json::Obj(), cases = Json::Arr();
  sec.Set("weights_GB", W.bytes / 1e9).Set("host_pool_GiB", pool_bytes / double(1 << 30));
  sec.Set("host_pool_fill_s", H.fill_s).Set("host_pool_register_s", H.register_s);
  sec.Set("hbm_GBps_used_for_floor", B.hbm_gbs).Set("tau", TAU);
  std::vector<std::pair<int, int>> configs = {{32768, 1}, {32768, 4}, {32768, 16}, {131072, 1}, {131072, 4}, {131072, 16}};
  if (B.quick) configs = {{32768, 1}, {32768, 4}};
  // Per config: the model alone (GEMMs with cuBLASLt's first heuristic, then autotuned), then
  // every mode at the primary input similarity, then the modes whose recall volume depends on the
  // similarity at two more levels (labelled mode@cos<level>).
  const Mode order[] = {kSparse, kGather, kMemcpy, kArkVale, kDense, kFullOffload};
  const Mode churn_modes[] = {kSparse, kGather, kMemcpy, kArkVale};
  const float extra_a[] = {0.95f, 0.998f};
  sec.Set("primary_input_cosine", 0.99 * 0.99).Set("gemm_autotune", "model_only_heuristic: cuBLASLt's first heuristic; every other row: autotuned (fastest of 8 heuristics, timed)");
  try {
    for (int pass = 0; pass < 2; ++pass)
    for (auto [ctx, batch] : configs) {
      StepBench sb(B, W, H, ctx, batch);
      try {
        sb.Setup();
      } catch (const std::exception& e) {
        Json j = Json::Obj();
        j.Set("context", ctx).Set("batch", batch).Set("mode", "setup").Set("error", e.what());
        cases.Push(j);
        std::cout << "[step] setup " << ctx << "x" << batch << " failed: " << e.what() << std::endl;
        cudaGetLastError();
        continue;
      }
      struct Job { Mode m; float a; std::string label; bool autotune; };
      std::vector<Job> jobs;
      if (pass == 0) {
        jobs.push_back({kModelOnly, 0.99f, "model_only_heuristic", false});
        jobs.push_back({kModelOnly, 0.99f, "model_only", true});
        for (Mode m : order) jobs.push_back({m, 0.99f, kModeName[m], true});
      }
      if (pass == 1)
        for (float a : extra_a)
        for (Mode m : churn_modes) {
          char lab[64];
          snprintf(lab, sizeof lab, "%s@cos%.3f", kModeName[m], double(a) * a);
          jobs.push_back({m, a, lab, true});
        }
      for (const Job& jb : jobs) {
        Mode m = jb.m;
        Json j;
        double est_s = m == kFullOffload ? 4.0 * batch * double(ctx) * 4096 * L / (B.pcie_gbs * 1e9) : 3.0;
        if (m == kDense && !sb.DenseFits()) {
          j = Json::Obj();
          j.Set("context", ctx).Set("batch", batch).Set("mode", jb.label).Set("skipped", "does not fit in GPU memory");
        } else if (!B.TimeLeft(est_s + 5)) {
          j = Json::Obj();
          j.Set("context", ctx).Set("batch", batch).Set("mode", jb.label).Set("skipped", "out of time");
        } else {
          try {
            freekv::cuda::SetGemmAutotune(jb.autotune);
            sb.input_a = jb.a;
            j = sb.RunMode(m, jb.label);
          } catch (const std::exception& e) {
            j = Json::Obj();
            j.Set("context", ctx).Set("batch", batch).Set("mode", jb.label).Set("error", e.what());
            cudaGetLastError();
            cudaDeviceSynchronize();
            cudaGetLastError();
          }
        }
        cases.Push(j);
        sec.Set("cases", cases);
        B.json.Set("step", sec);
        B.Save();
        std::string dump = j.Dump();
        for (char& ch : dump) if (ch == '\n') ch = ' ';
        std::cout << "[step] " << dump << std::endl;
      }
    }
  } catch (...) {
    H.Release();
    throw;
  }
  H.Release();
  sec.Set("cases", cases);
  B.json.Set("step", sec);
}

}  // namespace fkbench
