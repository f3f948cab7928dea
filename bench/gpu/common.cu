// Seeded fills and the JSON writer of the GPU benchmark (see common.cuh).
#include <cmath>
#include <cstring>
#include <thread>

#include "common.cuh"

namespace fkbench {

__host__ __device__ inline uint64_t SplitMix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t HashWord(uint64_t seed, uint64_t i) { return SplitMix(seed * 0x100000001B3ull ^ i) | 1ull; }

__global__ void FillBf16Kernel(bf16* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t h = SplitMix(seed * 0x100000001B3ull ^ i);
    // uniform in [-scale, scale), never exactly 0 (the low bit is forced on)
    float u = (float((h >> 40) | 1ull) / float(1ull << 24)) * 2.0f - 1.0f;
    p[i] = __float2bfloat16(u * scale);
  }
}

__global__ void FillWordsKernel(uint4* p, size_t words, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < words; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t a = SplitMix(seed * 0x100000001B3ull ^ (2 * i)) | 1ull;
    uint64_t b = SplitMix(seed * 0x100000001B3ull ^ (2 * i + 1)) | 1ull;
    p[i] = make_uint4(uint32_t(a), uint32_t(a >> 32), uint32_t(b), uint32_t(b >> 32));
  }
}

void FillBf16(bf16* p, size_t n, uint64_t seed, float scale, cudaStream_t s) {
  FillBf16Kernel<<<1056, 256, 0, s>>>(p, n, seed, scale);
  CK_LAUNCH();
}

void FillBytes(void* p, size_t bytes, uint64_t seed, cudaStream_t s) {
  if (bytes % 16) throw std::invalid_argument("FillBytes: bytes must be a multiple of 16");
  FillWordsKernel<<<1056, 256, 0, s>>>(static_cast<uint4*>(p), bytes / 16, seed);
  CK_LAUNCH();
}

void FillHostBytes(void* p, size_t bytes, uint64_t seed) {
  if (bytes % 16) throw std::invalid_argument("FillHostBytes: bytes must be a multiple of 16");
  size_t words = bytes / 16;
  unsigned nt = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<std::thread> th;
  for (unsigned t = 0; t < nt; ++t)
    th.emplace_back([=] {
      uint64_t* q = static_cast<uint64_t*>(p);
      for (size_t i = words * t / nt; i < words * (t + 1) / nt; ++i) {
        q[2 * i] = SplitMix(seed * 0x100000001B3ull ^ (2 * i)) | 1ull;
        q[2 * i + 1] = SplitMix(seed * 0x100000001B3ull ^ (2 * i + 1)) | 1ull;
      }
    });
  for (auto& x : th) x.join();
}

static void Escape(std::ostringstream& o, const std::string& s) {
  o << '"';
  for (char c : s) {
    if (c == '"' || c == '\\') o << '\\' << c;
    else if (c == '\n') o << "\\n";
    else if (static_cast<unsigned char>(c) < 0x20) o << ' ';
    else o << c;
  }
  o << '"';
}

std::string Json::Dump(int indent) const {
  std::ostringstream o;
  std::string pad(indent + 2, ' '), pad0(indent, ' ');
  switch (kind_) {
    case 'n':
      if (!std::isfinite(num_)) o << "null";
      else {
        char b[64];
        snprintf(b, sizeof b, "%.6g", num_);
        o << b;
      }
      break;
    case 's': Escape(o, str_); break;
    case 'b': o << (num_ ? "true" : "false"); break;
    case 'z': o << "null"; break;
    case 'a':
      o << "[";
      for (size_t i = 0; i < arr_.size(); ++i) o << (i ? ",\n" : "\n") << pad << arr_[i].Dump(indent + 2);
      o << (arr_.empty() ? "]" : "\n" + pad0 + "]");
      break;
    default:
      o << "{";
      for (size_t i = 0; i < obj_.size(); ++i) {
        o << (i ? ",\n" : "\n") << pad;
        Escape(o, obj_[i].first);
        o << ": " << obj_[i].second.Dump(indent + 2);
      }
      o << (obj_.empty() ? "}" : "\n" + pad0 + "}");
  }
  return o.str();
}

}  // namespace fkbench
