#!/usr/bin/env bash
# The service's decode step on the GPU (scripts/gpu/runner-bench.ts), from the repository root:
#   bash scripts/gpu/runner-bench.sh [--timeout-s 400] [runner arguments: --points, --modes, --steps,
#                                     --layers, --dir, --hbm-gbps, --profile-steps]
# On the GPU machine it runs the bundle .gpu/runner-bench.mjs with the Node.js and the addon of .gpu/
# (here: bash scripts/gpu/pack.sh && bash scripts/gpu/parity.sh pack, or bash bench/gpu/build.sh);
# where no bundle was packed but the tree has node_modules, the TypeScript through tsx with the
# built addon. runner-bench.log and runner-bench.json under $OUT (default .gpu/out).
set -uo pipefail
cd "$(dirname "$0")/../.."
limit=400
if [ "${1:-}" = --timeout-s ]; then limit=$2; shift 2; fi
export OUT=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT"
bash scripts/gpu/unpack.sh || exit 2  # what scripts/gpu/squeeze.sh compressed
if [ -f .gpu/runner-bench.mjs ]; then
  mkdir -p /tmp/nodebin
  [ -x /tmp/nodebin/node ] || { xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node; }
  export PATH=/tmp/nodebin:$PATH
  export LD_LIBRARY_PATH=$PWD/.gpu/lib:${LD_LIBRARY_PATH:-}
  export FREEKV_ADDON=${FREEKV_ADDON:-$PWD/.gpu/freekv.node}
  [ -f .gpu/parity-build.txt ] && cp .gpu/parity-build.txt "$OUT/runner-bench-build.txt"
  runner=(.gpu/runner-bench.mjs)
elif [ -x node_modules/.bin/tsx ]; then
  runner=(--import tsx scripts/gpu/runner-bench.ts)
else
  echo "runner-bench: neither .gpu/runner-bench.mjs (bash scripts/gpu/parity.sh pack) nor node_modules (npm install)" >&2
  exit 2
fi
timeout "$limit" node --max-old-space-size=8192 "${runner[@]}" --out "$OUT" "$@" 2>&1 | tee "$OUT/runner-bench.log"
exit "${PIPESTATUS[0]}"
