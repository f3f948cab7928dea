#!/usr/bin/env bash
# Shrinks .gpu/ under the GPU machine's transfer limit (64 MiB with everything carried), last of
# the pack commands (after scripts/gpu/pack.sh, parity.sh pack and, where used, bench/gpu/build.sh):
# strips the addon and compresses it, the bundles and the benchmark binary with xz (about 25 MB
# in all). On the GPU machine scripts/gpu/unpack.sh undoes it; visit.sh, run.sh, parity.sh and
# runner-bench.sh call it first.
set -euo pipefail
cd "$(dirname "$0")/../../.gpu"
if [ -f freekv.node ]; then
  strip --strip-unneeded freekv.node
  xz -T2 -9e -f freekv.node
fi
for f in freekv_shm.node parity.mjs runner-bench.mjs run-checks.mjs bench/freekv_gpu_bench; do
  if [ -f "$f" ]; then xz -T2 -9 -f "$f"; fi
done
du -sh .
