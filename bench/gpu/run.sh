#!/usr/bin/env bash
# The GPU benchmark, one command on the GPU machine (`npm run bench:gpu` where Node.js exists):
#   1. freekv_gpu_bench (built here by bench/gpu/build.sh into .gpu/bench/): ceilings, recall,
#      attention, decode step, with correctness checks before each timing
#   2. bench/anchor/hf_anchor.py: HF transformers decode steps, same GPU, same visit
#   3. bench/gpu/report.py: one merged JSON (GPU, CUDA, commit, date) and the table
# Results go to $OUT (the folder whose files come back from the GPU machine) or bench/results/run-<date>/ otherwise.
# Time limits (seconds) keep the visit inside one device run: BENCH_S for the program,
# ANCHOR_S for the anchor; a section that would start past its limit is skipped and reported.
set -uo pipefail
cd "$(dirname "$0")/../.."
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "bench:gpu needs an NVIDIA GPU (nvidia-smi found none); see bench/gpu/README.md for the GPU-machine run" >&2
  exit 2
fi
stamp=$(date -u +%Y%m%d-%H%M)
out=${OUT:-bench/results/run-$stamp}
mkdir -p "$out"
bin=.gpu/bench/freekv_gpu_bench
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv > "$out/nvidia-smi.csv" 2>&1 || true
cat "$out/nvidia-smi.csv"
if [ -x "$bin" ]; then
  timeout "$(( ${BENCH_S:-300} + 60 ))" "$bin" --out "$out/bench.json" --deadline-s "${BENCH_S:-300}" \
    ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
  echo "[run] freekv_gpu_bench exit ${PIPESTATUS[0]}"
else
  echo "[run] $bin missing: run bench/gpu/build.sh here first and copy .gpu/bench along" | tee "$out/bench.log"
fi
py=python3
[ -x /opt/torch/.venv/bin/python3 ] && py=/opt/torch/.venv/bin/python3
if [ "${ANCHOR_S:-120}" != 0 ]; then
  timeout "$(( ${ANCHOR_S:-120} + 90 ))" $py bench/anchor/hf_anchor.py --out "$out/anchor.json" \
    --deadline-s "${ANCHOR_S:-120}" 2>&1 | tee "$out/anchor.log"
  echo "[run] hf_anchor exit ${PIPESTATUS[0]}"
fi
$py bench/gpu/report.py --bench "$out/bench.json" --anchor "$out/anchor.json" --out "$out/gpu-$stamp.json"
