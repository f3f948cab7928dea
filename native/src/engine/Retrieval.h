// The retrieval contract every tier shares: the enums (their numbers are the wire's,
// freekv.v1 in proto/), the model geometry, the retrieval settings with their defaults (the one
// table of defaults, DESIGN.md section 2) and the one validator of those settings.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace freekv {

enum class DType : int { F32 = 1, BF16 = 2, F16 = 3 };
enum class SummaryKind : int { MaxMin = 1, CuboidMean = 2 };
enum class GroupCombine : int { SoftmaxMean = 1, Mean = 2, Max = 3 };
// ResidentSparse: every page stays in the device tier (as Dense) and each step attends what
// Oracle attends, read in place with no recall: the GPU-resident sparse attention FreeKV is
// measured against (proto/freekv/v1/common.proto).
enum class Mode : int { FreeKV = 1, Dense = 2, Oracle = 3, Speculative = 4, SinkWindow = 5, ResidentSparse = 6 };
enum class RecallMode : int { Gather = 1, DoubleBuffer = 2 };

inline size_t DTypeBytes(DType t) { return t == DType::F32 ? 4 : 2; }

// The name of every enum value, as the proto spells it without its prefix, lower case
// (RETRIEVAL_MODE_SINK_WINDOW -> "sink_window"): what command lines and the binding use.
struct EnumName {
  const char* name;
  int value;
};
struct EnumTable {
  const char* field;  // the binding's field name
  const EnumName* names;
  size_t count;
};
inline constexpr EnumName kDTypeNames[] = {{"float32", 1}, {"bfloat16", 2}, {"float16", 3}};
inline constexpr EnumName kSummaryNames[] = {{"max_min", 1}, {"cuboid_mean", 2}};
inline constexpr EnumName kCombineNames[] = {{"softmax_mean", 1}, {"mean", 2}, {"max", 3}};
inline constexpr EnumName kModeNames[] = {{"freekv", 1}, {"dense", 2}, {"oracle", 3}, {"speculative", 4}, {"sink_window", 5}, {"resident_sparse", 6}};
inline constexpr EnumName kRecallNames[] = {{"gather", 1}, {"double_buffer", 2}};
inline constexpr EnumTable kEnumTables[] = {
    {"kvDtype", kDTypeNames, 3}, {"summary", kSummaryNames, 2}, {"combine", kCombineNames, 3},
    {"mode", kModeNames, 6},     {"recall", kRecallNames, 2},
};

struct Geometry {
  int layers = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  DType kv_dtype = DType::F32;  // storage type of K/V (device tier and host store)
};

// Member initialisers are the defaults: a field a caller leaves out takes these values.
struct RetrievalConfig {
  int page_size = 32;
  int sink_tokens = 512;
  int window_tokens = 512;
  int select_tokens = 1024;
  float tau = 0.9f;
  SummaryKind summary = SummaryKind::MaxMin;
  GroupCombine combine = GroupCombine::SoftmaxMean;
  Mode mode = Mode::FreeKV;
  RecallMode recall = RecallMode::Gather;
  std::vector<int> dense_layers;
};

constexpr int kMaxPageSize = 4096;
// What a mode does, read by both backends.
// Selects with the current query at every decode (nothing speculated).
inline bool SelectsCurrent(Mode m) { return m == Mode::Oracle || m == Mode::ResidentSparse; }
// Whether a retrieving layer's blocking selection at this decode uses the current query: every
// decode in oracle and resident_sparse, and in freekv the first decode after a prefill. That
// decode has no speculative recall to attend, so its selection blocks in every mode; the paper
// (and DESIGN.md section 2) makes it with the prompt's last query, which costs the same as the
// current one but misses where the first answer token's query has moved from the prompt's: with
// the trained model (models/retrieval-8m, 8K single-needle tasks, budget 64 + 256 + 64) freekv
// wrote a wrong digit where oracle did not, and with every group corrected from the second
// decode on (tau above 1) still did; with the current query at the first decode it answered
// (bench/results/eval-retrieval-8m-20261205/README.md). speculative keeps the prompt's
// last query: it is the ablation without correction.
inline bool SelectsCurrentAt(Mode m, bool first_decode) { return SelectsCurrent(m) || (first_decode && m == Mode::FreeKV); }
// Every layer keeps all its pages in the device tier (a dense layer of another mode does too).
inline bool KeepsAllPages(Mode m) { return m == Mode::Dense || m == Mode::ResidentSparse; }

// A 0/1 switch the engines read from the environment (at every decode, so that a benchmark can
// time both settings in one process), on unless "0". The services validate it at start
// (services/compute/config.ts), the addon when it makes an engine and the CUDA engine itself
// (CheckEnvSwitch: any value but "", "0" and "1" throws, naming the variable).
inline bool EnvSwitchOn(const char* name) {
  const char* e = std::getenv(name);
  return !(e && e[0] == '0' && e[1] == 0);
}
inline void CheckEnvSwitch(const char* name) {
  const char* e = std::getenv(name);
  if (e && *e && std::string(e) != "0" && std::string(e) != "1")
    throw std::invalid_argument(std::string(name) + " must be 0 or 1, got '" + std::string(e) + "'");
}

