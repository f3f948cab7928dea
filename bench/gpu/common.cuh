// Shared pieces of the GPU benchmark: status checks, event timing, seeded random fills, JSON.
//
// Method (../shared/gpu/README.md, METHOD.md): time with CUDA events after a warm-up, take the
// median of several repetitions, never time on zeros, check every CUDA return code and the last
// error after each launch. Every figure is written next to its ceiling.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fkbench {

using bf16 = __nv_bfloat16;

#define CK(call)                                                                                   \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess)                                                                         \
      throw std::runtime_error(std::string(#call) + " failed at " + __FILE__ + ":" +               \
                               std::to_string(__LINE__) + ": " + cudaGetErrorString(e_));          \
  } while (0)
#define CK_LAUNCH() CK(cudaGetLastError())

// Median of `reps` timed runs of fn() on `stream` (events around each run), after `warmup` runs.
inline double MedianMs(cudaStream_t stream, int warmup, int reps, const std::function<void()>& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  CK(cudaStreamSynchronize(stream));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a, stream));
    fn();
    CK(cudaEventRecord(b, stream));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

inline double WallSeconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

// Seeded fills (splitmix64 hash of the index): reproducible, never zeros.
void FillBf16(bf16* p, size_t n, uint64_t seed, float scale, cudaStream_t s);
void FillBytes(void* p, size_t bytes, uint64_t seed, cudaStream_t s);  // random 16-byte words
void FillHostBytes(void* p, size_t bytes, uint64_t seed);              // same pattern, CPU threads
uint64_t HashWord(uint64_t seed, uint64_t i);

// Minimal JSON builder: objects are written in insertion order.
class Json {
 public:
  Json() = default;
  static Json Num(double v) { Json j; j.kind_ = 'n'; j.num_ = v; return j; }
  static Json Str(const std::string& s) { Json j; j.kind_ = 's'; j.str_ = s; return j; }
  static Json Bool(bool b) { Json j; j.kind_ = 'b'; j.num_ = b; return j; }
  static Json Null() { Json j; j.kind_ = 'z'; return j; }
  static Json Arr() { Json j; j.kind_ = 'a'; return j; }
  static Json Obj() { Json j; j.kind_ = 'o'; return j; }
  Json& Set(const std::string& k, Json v) {
    for (auto& kv : obj_)
      if (kv.first == k) { kv.second = std::move(v); return *this; }
    obj_.emplace_back(k, std::move(v));
    return *this;
  }
  Json& Set(const std::string& k, double v) { return Set(k, Num(v)); }
  Json& Set(const std::string& k, const char* v) { return Set(k, Str(v)); }
  Json& Set(const std::string& k, const std::string& v) { return Set(k, Str(v)); }
  Json& Push(Json v) { arr_.push_back(std::move(v)); return *this; }
  std::string Dump(int indent = 0) const;

 private:
  char kind_ = 'o';
  double num_ = 0;
  std::string str_;
  std::vector<Json> arr_;
  std::vector<std::pair<std::string, Json>> obj_;
};

// A result row for the final table: figure, its ceiling, and the ratio.
struct Row {
  std::string section, name, unit;
  double value = 0, ceiling = 0;  // ceiling 0: none
  std::string note;
};

}  // namespace fkbench
