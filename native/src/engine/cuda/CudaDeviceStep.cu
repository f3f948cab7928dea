// The GPU model runner's decode step on the CUDA engine (DeviceEngine): BeginDeviceStep,
// DecodeDevice per layer, EndDeviceStep; every layer's inputs and outputs stay on the device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "CudaEngine.h"
#include "batch_copy.cuh"
#include "cuda/cuda_check.cuh"

namespace freekv::cuda {

using std::to_string;

void CudaEngine::BeginDeviceStep(const std::vector<int>& sessions) {
  auto lock = LockOutsideStep("BeginDeviceStep");  // one open step per engine
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  if (sessions.empty()) throw std::invalid_argument("sessions must not be empty");
  std::vector<Session*> ss = CheckBatch(0, sessions);
  for (Session* s : ss) EndPrefill(*s);  // decoding: the prefill context is no longer needed
  const Geometry& g = ss[0]->geo;
  for (int i = 0; i < (int)ss.size(); ++i)
    if (ss[i]->geo.layers != g.layers)
      throw std::invalid_argument("items[" + to_string(i) + "]: session " + to_string(sessions[i]) +
                                  " has a different number of layers from the batch's first session");
  const int B = (int)ss.size(), NL = g.layers;
  cudaStream_t st = main_->get();
  // Everything the step's layers use is sized here, once, while the main stream is idle.
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  int rows = 1;
  for (int l = 0; l < NL; ++l) rows = std::max(rows, BatchRows(ss, l));
  SizeBatchBuffers(*ss[0], B, rows);
  SizeDescTables(B, NL, NL);  // a pinned region per layer: the host does not wait between layers
  // The step's pointer table: [NL][B] pools, then [NL][B] query-record payloads (mapped manifest
  // memory) that the step's queries go to. Each payload is the layer's record that
  // WriteQueryRecord fills next, not the latest one, so a process that dies mid-step leaves the
  // record matching the committed context intact.
  step_ptrs_pin_.Resize((size_t)2 * NL * B * sizeof(void*));
  step_ptrs_.Resize((size_t)2 * NL * B * sizeof(void*));
  auto** hp = reinterpret_cast<const void**>(step_ptrs_pin_.get());
  for (int l = 0; l < NL; ++l)
    for (int i = 0; i < B; ++i) {
      const Session& s = *ss[i];
      const int next = (int)((s.layers[l]->record_seq + 1) % 2);
      hp[(size_t)l * B + i] = s.layers[l]->pool.get();
      hp[(size_t)(NL + l) * B + i] = s.manifest_dev + s.layout.manifest_query_offset +
                                     (2 * (size_t)l + next) * s.layout.manifest_query_record_bytes +
                                     sizeof(ManifestQueryRecord);
    }
  // Graphed unless turned off or a session's recall needs the host inside the step (double buffer).
  bool graphed = graphs_;
  for (const Session* s : ss)
    graphed = graphed && (s->cfg.recall == RecallMode::Gather || s->cfg.mode == Mode::ResidentSparse);
  graph_.Begin(graphed, st);
  graph_.Op(st, MemcpyOp, static_cast<void*>(step_ptrs_.get()), static_cast<const void*>(step_ptrs_pin_.get()),
            (size_t)2 * NL * B * sizeof(void*), cudaMemcpyHostToDevice);
  step_sessions_ = sessions;
  step_layers_done_ = 0;
  step_open_ = true;
  step_thread_ = std::this_thread::get_id();
}

void CudaEngine::DecodeDevice(int layer, const float* q, const float* k, const float* v, float* out) {
  std::lock_guard<std::mutex> lock(mu_);
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  if (!step_open_ || step_thread_ != std::this_thread::get_id())
    throw std::logic_error("DecodeDevice: no device step is open on this thread (call BeginDeviceStep first)");
  if (layer != step_layers_done_)
    throw std::invalid_argument("DecodeDevice: layer " + to_string(layer) + " out of order (expected " +
                                to_string(step_layers_done_) + ")");
  if (!q || !k || !v || !out) throw std::invalid_argument("DecodeDevice: q, k, v and out must not be null");
  const std::vector<Session*> ss = CheckBatch(layer, step_sessions_);
  const int B = (int)ss.size();
  const size_t qs = (size_t)ss[0]->geo.q_heads * ss[0]->geo.head_dim;
  const auto* pools = reinterpret_cast<const bf16* const*>(step_ptrs_.get()) + (size_t)layer * B;
  DecodeCore(layer, ss, q, k, v, out, pools, layer);
  // This layer's queries, straight into the payloads of the manifest's next query records (their
  // headers are written at the end of the step, after the wait).
  const int NL = ss[0]->geo.layers;
  graph_.Op(main_->get(), LaunchScatterRows, q,
            reinterpret_cast<float* const*>(step_ptrs_.get()) + (size_t)(NL + layer) * B, B, (int)qs);
  step_layers_done_ = layer + 1;
}

void CudaEngine::EndDeviceStep() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!step_open_) return;
  if (step_thread_ != std::this_thread::get_id())
    throw std::logic_error("EndDeviceStep: the open device step belongs to another thread");
  step_open_ = false;
  struct Notify {  // other threads' calls waiting in LockOutsideStep go on, however this ends
    std::condition_variable& cv;
    ~Notify() { cv.notify_all(); }
  } notify{step_cv_};
  FKV_CUDA_CHECK(cudaSetDevice(device_));
  cudaStream_t st = main_->get();
  const int B = (int)step_sessions_.size(), NL = step_layers_done_;
  std::vector<Session*> ss(B);
  for (int i = 0; i < B; ++i) ss[i] = &Find(step_sessions_[i]);
  // Everything queued for the step is issued now (one graph launch when its shape is cached).
  graph_.Flush();
  // The one wait of the step: the appends' tail write-through and the offloads are complete
  // before the manifest says so.
  const double w0 = StepGraph::NowMs();
  FKV_CUDA_CHECK(cudaStreamSynchronize(st));
  const double w1 = StepGraph::NowMs();
  graph_.Finished();
  struct Account {  // the wait and the bookkeeping below, into the step statistics
    StepGraph& g;
    double w0, w1;
    ~Account() { g.AddAfterIssue(w1 - w0, StepGraph::NowMs() - w1); }
  } account{graph_, w0, w1};
  // The queries are in the records' payloads already (DecodeDevice); their headers go last.
  for (int l = 0; l < NL; ++l)
    for (int i = 0; i < B; ++i) {
      WriteManifest(*ss[i], l);
      WriteQueryRecord(*ss[i], l, nullptr);
    }
}

void* CudaEngine::DeviceStream() { return main_->get(); }

}  // namespace freekv::cuda
