#include <cmath>
#include <set>
#include <string>

#include "engine/Retrieval.h"

namespace freekv {

namespace {

bool Known(const EnumName* names, size_t n, int v) {
  for (size_t i = 0; i < n; ++i)
    if (names[i].value == v) return true;
  return false;
}

template <size_t N>
std::optional<RetrievalError> CheckEnum(const char* field, int v, const EnumName (&names)[N]) {
  if (Known(names, N, v)) return std::nullopt;
  return RetrievalError{field, "unknown value " + std::to_string(v)};
}

}  // namespace

std::optional<RetrievalError> ValidateRetrieval(const RetrievalConfig& c, int layers) {
  using std::to_string;
  const int P = c.page_size;
  if (P < 1 || P > kMaxPageSize)
    return RetrievalError{"pageSize", "must be in [1, " + to_string(kMaxPageSize) + "], got " + to_string(P)};
  struct Tokens {
    const char* field;
    int value, min;
  };
  // The window holds the partial page, so it is at least one page.
  for (const Tokens& t : {Tokens{"sinkTokens", c.sink_tokens, 0}, Tokens{"windowTokens", c.window_tokens, P},
                          Tokens{"selectTokens", c.select_tokens, 0}}) {
    if (t.value < t.min) return RetrievalError{t.field, "must be an integer >= " + to_string(t.min) + ", got " + to_string(t.value)};
    if (t.value % P != 0)
      return RetrievalError{t.field, "must be a multiple of the page size (" + to_string(P) + "), got " + to_string(t.value)};
  }
  if (!std::isfinite(c.tau)) return RetrievalError{"tau", "must be finite, got " + to_string(c.tau)};
  if (auto e = CheckEnum("summary", static_cast<int>(c.summary), kSummaryNames)) return e;
  if (auto e = CheckEnum("combine", static_cast<int>(c.combine), kCombineNames)) return e;
  if (auto e = CheckEnum("mode", static_cast<int>(c.mode), kModeNames)) return e;
  if (auto e = CheckEnum("recall", static_cast<int>(c.recall), kRecallNames)) return e;
  std::set<int> seen;
  for (size_t i = 0; i < c.dense_layers.size(); ++i) {
    const int l = c.dense_layers[i];
    const std::string field = "denseLayers[" + to_string(i) + "]";
    if (l < 0 || l >= layers)
      return RetrievalError{field, "must be a layer in [0, " + to_string(layers - 1) + "], got " + to_string(l)};
    if (!seen.insert(l).second) return RetrievalError{field, "layer " + to_string(l) + " listed twice"};
  }
  return std::nullopt;
}

}  // namespace freekv
