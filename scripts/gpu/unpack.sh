#!/usr/bin/env bash
# On the GPU machine, from anywhere in the tree: decompresses what scripts/gpu/squeeze.sh packed in
# .gpu/ (the addons, the bundles, the benchmark binary), each where it is missing or older than its
# .xz; Node.js (.gpu/node.xz) and the services' archive are left to the scripts that use them.
# Every call's copy of .gpu/ replaces the one unpacked by the call before, so the scripts run
# this each time (it does nothing where nothing was compressed).
set -euo pipefail
cd "$(dirname "$0")/../.."
for f in .gpu/*.xz .gpu/bench/*.xz; do
  [ -f "$f" ] || continue
  case $f in .gpu/node.xz | *.tar.xz) continue ;; esac
  t=${f%.xz}
  if [ ! -f "$t" ] || [ "$f" -nt "$t" ]; then
    xz -dc "$f" > "$t.tmp"
    mv "$t.tmp" "$t"
  fi
  case $t in *.node | */freekv_gpu_bench) chmod +x "$t" ;; esac
done
