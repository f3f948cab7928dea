#include <cmath>
#include <set>
#include <stdexcept>
#include <string>

#include "engine/Engine.h"
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
    if (t.value > kMaxRetrievalTokens)
      return RetrievalError{t.field, "must be <= " + to_string(kMaxRetrievalTokens) + ", got " + to_string(t.value)};
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

namespace {
void Require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}
}  // namespace

void ValidateGeometry(const Geometry& g) {
  Require(g.layers >= 1 && g.layers <= 4096, "geometry.layers must be in [1, 4096]");
  Require(g.q_heads >= 1 && g.q_heads <= 1024, "geometry.qHeads must be in [1, 1024]");
  Require(g.kv_heads >= 1 && g.kv_heads <= g.q_heads, "geometry.kvHeads must be in [1, qHeads]");
  Require(g.q_heads % g.kv_heads == 0, "geometry.qHeads must be a multiple of geometry.kvHeads");
  Require(g.head_dim >= 1 && g.head_dim <= 1024, "geometry.headDim must be in [1, 1024]");
}

void ValidateHostStore(const HostStore& h, const Layout& layout, bool uses_staging) {
  using std::to_string;
  Require(h.capacity_pages >= 1, "host.capacityPages must be >= 1");
  Require(h.reserved_pages >= 0 && h.reserved_pages <= h.capacity_pages,
          "host.reservedPages must be in [0, capacityPages]");
  Require(h.store && h.store_bytes >= layout.store_bytes,
          "host.store segment is smaller than the layout's storeBytes (" + to_string(layout.store_bytes) + ")");
  Require(!uses_staging || (h.staging && h.staging_bytes >= 2 * layout.staging_buffer_bytes),
          "host.staging segment is smaller than two staging buffers (" + to_string(2 * layout.staging_buffer_bytes) + ")");
  Require(h.tail && h.tail_bytes >= layout.tail_bytes,
          "host.tail segment is smaller than the layout's tailBytes (" + to_string(layout.tail_bytes) + ")");
  Require(h.manifest && h.manifest_bytes >= layout.manifest_bytes,
          "host.manifest segment is smaller than the layout's manifestBytes (" + to_string(layout.manifest_bytes) + ")");
}

std::string ReservationExceeded(int reserved_pages, int capacity_pages) {
  using std::to_string;
  return "the append would fill a page past the session's reservation: " + to_string(reserved_pages) + " of its " +
         to_string(capacity_pages) + " store pages per layer have memory at the kvstore (reserve more context first)";
}

void CheckReservation(const HostStore& h, int reserved_pages) {
  using std::to_string;
  Require(reserved_pages >= h.reserved_pages && reserved_pages <= h.capacity_pages,
          "reservedPages must be in [" + to_string(h.reserved_pages) + " (the current reservation), " +
              to_string(h.capacity_pages) + " (capacityPages)], got " + to_string(reserved_pages));
}

}  // namespace freekv
