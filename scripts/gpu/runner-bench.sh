#!/usr/bin/env bash
# The service's decode step on the GPU (scripts/gpu/runner-bench.ts), on the GPU machine from the
# repository root with .gpu/ alongside (bash scripts/gpu/pack.sh, then bash scripts/gpu/parity.sh pack,
# here). Arguments go to the runner (--points, --modes, --steps, --layers, --dir). runner-bench.log
# and runner-bench.json under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT" /tmp/nodebin
[ -x /tmp/nodebin/node ] || { xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node; }
export PATH=/tmp/nodebin:$PATH
export LD_LIBRARY_PATH=$PWD/.gpu/lib:${LD_LIBRARY_PATH:-}
export FREEKV_ADDON=${FREEKV_ADDON:-$PWD/.gpu/freekv.node}
[ -f .gpu/parity-build.txt ] && cp .gpu/parity-build.txt "$OUT/runner-bench-build.txt"
timeout "${FREEKV_RUNNER_TIMEOUT:-400}" node --max-old-space-size=8192 .gpu/runner-bench.mjs --out "$OUT" "$@" 2>&1 | tee "$OUT/runner-bench.log"
exit "${PIPESTATUS[0]}"
