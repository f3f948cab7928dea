// argmaxF32(values, offset, n): index (relative to offset) of the first largest of n float32
// values. Greedy decoding takes it over every row of the logits, [batch][vocab] with a vocabulary
// of 128K for Llama 3: a tight native loop is several times faster than the same loop in
// JavaScript and keeps sampling off a decode step's critical path. Same semantics as the
// TypeScript fallback (a NaN never wins unless it comes first).
//
// sampleF32(values, offset, n, temperature, topK, topP, u): the temperature / top-k / top-p draw of
// services/compute/generate/sampling.ts (Sampler.sample, the reference and the fallback), step for
// step: candidates within 40 temperatures of the best in index order; top-k as the k largest by
// (value desc, index asc); top-p over growing sorted heads; weights exp((x - max) / T) in double;
// the token where u * sum is used up. At temperature 1 over a random 8B model's 128K-token
// vocabulary every token is a candidate, and the JavaScript loop took ~20 ms a token, serial over
// the batch's sessions on the event loop, which made the H200's time per output token in serving
// several times its step.
#include <napi.h>

#include <string>
#include <system_error>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "Parallel.h"

namespace freekv::addon {

static int64_t ArgmaxF32(const float* x, int64_t n) {
  int64_t best = 0;
  float bestValue = x[0];
  for (int64_t i = 1; i < n; ++i) {
    if (x[i] > bestValue) {
      bestValue = x[i];
      best = i;
    }
  }
  return best;
}

static Napi::Value Argmax(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (info.Length() < 3 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(env, "values must be a Float32Array");
  if (!info[1].IsNumber() || !info[2].IsNumber()) throw Napi::TypeError::New(env, "offset and n must be numbers");
  auto a = info[0].As<Napi::Float32Array>();
  const double off = info[1].As<Napi::Number>().DoubleValue();
  const double n = info[2].As<Napi::Number>().DoubleValue();
  if (!(off >= 0) || off != static_cast<double>(static_cast<int64_t>(off))) throw Napi::RangeError::New(env, "offset must be an integer >= 0");
  if (!(n >= 1) || n != static_cast<double>(static_cast<int64_t>(n))) throw Napi::RangeError::New(env, "n must be an integer >= 1");
  if (off + n > static_cast<double>(a.ElementLength()))
    throw Napi::RangeError::New(env, "offset + n is past the end of values");
  return Napi::Number::New(env, static_cast<double>(ArgmaxF32(a.Data() + static_cast<int64_t>(off), static_cast<int64_t>(n))));
}

// Working memory of one draw: the candidate ids and their weights (by token id). A 128K vocabulary
// needs 1.5 MB; allocated per draw, glibc maps it fresh and the page faults took 4 of the 5 ms a
// draw cost (bench:sampling). Kept in a small pool and reused instead.
struct SampleScratch {
  std::vector<int32_t> ids;
  std::vector<double> w;
};

class ScratchPool {
 public:
  std::unique_ptr<SampleScratch> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return std::make_unique<SampleScratch>();
    auto s = std::move(free_.back());
    free_.pop_back();
    return s;
  }
  void Give(std::unique_ptr<SampleScratch> s) {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < 16) free_.push_back(std::move(s));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<SampleScratch>> free_;
};

static ScratchPool& Scratches() {
  static ScratchPool* pool = new ScratchPool();  // never destroyed: workers may outlive statics
  return *pool;
}

// The steps of sampleJs. Each candidate's weight exp((x - max) / T) is computed once and kept
// (the reference computes it again for the final draw: same value); the top-p heads grow by
// sorting only the part not sorted yet (nth_element, then a sort of that slice) instead of a
// partial_sort of the whole head each time. Both orders are the total order (value desc, id asc),
// so the sequence, the sums and the token are those of the reference.
static int64_t SampleF32(const float* x, int64_t n, double temperature, int64_t top_k, double top_p, double u, SampleScratch& s) {
  float maxf = -INFINITY;
  for (int64_t i = 0; i < n; ++i) maxf = maxf < x[i] ? x[i] : maxf;
  const double max = maxf;
  const double cut = max - 40 * temperature;
  auto& ids = s.ids;
  auto& w = s.w;
  if (static_cast<int64_t>(ids.size()) < n) ids.resize(static_cast<size_t>(n));
  if (static_cast<int64_t>(w.size()) < n) w.resize(static_cast<size_t>(n));
  int64_t cand = 0;
  for (int64_t i = 0; i < n; ++i)
    if (static_cast<double>(x[i]) >= cut) ids[cand++] = static_cast<int32_t>(i);
  if (cand == 0) return -1;  // every logit NaN: nothing to draw from (the callers throw)
  const auto before = [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
  const auto first = ids.begin();
  int64_t keep = cand;
  bool sorted_k = false;
  if (top_k > 0 && top_k < cand) {
    std::nth_element(first, first + (top_k - 1), first + cand, before);
    std::sort(first, first + top_k, before);
    keep = top_k;
    sorted_k = true;
  }
  for (int64_t i = 0; i < keep; ++i) w[ids[i]] = std::exp((static_cast<double>(x[ids[i]]) - max) / temperature);
  if (top_p > 0 && top_p < 1) {
    const int64_t size = keep;
    double total = 0;
    for (int64_t i = 0; i < size; ++i) total += w[ids[i]];
    int64_t m = std::min<int64_t>(size, 256);
    int64_t sorted = sorted_k ? size : 0;
    double acc = 0;
    int64_t i = 0;
    for (;;) {
      if (sorted < m) {
        // ids[0, sorted) holds the `sorted` first in order; bring the next m - sorted after them.
        if (m < cand) std::nth_element(first + sorted, first + (m - 1), first + cand, before);
        std::sort(first + sorted, first + m, before);
        sorted = m;
      }
      int64_t reached = -1;
      for (; i < m; ++i) {
        acc += w[ids[i]] / total;
        if (acc >= top_p) {
          reached = i + 1;
          break;
        }
      }
      if (reached > 0) {
        keep = reached;
        break;
      }
      if (m >= size) break;
      m = std::min(size, m * 8);
    }
  }
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) sum += w[ids[i]];
  double r = u * sum;
  for (int64_t i = 0; i < keep; ++i) {
    r -= w[ids[i]];
    if (r < 0) return ids[i];
  }
  return ids[keep - 1];
}

static const char* const kNoCandidates = "no logit to sample from: every logit of the row is NaN";

static int64_t SampleF32(const float* x, int64_t n, double temperature, int64_t top_k, double top_p, double u) {
  auto s = Scratches().Take();
  const int64_t r = SampleF32(x, n, temperature, top_k, top_p, u, *s);
  Scratches().Give(std::move(s));
  return r;
}

static Napi::Value Sample(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (info.Length() < 7 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(env, "values must be a Float32Array");
  for (size_t i = 1; i < 7; ++i)
    if (!info[i].IsNumber()) throw Napi::TypeError::New(env, "offset, n, temperature, topK, topP and u must be numbers");
  auto a = info[0].As<Napi::Float32Array>();
  const double off = info[1].As<Napi::Number>().DoubleValue(), n = info[2].As<Napi::Number>().DoubleValue();
  const double t = info[3].As<Napi::Number>().DoubleValue(), k = info[4].As<Napi::Number>().DoubleValue();
  const double p = info[5].As<Napi::Number>().DoubleValue(), u = info[6].As<Napi::Number>().DoubleValue();
  if (!(off >= 0) || off != static_cast<double>(static_cast<int64_t>(off))) throw Napi::RangeError::New(env, "offset must be an integer >= 0");
  if (!(n >= 1) || n != static_cast<double>(static_cast<int64_t>(n)) || n > 2147483647.0) throw Napi::RangeError::New(env, "n must be an integer in [1, 2^31)");
  if (off + n > static_cast<double>(a.ElementLength())) throw Napi::RangeError::New(env, "offset + n is past the end of values");
  if (!(t > 0) || !std::isfinite(t)) throw Napi::RangeError::New(env, "temperature must be > 0");
  if (!(k >= 0) || k != static_cast<double>(static_cast<int64_t>(k))) throw Napi::RangeError::New(env, "topK must be an integer >= 0");
  if (!(p >= 0 && p <= 1)) throw Napi::RangeError::New(env, "topP must be in [0, 1]");
  if (!(u >= 0 && u < 1)) throw Napi::RangeError::New(env, "u must be in [0, 1)");
  const int64_t r = SampleF32(a.Data() + static_cast<int64_t>(off), static_cast<int64_t>(n), t, static_cast<int64_t>(std::min(k, n)), p, u);
  if (r < 0) throw Napi::RangeError::New(env, kNoCandidates);
  return Napi::Number::New(env, static_cast<double>(r));
}

// sampleRowsAsync(logits, vocab, rows, params): sampleF32 of several rows of one batch's logits
// [batch][vocab] (row rows[i], params[4i .. 4i+4) = temperature, topK, topP, u), off the main
// thread and spread over up to 8 threads: a batch of sessions decoding at temperature > 0 draws
// in parallel instead of one after another on the event loop. Resolves to the tokens [rows].
class SampleRowsWorker : public Napi::AsyncWorker {
 public:
  SampleRowsWorker(Napi::Env env, Napi::Float32Array logits, int64_t vocab, std::vector<int32_t> rows, std::vector<double> params)
      : Napi::AsyncWorker(env, "freekv:sampleRows"),
        deferred_(Napi::Promise::Deferred::New(env)),
        keep_(Napi::Persistent(logits)),
        data_(logits.Data()),
        vocab_(vocab),
        rows_(std::move(rows)),
        params_(std::move(params)),
        out_(rows_.size()) {}
  Napi::Promise Promise() const { return deferred_.Promise(); }

 protected:
  void Execute() override {
    std::atomic<size_t> next{0};
    auto run = [&] {
      for (size_t i; (i = next.fetch_add(1)) < rows_.size();) {
        const double* q = &params_[4 * i];
        out_[i] = static_cast<int32_t>(SampleF32(data_ + rows_[i] * vocab_, vocab_, q[0], static_cast<int64_t>(q[1]), q[2], q[3]));
      }
    };
    static const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    const unsigned n = static_cast<unsigned>(std::min<size_t>({rows_.size(), size_t{8}, size_t{hw}}));
    RunOnThreads(n, run);
    for (size_t i = 0; i < out_.size(); ++i)
      if (out_[i] < 0) return SetError(std::string(kNoCandidates) + " (rows[" + std::to_string(i) + "])");
  }
  void OnOK() override {
    auto out = Napi::Int32Array::New(Env(), out_.size());
    std::copy(out_.begin(), out_.end(), out.Data());
    deferred_.Resolve(out);
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  Napi::Reference<Napi::Float32Array> keep_;
  const float* data_;
  int64_t vocab_;
  std::vector<int32_t> rows_;
  std::vector<double> params_;
  std::vector<int32_t> out_;
};

static Napi::Value SampleRows(const Napi::CallbackInfo& info) {
  auto env = info.Env();
  if (info.Length() < 4 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(env, "logits must be a Float32Array");
  if (!info[1].IsNumber()) throw Napi::TypeError::New(env, "vocab must be a number");
  if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw Napi::TypeError::New(env, "rows must be an Int32Array");
  if (!info[3].IsTypedArray() || info[3].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    throw Napi::TypeError::New(env, "params must be a Float64Array");
  auto logits = info[0].As<Napi::Float32Array>();
  const double v = info[1].As<Napi::Number>().DoubleValue();
  if (!(v >= 1) || v != static_cast<double>(static_cast<int64_t>(v)) || v > 2147483647.0) throw Napi::RangeError::New(env, "vocab must be an integer in [1, 2^31)");
  const int64_t vocab = static_cast<int64_t>(v);
  const int64_t batch = static_cast<int64_t>(logits.ElementLength()) / vocab;
  auto ra = info[2].As<Napi::Int32Array>();
  auto pa = info[3].As<Napi::Float64Array>();
  if (pa.ElementLength() != 4 * ra.ElementLength()) throw Napi::RangeError::New(env, "params must hold 4 numbers per row");
  std::vector<int32_t> rows(ra.Data(), ra.Data() + ra.ElementLength());
  std::vector<double> params(pa.Data(), pa.Data() + pa.ElementLength());
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] < 0 || rows[i] >= batch) throw Napi::RangeError::New(env, "rows[" + std::to_string(i) + "] is not a row of logits");
    const double t = params[4 * i], k = params[4 * i + 1], p = params[4 * i + 2], u = params[4 * i + 3];
    if (!(t > 0) || !std::isfinite(t)) throw Napi::RangeError::New(env, "temperature must be > 0");
    if (!(k >= 0) || k != static_cast<double>(static_cast<int64_t>(k))) throw Napi::RangeError::New(env, "topK must be an integer >= 0");
    if (!(p >= 0 && p <= 1)) throw Napi::RangeError::New(env, "topP must be in [0, 1]");
    if (!(u >= 0 && u < 1)) throw Napi::RangeError::New(env, "u must be in [0, 1)");
    params[4 * i + 1] = std::min(k, v);
  }
  auto* w = new SampleRowsWorker(env, logits, vocab, std::move(rows), std::move(params));
  auto promise = w->Promise();
  w->Queue();
  return promise;
}

void InitSampling(Napi::Env env, Napi::Object exports) {
  exports.Set("sampleRowsAsync", Napi::Function::New(env, SampleRows, "sampleRowsAsync"));
  exports.Set("argmaxF32", Napi::Function::New(env, Argmax, "argmaxF32"));
  exports.Set("sampleF32", Napi::Function::New(env, Sample, "sampleF32"));
}

}  // namespace freekv::addon
