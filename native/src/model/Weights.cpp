#include "model/Weights.h"

#include <cmath>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>

namespace freekv::model {

namespace {

// A read-only mapping of one weight file, unmapped when the loader is done with it.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw std::invalid_argument("cannot open weight file " + path + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      int e = errno;
      ::close(fd);
      throw std::invalid_argument("cannot stat weight file " + path + ": " + std::strerror(e));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      data_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (data_ == MAP_FAILED) {
        int e = errno;
        ::close(fd);
        data_ = nullptr;
        throw std::invalid_argument("cannot map weight file " + path + ": " + std::strerror(e));
      }
    }
    ::close(fd);
  }
  ~MappedFile() {
    if (data_) ::munmap(data_, size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(data_); }
  size_t size() const { return size_; }

 private:
  std::string path_;
  void* data_ = nullptr;
  size_t size_ = 0;
};

std::string ShapeString(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); i++) out += (i ? "," : "") + std::to_string(s[i]);
  return out + "]";
}

class Loader {
 public:
  explicit Loader(const std::vector<TensorRef>& refs) {
    for (const auto& r : refs) by_name_[r.name] = &r;
  }
  bool Has(const std::string& name) const { return by_name_.count(name) != 0; }

  std::vector<float> Get(const std::string& name, std::vector<int64_t> shape) {
    auto it = by_name_.find(name);
    if (it == by_name_.end()) throw std::invalid_argument("missing tensor '" + name + "'");
    const TensorRef& r = *it->second;
    if (r.shape != shape)
      throw std::invalid_argument("tensor '" + name + "' has shape " + ShapeString(r.shape) + ", expected " + ShapeString(shape));
    size_t count = 1;
    for (auto d : shape) count *= static_cast<size_t>(d);
    size_t elem = r.dtype == WeightDType::F32 ? 4 : 2;
    if (r.byte_length != count * elem)
      throw std::invalid_argument("tensor '" + name + "' has " + std::to_string(r.byte_length) + " bytes for shape " + ShapeString(shape));
    auto& file = Map(r.file);
    if (r.offset > file.size() || r.byte_length > file.size() - r.offset)
      throw std::invalid_argument("tensor '" + name + "' runs past the end of " + r.file);
    std::vector<float> out(count);
    const uint8_t* src = file.data() + r.offset;
    switch (r.dtype) {
      case WeightDType::F32:
        std::memcpy(out.data(), src, count * 4);
        break;
      case WeightDType::BF16:
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; i++) {
          uint16_t h;
          std::memcpy(&h, src + 2 * i, 2);
          out[i] = BF16ToFloat(h);
        }
        break;
      case WeightDType::F16:
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; i++) {
          uint16_t h;
          std::memcpy(&h, src + 2 * i, 2);
          out[i] = HalfToFloat(h);
        }
        break;
    }
    return out;
  }

 private:
  MappedFile& Map(const std::string& path) {
    auto it = files_.find(path);
    if (it != files_.end()) return *it->second;
    auto f = std::make_unique<MappedFile>(path);
    auto& ref = *f;
    files_[path] = std::move(f);
    return ref;
  }
  std::map<std::string, const TensorRef*> by_name_;
  std::map<std::string, std::unique_ptr<MappedFile>> files_;
};

}  // namespace

float BF16ToFloat(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float HalfToFloat(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        e++;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void ValidateConfig(const ModelConfig& c) {
  auto positive = [](int v, const char* name) {
    if (v <= 0) throw std::invalid_argument(std::string("config.") + name + " must be > 0");
  };
  positive(c.vocab_size, "vocabSize");
  positive(c.hidden_size, "hiddenSize");
  positive(c.intermediate_size, "intermediateSize");
  positive(c.layers, "layers");
  positive(c.q_heads, "qHeads");
  positive(c.kv_heads, "kvHeads");
  positive(c.head_dim, "headDim");
  // Upper bounds: the engine's geometry limits (engine/Validate.cpp), and sizes whose products
  // (q_dim, kv_dim, a row of the vocabulary) stay far inside int.
  auto at_most = [](int v, int max, const char* name) {
    if (v > max) throw std::invalid_argument(std::string("config.") + name + " must be <= " + std::to_string(max) + ", got " + std::to_string(v));
  };
  at_most(c.layers, 4096, "layers");
  at_most(c.q_heads, 1024, "qHeads");
  at_most(c.kv_heads, 1024, "kvHeads");
  at_most(c.head_dim, 1024, "headDim");
  at_most(c.hidden_size, 1 << 20, "hiddenSize");
  at_most(c.intermediate_size, 1 << 22, "intermediateSize");
  at_most(c.vocab_size, 1 << 24, "vocabSize");
  if (c.head_dim % 2) throw std::invalid_argument("config.headDim must be even (rotary pairs)");
  if (c.q_heads % c.kv_heads) throw std::invalid_argument("config.qHeads must be a multiple of config.kvHeads");
  if (static_cast<int>(c.rope_inv_freq.size()) != c.head_dim / 2)
    throw std::invalid_argument("config.ropeInvFreq must hold headDim / 2 values");
  if (!(c.rms_norm_eps > 0 && c.rms_norm_eps < 1)) throw std::invalid_argument("config.rmsNormEps must be in (0, 1)");
  for (float f : c.rope_inv_freq)
    if (!(std::isfinite(f) && f > 0)) throw std::invalid_argument("config.ropeInvFreq must hold positive finite values");
}

Weights LoadWeights(const ModelConfig& c, const std::vector<TensorRef>& refs) {
  ValidateConfig(c);
  Loader l(refs);
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, Q = c.q_dim(), K = c.kv_dim();
  Weights w;
  w.embed = l.Get("model.embed_tokens.weight", {V, H});
  if (!c.tie_word_embeddings) w.lm_head = l.Get("lm_head.weight", {V, H});
  w.final_norm = l.Get("model.norm.weight", {H});
  w.layers.resize(c.layers);
  for (int i = 0; i < c.layers; i++) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    auto& L = w.layers[i];
    L.input_norm = l.Get(p + "input_layernorm.weight", {H});
    L.post_attention_norm = l.Get(p + "post_attention_layernorm.weight", {H});
    L.wq = l.Get(p + "self_attn.q_proj.weight", {Q, H});
    L.wk = l.Get(p + "self_attn.k_proj.weight", {K, H});
    L.wv = l.Get(p + "self_attn.v_proj.weight", {K, H});
    L.wo = l.Get(p + "self_attn.o_proj.weight", {H, Q});
    if (c.attention_bias) {
      L.bq = l.Get(p + "self_attn.q_proj.bias", {Q});
      L.bk = l.Get(p + "self_attn.k_proj.bias", {K});
      L.bv = l.Get(p + "self_attn.v_proj.bias", {K});
    }
    L.w_gate = l.Get(p + "mlp.gate_proj.weight", {I, H});
    L.w_up = l.Get(p + "mlp.up_proj.weight", {I, H});
    L.w_down = l.Get(p + "mlp.down_proj.weight", {H, I});
  }
  return w;
}

}  // namespace freekv::model
