#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with the packed files in .gpu/hiersel/
# (here: bash bench/gpu/build.sh, then node.xz, freekv.node, freekv_shm.node, lib/, run-checks.mjs,
# runner-bench.mjs, parity-build.txt and bench/freekv_gpu_bench of .gpu/ copied into .gpu/hiersel/
# with this script as .gpu/hiersel/run.sh):
# the selection section of the benchmark program (flat vs hierarchical, equality checks), the
# CUDA engine cases (test/gpu/cases.ts), then the runner benchmark's long sessions at Qwen2.5-7B
# shapes (scripts/gpu/runner-bench.ts --grow). Each under its own time limit; results in $OUT.
#   STAGES="bench checks grow" CHECKS_ONLY=12,13,14 GROW=1:32768/131072 bash .gpu/hiersel/run.sh
set -uo pipefail
H=$PWD/.gpu/hiersel
export OUT=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
STAGES=${STAGES:-"bench checks grow"}
t0=$(date +%s)
echo "== $(date -u +%FT%TZ) stages: $STAGES"
df -h /dev/shm /tmp | sed 's/^/  /'; free -g | sed 's/^/  /'; nproc
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
cat "$H/parity-build.txt"; cp "$H/parity-build.txt" "$OUT/"
mkdir -p /tmp/nodebin
[ -x /tmp/nodebin/node ] || { xz -dc "$H/node.xz" > /tmp/nodebin/node && chmod +x /tmp/nodebin/node; }
export PATH=/tmp/nodebin:$PATH
export LD_LIBRARY_PATH=$H/lib:${LD_LIBRARY_PATH:-}
export FREEKV_ADDON=$H/freekv.node
for st in $STAGES; do
  echo "== $st at +$(( $(date +%s) - t0 )) s"
  case $st in
    bench) timeout "${BENCH_S:-45}" "$H/freekv_gpu_bench" --out "$OUT/selection-bench.json" --sections selection --deadline-s "$(( ${BENCH_S:-45} - 5 ))"; echo "bench rc=$?" ;;
    checks) timeout "${CHECKS_S:-75}" node "$H/run-checks.mjs" --no-timing ${CHECKS_ONLY:+--only $CHECKS_ONLY}; echo "checks rc=$?" ;;
    grow) timeout "${GROW_S:-150}" node --max-old-space-size=8192 "$H/runner-bench.mjs" --shape qwen7b --steps "${STEPS:-8}" \
            --grow "${GROW:-1:32768/131072/524288/1048576,4:32768/131072}" --out "$OUT"; echo "grow rc=$?"
          df -h /dev/shm | sed 's/^/  /' ;;
  esac
done
echo "== done at +$(( $(date +%s) - t0 )) s"
