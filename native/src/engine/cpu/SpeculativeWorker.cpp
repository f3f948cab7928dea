#include "engine/cpu/SpeculativeWorker.h"

namespace freekv::cpu {

SpeculativeWorker::SpeculativeWorker() : thread_([this] { Run(); }) {}

SpeculativeWorker::~SpeculativeWorker() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void SpeculativeWorker::Submit(LayerRecall* state, std::function<void()> job) {
  state->MarkPending();
  {
    std::lock_guard<std::mutex> l(mu_);
    jobs_.emplace_back(state, std::move(job));
  }
  cv_.notify_all();
}

void SpeculativeWorker::Run() {
  for (;;) {
    std::pair<LayerRecall*, std::function<void()>> job;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stop_ and drained
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    std::exception_ptr err;
    try {
      job.second();
    } catch (...) {
      err = std::current_exception();
    }
    job.first->Complete(err);
  }
}

}  // namespace freekv::cpu
