#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, after scripts/gpu/pack.sh filled .gpu/ here:
#   bash .gpu/run.sh [--timeout-s 240] [run-checks flags: --candidate cuda|cpu, --only 8,9, --no-timing]
# Unpacks Node.js, then runs every CUDA correctness case; log + JSON under $OUT. When a case
# fails, the smallest case runs again under compute-sanitizer (memcheck) to name a bad access.
set -uo pipefail
# What scripts/gpu/squeeze.sh compressed (where the tree is here beside .gpu/).
if [ -f scripts/gpu/unpack.sh ]; then bash scripts/gpu/unpack.sh || exit 2; fi
mkdir -p /tmp/nodebin
xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node
export PATH=/tmp/nodebin:$PATH
export LD_LIBRARY_PATH=$PWD/.gpu/lib:${LD_LIBRARY_PATH:-}
export FREEKV_ADDON=$PWD/.gpu/freekv.node
export OUT=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true
limit=240
if [ "${1:-}" = --timeout-s ]; then limit=$2; shift 2; fi
timeout "$limit" node .gpu/run-checks.mjs "$@"
rc=$?
if [ "$rc" -ne 0 ] && [[ " $* " != *" --candidate cpu "* ]] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
  echo "== rc=$rc: the smallest case under compute-sanitizer memcheck =="
  OUT=$OUT/sanitizer timeout 90 /usr/local/cuda/bin/compute-sanitizer --tool memcheck \
    --print-limit 20 --log-file "$OUT/sanitizer.log" node .gpu/run-checks.mjs --only 1 | tail -5
  head -60 "$OUT/sanitizer.log"
fi
exit $rc