// FREEKV_SPEC_REUSE, read by both backends: "1" or unset (the default) lets a FreeKV step's
// speculative selection (with q_t, for step t+1) take, for a group the step's correction has just
// selected with the same q_t over the same candidates, that selection instead of scoring the group
// again (same pages, counters and outputs); "0": every group is scored again. Measured on an H100
// (cuda/PERF.md, "The speculative selection of a corrected group"): the 1M step 1.0-1.1 ms faster
// at batch 1 and 4, 32K unchanged.
constexpr const char* kSpecReuseVariable = "FREEKV_SPEC_REUSE";
inline bool ReuseCorrectedSelections() { return EnvSwitchOn(kSpecReuseVariable); }

// FREEKV_MEAN_FOLD, read by the CUDA engine: "1" or unset (the default) folds, for the Mean
// combine, a KV group's query heads into two score rows before its pages are scored
// (cuda/selection.cuh, SelectionParams::fold_mean: the same ranking up to rounding, from 2 rows
// instead of G); "0" scores every query head. Measured on an H100 (cuda/PERF.md, "Folding the mean
// combine"): the 1M selection 17-21% shorter, the batch-4 1M step 0.75 ms shorter (8 layers), 32K
// unchanged, the same pages in every benchmark case. The CPU engine scores per head either way.
constexpr const char* kMeanFoldVariable = "FREEKV_MEAN_FOLD";
inline bool FoldMeanSelection() { return EnvSwitchOn(kMeanFoldVariable); }

// FREEKV_RESIDENT_FACTOR, read by both backends when a session is made (or re-attached): how many
// pages a KV group of a retrieving layer keeps on the device, in multiples of its selection (1, the
// paper's method, to 8; default 4). The attention still reads only the selected pages; the extra
// slots keep pages selected earlier, so a page the query selects again is a hit instead of a
// recall over the link. On the trained model's own queries (bench/results/resident-pool-20261206/)
// a group recalls 36-46% of its selection a step with 1, 13-29% with 2 and 4-13% with 4. Why 4 by
// default (bench/results/resident-pool-gpu-20261206/, an H100, 8B shapes, calibrated queries, the
// pool filled over 32 steps before 16 timed): the same logits, the step 7% shorter than 1 at 1 x 32K,
// 25% at 4 x 32K, 5-7% at 1 x 128K and 48% at 16 x 8K (2: 4%, 13%, 2%, 37%), for ~390 MiB more
// device memory a session than 1. Only at short contexts does that move the limit: 16 x 8K sessions
// of 716 MiB let 91 fit on the 80 GB card where host memory holds 124 (2: 144); at 32K and beyond
// host memory stays the limit (31 sessions of 32K, 76 by the device).
// Eviction (engine/ResidentPool.h, ResidentVictimBefore): with extra slots, empty slots first, then
// the page chosen longest ago, then the lowest page; without, the lowest slot not chosen (as before
// the option).
constexpr const char* kResidentFactorVariable = "FREEKV_RESIDENT_FACTOR";
constexpr int kMaxResidentFactor = 8;
constexpr int kDefaultResidentFactor = 4;
// Most slots a group's pool may have (the CUDA residency kernel holds them in shared memory).
constexpr int kMaxResidentSlots = 1024;
inline int ResidentFactor() {
  const char* e = std::getenv(kResidentFactorVariable);
  if (!e || !*e) return kDefaultResidentFactor;
  const std::string v(e);
  int f = 0;
  bool digits = true;
  for (char ch : v) digits = digits && ch >= '0' && ch <= '9', f = std::min(1000, f * 10 + (ch - '0'));
  if (digits && f >= 1 && f <= kMaxResidentFactor) return f;
  throw std::invalid_argument(std::string(kResidentFactorVariable) + " must be an integer from 1 to " +
                              std::to_string(kMaxResidentFactor) + ", got '" + v + "'");
}
// Slots of a group's pool for a selection of k pages, a store of capacity_pages and the factor:
// at least k (the selection always fits), at most k * factor, the store and kMaxResidentSlots.
inline int ResidentSlots(int k, int capacity_pages, int factor) {
  if (k <= 0 || factor <= 1) return k;
  return std::max(k, std::min({k * factor, capacity_pages, kMaxResidentSlots}));
}

// Every switch above, checked when an engine is made.
inline void CheckEngineSwitches() {
  CheckEnvSwitch(kSpecReuseVariable);
  CheckEnvSwitch(kMeanFoldVariable);
  ResidentFactor();
}

// Largest sink, window or selection (tokens): services/common/retrieval.ts MAX_RETRIEVAL_TOKENS.
constexpr int kMaxRetrievalTokens = 1 << 20;

// What is wrong with a retrieval config: the field as the binding names it ("windowTokens",
// "denseLayers[2]") and what is wrong with it ("must be a multiple of the page size (32), got 6").
struct RetrievalError {
  std::string field;
  std::string message;
};

// Checks a config for a model of `layers` layers (the backends add their own limits on top).
std::optional<RetrievalError> ValidateRetrieval(const RetrievalConfig& c, int layers);

}  // namespace freekv
