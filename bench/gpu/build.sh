#!/usr/bin/env bash
# Builds the GPU benchmark HERE (the GPU machine has no Node.js and builds nothing): compiles
# bench/gpu/*.cu with nvcc for sm_90a, links native/build/cuda/libfreekv_cuda.a (the kernels'
# host launchers, built by native/build.mjs) and cudart statically into the git-ignored
# .gpu/bench/ folder; then packs the service's decode step for run.sh: Node.js, the CUDA addon
# (scripts/gpu/pack.sh) and scripts/gpu/runner-bench.ts bundled (scripts/gpu/parity.sh pack).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
out=.gpu/bench
mkdir -p "$out"
grep -qx '.gpu/' .gitignore || { echo "bench/gpu/build.sh: .gpu/ must be git-ignored" >&2; exit 1; }
commit=$(git rev-parse --short=12 HEAD)
git diff --quiet HEAD -- bench/gpu native/src || commit="$commit+local-changes"
cuda_home=${CUDA_HOME:-/usr/local/cuda}
# The shared addon build also (re)builds libfreekv_cuda.a; hold its lock while linking against it.
exec 9>/tmp/freekv-native.lock
flock 9
node native/build.mjs > /tmp/freekv-bench-native-build.log 2>&1 || { cat /tmp/freekv-bench-native-build.log; exit 1; }
"$cuda_home/bin/nvcc" -std=c++17 -O3 --expt-relaxed-constexpr \
  -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_90,code=compute_90 \
  -I native/src -I native/src/engine/cuda -I native/src/model/cuda -I bench/gpu -DFKB_COMMIT="\"$commit\"" \
  bench/gpu/*.cu native/build/cuda/libfreekv_cuda.a \
  -ldl -lrt -lpthread -o "$out/freekv_gpu_bench"
flock -u 9
echo "built $out/freekv_gpu_bench (commit $commit)"
ls -la "$out"
bash scripts/gpu/pack.sh > /tmp/freekv-bench-pack.log 2>&1 || { tail -30 /tmp/freekv-bench-pack.log; exit 1; }
bash scripts/gpu/parity.sh pack
