#!/usr/bin/env bash
# CUDA vs CPU parity of the fidelity trace and the golden models (scripts/gpu/parity.ts).
#
#   bash scripts/gpu/parity.sh pack   here: bundles the runner with esbuild into .gpu/parity.mjs (and
#                                     scripts/gpu/runner-bench.ts into .gpu/runner-bench.mjs).
#                                     Needs .gpu/node.xz and .gpu/freekv.node from scripts/gpu/pack.sh.
#   bash scripts/gpu/parity.sh [--timeout-s 150] [--candidate cuda|cpu|cpu-f32] [--only fidelity|models]
#                                     on the GPU machine, from the repository root, with .gpu/ alongside:
#                                     unpacks Node.js and runs .gpu/parity.mjs with the flags; parity.log
#                                     and parity.json under $OUT. Exit code of the runner (0 = all pass).
#
# bash scripts/gpu/parity.sh --candidate cpu   runs it here with a second CPU engine standing in
# for the CUDA one (uses this machine's node when it has one).
set -uo pipefail
cd "$(dirname "$0")/../.."

if [ "${1:-}" = pack ]; then
  set -e
  for f in .gpu/node.xz .gpu/freekv.node; do
    [ -e "$f" ] || { echo "$f is missing: run bash scripts/gpu/pack.sh first" >&2; exit 1; }
  done
  npx esbuild scripts/gpu/parity.ts --minify-whitespace --minify-syntax --bundle --platform=node --format=esm --target=node20 \
    --banner:js="import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" \
    --outfile=.gpu/parity.mjs --log-level=warning
  npx esbuild scripts/gpu/runner-bench.ts --minify-whitespace --minify-syntax --bundle --platform=node --format=esm --target=node20 \
    --banner:js="import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" \
    --outfile=.gpu/runner-bench.mjs --log-level=warning
  # Which addon and which sources the run used (the GPU machine's copy has no .git).
  {
    echo "packed $(date -u +%FT%TZ) at commit $(git rev-parse HEAD)"
    echo "freekv.node sha256 $(sha256sum .gpu/freekv.node | cut -d' ' -f1), built $(date -u -r .gpu/freekv.node +%FT%TZ)"
    echo "uncommitted native changes at pack time:"; git status --short native/ | sed 's/^/  /'
  } > .gpu/parity-build.txt
  cat .gpu/parity-build.txt
  ls -la .gpu/parity.mjs
  exit 0
fi

limit=150
if [ "${1:-}" = --timeout-s ]; then limit=$2; shift 2; fi
export OUT=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT"
if [[ " $* " != *" --candidate cpu"* ]] || ! command -v node >/dev/null; then
  mkdir -p /tmp/nodebin
  xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node
  export PATH=/tmp/nodebin:$PATH
  export LD_LIBRARY_PATH=$PWD/.gpu/lib:${LD_LIBRARY_PATH:-}
fi
bash scripts/gpu/unpack.sh || exit 2  # what scripts/gpu/squeeze.sh compressed
export FREEKV_ADDON=${FREEKV_ADDON:-$PWD/.gpu/freekv.node}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
[ -f .gpu/parity-build.txt ] && cp .gpu/parity-build.txt "$OUT/parity-build.txt" && cat .gpu/parity-build.txt
timeout "$limit" node .gpu/parity.mjs "$@"
rc=$?
echo "parity rc=$rc"
exit $rc
