#!/usr/bin/env bash
# The GPU benchmark, one command on the GPU machine (`npm run bench:gpu -- [flags]` where Node.js exists):
#   1. freekv_gpu_bench (built here by bench/gpu/build.sh into .gpu/bench/): ceilings, recall and
#      attention kernels, with correctness checks before each timing
#   2. the service's own decode step: scripts/gpu/runner-bench.ts (Model.decode with the CUDA
#      engine, the path Generate takes), its floors at the HBM bandwidth measured in 1
#   3. bench/anchor/hf_anchor.py: HF transformers decode steps, same GPU, same visit
#   4. bench/gpu/report.py: one merged JSON (GPU, CUDA, commit, date) and the tables
# Results go to $OUT (the folder whose files come back from the GPU machine) or bench/results/run-<date>/.
#
# Flags (time limits in seconds keep the visit inside one device run; a section that would start
# past its limit is skipped and reported; 0 leaves a part out):
#   --bench-s 300      the kernel program          --sections LIST   its sections (ceilings,recall,attention,prefill)
#   --runner-s 300     the service's decode step   --runner-args "…" its arguments (points, modes, steps)
#   --anchor-s 120     the HF anchor               --anchor-cases L  its cases (CONTEXTxBATCH,…)
#   --quick            smaller kernel-program sizes (smoke run)
set -uo pipefail
cd "$(dirname "$0")/../.."
bench_s=300 runner_s=300 anchor_s=120 sections=ceilings,recall,attention,prefill quick=
runner_args="--points 1:32768,4:32768,16:8192 --modes freekv,speculative,oracle,dense --steps 8"
anchor_cases=32768x1,32768x4,131072x1
while [ $# -gt 0 ]; do
  case $1 in
    --bench-s) bench_s=$2; shift 2 ;;
    --runner-s) runner_s=$2; shift 2 ;;
    --anchor-s) anchor_s=$2; shift 2 ;;
    --sections) sections=$2; shift 2 ;;
    --runner-args) runner_args=$2; shift 2 ;;
    --anchor-cases) anchor_cases=$2; shift 2 ;;
    --quick) quick=--quick; shift ;;
    *) echo "bench/gpu/run.sh: unknown argument '$1' (see the header of this file)" >&2; exit 2 ;;
  esac
done
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "bench:gpu needs an NVIDIA GPU (nvidia-smi found none); see bench/gpu/README.md for the GPU-machine run" >&2
  exit 2
fi
stamp=$(date -u +%Y%m%d-%H%M)
out=${OUT:-bench/results/run-$stamp}
mkdir -p "$out"
bin=.gpu/bench/freekv_gpu_bench
py=python3
[ -x /opt/torch/.venv/bin/python3 ] && py=/opt/torch/.venv/bin/python3
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv > "$out/nvidia-smi.csv" 2>&1 || true
cat "$out/nvidia-smi.csv"

if [ "$bench_s" != 0 ] && [ -x "$bin" ]; then
  timeout "$(( bench_s + 60 ))" "$bin" --out "$out/bench.json" --deadline-s "$bench_s" --sections "$sections" $quick \
    2>&1 | tee "$out/bench.log"
  echo "[run] freekv_gpu_bench exit ${PIPESTATUS[0]}"
elif [ "$bench_s" != 0 ]; then
  echo "[run] $bin missing: run bench/gpu/build.sh here first and copy .gpu along" | tee "$out/bench.log"
fi

if [ "$runner_s" != 0 ]; then
  # The floors at this run's measured HBM copy bandwidth (the runner's default when the program did not run).
  hbm=$(bash bench/gpu/hbm-rate.sh "$out/bench.json" || echo 4290)
  # shellcheck disable=SC2086  # runner_args is a list of flags
  OUT=$out bash scripts/gpu/runner-bench.sh --timeout-s "$runner_s" --hbm-gbps "$hbm" $runner_args
  echo "[run] runner-bench exit $?"
fi

if [ "$anchor_s" != 0 ]; then
  timeout "$(( anchor_s + 90 ))" $py bench/anchor/hf_anchor.py --out "$out/anchor.json" \
    --deadline-s "$anchor_s" --cases "$anchor_cases" 2>&1 | tee "$out/anchor.log"
  echo "[run] hf_anchor exit ${PIPESTATUS[0]}"
fi
$py bench/gpu/report.py --bench "$out/bench.json" --runner "$out/runner-bench.json" --anchor "$out/anchor.json" \
  --out "$out/gpu-$stamp.json"
