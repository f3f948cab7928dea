// The device-engine interface: what a backend with its own device and streams (CUDA) offers on
// top of the Engine contract, for the GPU model runner (model/cuda/) and the binding's step
// statistics. Engine::device() returns it, or null on backends without device steps (CPU).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/Engine.h"

namespace freekv {
namespace cuda {
class StepGraph;
}

// How the device steps of an engine were issued (see native/src/cuda/step_graph.cuh).
struct DeviceStepStats {
  uint64_t steps = 0;     // device steps
  uint64_t direct = 0;    // issued op by op (graphs off, a step with a host round trip, a new shape)
  uint64_t captures = 0;  // captured into a new CUDA graph
  uint64_t updates = 0;   // captured and updated into a cached graph of the same op sequence
  uint64_t replays = 0;   // one launch of a cached graph
  uint64_t ops = 0;       // stream operations of the last step
  double capture_ms = 0;  // host time of all captures and updates
  // Per step, summed: host time from BeginDeviceStep until the step is issued (the host's own
  // work, plus the launches themselves when direct), and the device time from the step's first
  // operation to its last on the main stream (when direct, device idle time waiting for the host's
  // launches included).
  double host_ms = 0;
  double device_ms = 0;
  // Host time after the graph launch, summed per step: issuing the side stream's speculative work
  // (graphed steps), the step's one wait for the main stream, and the bookkeeping after that wait
  // (manifest words and query records).
  double side_issue_ms = 0;
  double wait_ms = 0;
  double finish_ms = 0;
  // Host time copying each step's results (logits) out of the pinned buffer the device wrote.
  double result_ms = 0;
  // With the engine option side_timing only (a diagnostic: the host then waits for the previous
  // step's side-stream work before issuing the next): device time of each graphed step's
  // side-stream work, from its issue (the side stream idle) until its last op, summed, and the
  // steps timed.
  double side_ms = 0;
  uint64_t side_steps = 0;
};

class DeviceEngine {
 public:
  virtual ~DeviceEngine() = default;

  // The GPU model runner's decode step: BeginDeviceStep(sessions) sizes the step's buffers; then
  // DecodeDevice(layer, ...) for every layer in order, with q [B][q_heads][head_dim], k, v
  // [B][kv_heads][head_dim] and out [B][q_heads][head_dim] fp32 in device memory
  // (B = sessions.size(), in that order); each call only queues work on DeviceStream() and
  // returns: no host round trip inside the step. EndDeviceStep() waits for the stream once and
  // then writes the manifests (tokens, query records), so the host store never claims work the
  // device has not finished.
  virtual void BeginDeviceStep(const std::vector<int>& sessions) = 0;
  virtual void DecodeDevice(int layer, const float* q, const float* k, const float* v, float* out) = 0;
  virtual void EndDeviceStep() = 0;
  // The stream a device step is ordered on (a cudaStream_t).
  virtual void* DeviceStream() = 0;
  // While a step is open, the runner queues its own stream work through this (so the whole step,
  // the runner's GEMMs and kernels included, becomes one CUDA graph when graphs are on).
  virtual cuda::StepGraph* DeviceStepGraph() = 0;
  virtual DeviceStepStats GetDeviceStepStats() const = 0;

  // The GPU model runner's prefill of one layer: Engine::PrefillAttend with q [n][q_heads][head_dim],
  // k, v [n][kv_heads][head_dim] and out [n][q_heads][head_dim] fp32 in device memory, ordered on
  // DeviceStream(). It only queues work: the layer's context stays on the device between chunks
  // (no gather back from the host store), and the pages that fill are offloaded to the host store
  // on a copy stream that overlaps the next layers. FinishDevicePrefill(session) waits for that
  // work and then writes the manifest of every layer prefilled since (tokens, query records), so
  // the host store never claims pages the device has not written. tensor_cores: the attention on
  // tensor cores (attention_prefill_flash.cuh; q and the softmax weights rounded to bf16 before
  // their products, as FlashAttention does, about 2e-3 relative from exact) where the head
  // dimension allows, for bf16 models; otherwise the exact fp32 kernel of PrefillAttend.
  // out_bf16 (optional, device memory of n * q_heads * head_dim bf16): where the tensor-core kernel
  // runs, it writes its output there instead of `out`, rounded to nearest even as the fp32 output
  // would be by a later conversion (the same bits), so the model's next GEMM reads it directly and
  // the fp32 output, its write and the conversion's pass are skipped. Returns whether it did; when
  // false, `out` holds the output as usual.
  // q_bf16 (optional, device memory of n * q_heads * head_dim bf16, only where
  // PrefillTakesBf16Queries): the queries already rounded to bf16 (nearest even), which the
  // tensor-core kernel reads instead of converting q; q then needs only its last row (kept for the
  // first decode step's speculative selection).
  // attend_rows (-1: all n): only the run's last attend_rows queries are attended, and only those
  // rows of the output are written; every token's k and v are appended, summarised and offloaded
  // as always. A model's last layer needs the attention of no row but the one whose logits are
  // read (its other rows' outputs feed nothing), so a prompt's pass over it attends 1 row or 0.
  virtual bool PrefillDevice(int session, int layer, const float* q, const float* k, const float* v, int n,
                             float* out, bool tensor_cores, void* out_bf16, const void* q_bf16 = nullptr,
                             int attend_rows = -1) = 0;
  // Whether PrefillDevice with tensor_cores runs the tensor-core kernel for this head dimension
  // (and so takes q_bf16).
  virtual bool PrefillTakesBf16Queries(int head_dim) const = 0;
  // Prompt tokens whose tensor-core prefill attention fills the device's SMs once (whole row tiles
  // of every KV head); 1 where PrefillTakesBf16Queries is false.
  virtual int PrefillWaveTokens(int q_heads, int kv_heads, int head_dim) const = 0;
  virtual void FinishDevicePrefill(int session) = 0;
  // Registers the session's host store for the device up to `tokens` of context (within its
  // reservation), ahead of need: the runner calls it while the device runs a prefill chunk, for
  // the pages the next chunk will fill, so the registration (pinning ~0.4 s per GB) overlaps
  // device work instead of preceding the first token. The engine registers what it touches anyway.
  virtual void RegisterAhead(int session, int64_t tokens) = 0;
};

// Options of the CUDA backend.
struct CudaEngineOptions {
  int device = 0;
  // Device steps become CUDA graphs (replayed once their shape repeats); off: every op of a step
  // is issued directly (the same operations in the same order, bit-identical results).
  bool graphs = true;
  // Diagnostic: time each graphed step's side-stream work (DeviceStepStats::side_ms). The host
  // then waits for the previous step's side-stream work before issuing the next.
  bool side_timing = false;
  // Device memory the resident prefill contexts of all sessions may hold (CudaPrefill.cu); a
  // layer that does not fit is prefilled by gathering its earlier pages from the host store at
  // every chunk instead. 0: a quarter of the device's memory.
  size_t prefill_context_bytes = 0;
  // Hierarchical page selection (engine/Hierarchy.h, cuda/selection.cuh): Auto goes through the
  // group bounds above 16384 candidate pages (CudaDecode.cu has the measurement); with the
  // softmax-mean combine and several query heads per KV head every selection scans every page.
  HierarchicalSelection hierarchical = HierarchicalSelection::Auto;
};

// Defined in builds with the CUDA backend only (FREEKV_WITH_CUDA). Throws
// std::runtime_error("no CUDA device: ...") when no device is usable.
std::unique_ptr<Engine> MakeCudaEngine(const CudaEngineOptions& options);

}  // namespace freekv
