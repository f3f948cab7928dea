#!/usr/bin/env bash
# One visit to the GPU machine: every CUDA check and measurement in one command, each step under
# its own time limit, results kept even when a later step is cut off.
#
# Here, first:  bash scripts/gpu/pack.sh && bash scripts/gpu/parity.sh pack && bash bench/gpu/build.sh \
#               && bash scripts/gpu/pack-services.sh
# There (repository root, .gpu/ alongside):  bash scripts/gpu/visit.sh
#
# Steps (seconds each, from the environment): CHECKS_S=150 the CUDA engine cases (run.sh; 16 cases and the timing table took over 120 s on an H100),
# PARITY_S=60 CUDA vs CPU parity, RUNNER_S=240 Model.decode at 8B shapes (runner-bench; it also
# writes the model folder the next step serves), OVERHEAD_S=150 both services on the GPU under
# bench:overhead (16 greedy Generate streams), BENCH_S=90 the CUDA benchmark program's kernels
# (BENCH_SECTIONS, default ceilings,attention,recall,prefill; the decode step is the runner step's).
# CHECKS2_ENV: the checks and parity steps again in that environment (checks2, parity2).
# SKIP="parity,bench" leaves steps out. NSYS_ARGS: a runner process under Nsight Systems (below). RUNNER_ENV (e.g. FREEKV_PREFILL_PROFILE=1) is the runner
# step's environment.
# ANCHOR_S=100 transformers' prefill of ANCHOR_PREFILL prompt lengths (bench/anchor/hf_anchor.py),
# TTFT_S=150 time to first token through Generate for TTFT_PROMPTS with the runner step's 8B folder,
# and a decoding session's pace while a TTFT_BACKGROUND-token prompt prefills (bench/ttft.ts; empty:
# none), in the environment TTFT_ENV, with TTFT_GAP_MS of pause before each prompt; TTFT2_ENV and
# TTFT3_ENV repeat it in other environments (TTFT2_GAP_MS, TTFT3_GAP_MS).
# SERVING_S=300 open-loop load through Generate with the runner step's 8B folder (bench/serving.ts):
# SERVING_RATES requests/s for SERVING_DURATION_S each, prompts 1K-32K, 64-512 new tokens, in the
# environment SERVING_ENV; SERVING2_ENV runs it again in another (A/B).
# EVAL_S=480 `freekv eval` of the trained model on the CUDA backend (scripts/gpu/eval.sh; needs
# the task files of .gpu/eval/, made here as that script says).
# PROFILE=1 adds PROFILE_S=150 one step's kernels under Nsight Compute (see below).
#
# The machine returns at most 8 files from $OUT, so everything goes into one folder that is packed
# again into $OUT/visit.tar.gz after every step; $OUT/summary.txt has one line per step.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
export OUT=${OUT:-$root/.gpu/out}
work=/tmp/freekv-visit
rm -rf "$work"
mkdir -p "$OUT" "$work" /tmp/nodebin
[ -x /tmp/nodebin/node ] || { xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node; }
# The addons, bundles and benchmark binary travel compressed when the pack was squeezed under the
# transfer limit (scripts/gpu/squeeze.sh); each call's copy of .gpu/ replaces the one unpacked by
# the call before, so they are unpacked on every visit.
bash scripts/gpu/unpack.sh || { echo "visit: unpacking .gpu/ failed" >&2; exit 2; }
export PATH=/tmp/nodebin:$PATH
export LD_LIBRARY_PATH=$root/.gpu/lib:${LD_LIBRARY_PATH:-}
export FREEKV_ADDON=$root/.gpu/freekv.node FREEKV_SHM_ADDON=$root/.gpu/freekv_shm.node
skip=",${SKIP:-},"
summary=$OUT/summary.txt
: > "$summary"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>&1
  cat .gpu/parity-build.txt .gpu/services-build.txt 2>/dev/null
} | tee -a "$summary"

pack() { tar -czf "$OUT/visit.tar.gz.tmp" -C "$work" . && mv "$OUT/visit.tar.gz.tmp" "$OUT/visit.tar.gz"; }
step() {  # step NAME SECONDS COMMAND...: runs with OUT=$work/NAME, records rc and wall time
  local name=$1 limit=$2
  shift 2
  if [[ $skip == *",$name,"* ]]; then echo "$name: skipped" >> "$summary"; return; fi
  mkdir -p "$work/$name"
  local t0=$SECONDS
  OUT=$work/$name timeout "$limit" "$@" > "$work/$name/stdout.log" 2>&1
  local rc=$?
  # A process cut off at its limit (or killed for memory) leaves its sessions' segments, tens of
  # GiB, in /dev/shm; nothing else runs between the steps, so they go before the next one.
  # Only node processes running the bundle: a pattern that any command line naming the file matches
  # would end the shell that started this visit when its own command names it (an xz of it, say).
  pkill -f '^(timeout [0-9]+ )?node --max-old-space-size=[0-9]+ [^ ]*runner-bench\.mjs' 2>/dev/null; rm -f /dev/shm/freekv-* 2>/dev/null
  echo "$name: rc=$rc in $((SECONDS - t0)) s (limit $limit)$( [ $rc -eq 124 ] && echo ', cut off at its limit')" >> "$summary"
  grep -a -h -E "\[eval\]|^prefill [0-9]|^all |\[anchor\] prefill|^\| [0-9]|while a |first request|demo finished|  FAIL|backend|cases pass|parity checks pass|ms/step|TS\+gRPC|^Generate |decode attention: max rel|\[run\] .* exit" "$work/$name/stdout.log" 2>/dev/null |
    tr -d '\000' | head -30 | sed "s/^/  $name: /" >> "$summary"
  pack
}

step checks "${CHECKS_S:-150}" bash .gpu/run.sh
step parity "${PARITY_S:-60}" bash scripts/gpu/parity.sh
# CHECKS2_ENV (e.g. FREEKV_PREFILL_CONTEXT_MEMORY=pool): the engine cases and parity once more in
# that environment, for a setting the addon reads that is not the default.
if [ -n "${CHECKS2_ENV:-}" ]; then
  step checks2 "${CHECKS_S:-150}" env ${CHECKS2_ENV} bash .gpu/run.sh
  step parity2 "${PARITY_S:-60}" env ${CHECKS2_ENV} bash scripts/gpu/parity.sh
fi
# GROW_ARGS (e.g. "--grow 1:32768/1048576 --grow-band 0.95"): long sessions at Qwen2.5-7B shapes
# (runner-bench --shape qwen7b, its own model folder), GROW_S seconds.
[ -n "${GROW_ARGS:-}" ] && step grow "${GROW_S:-200}" bash scripts/gpu/runner-bench.sh --timeout-s "${GROW_S:-200}" --shape qwen7b --steps "${GROW_STEPS:-8}" ${GROW_ARGS}
# A grow process cut off at its limit leaves its sessions' segments (tens of GiB) in /dev/shm;
# nothing else runs between the steps, so they go before the next one.
rm -f /dev/shm/freekv-* 2>/dev/null
# GROW2_ARGS: a second such process (e.g. another --layers), GROW2_S seconds.
[ -n "${GROW2_ARGS:-}" ] && step grow2 "${GROW2_S:-200}" bash scripts/gpu/runner-bench.sh --timeout-s "${GROW2_S:-200}" --shape qwen7b --steps "${GROW_STEPS:-8}" ${GROW2_ARGS}
# SELPROF=1: the selection kernels' device times under Nsight Compute at SELPROF_CONTEXTS (the first
# launches of the benchmark's selection section: checks, then timing).
rm -f /dev/shm/freekv-* 2>/dev/null
[ "${SELPROF:-0}" = 1 ] && step selprof "${SELPROF_S:-60}" env FKB_SELECTION_CONTEXTS="${SELPROF_CONTEXTS:-1048576}" \
  ncu --metrics gpu__time_duration.sum --csv --log-file "$work/selprof/ncu.csv" -k "regex:Selection|Chunk|Hier" \
  --launch-count "${SELPROF_LAUNCHES:-60}" .gpu/bench/freekv_gpu_bench --sections selection --out "$work/selprof/bench.json"
# KPROF="prefill:32768 selection:1048576": one launch of each kernel under Nsight Compute's full
# set (scripts/gpu/kernel-profile.sh), KPROF_S seconds each.
for kp in ${KPROF:-}; do
  step "kprof-${kp%%:*}" "${KPROF_S:-120}" bash scripts/gpu/kernel-profile.sh "$work/kprof-${kp%%:*}" "${kp%%:*}" "${kp#*:}"
done
step runner "${RUNNER_S:-240}" env ${RUNNER_ENV:-} bash scripts/gpu/runner-bench.sh ${RUNNER_ARGS:---points 1:32768,4:32768,16:8192 --modes freekv,speculative,dense --steps 8}
# RUNNER2_ARGS, RUNNER3_ARGS: more runner processes (each its own environment RUNNER2_ENV,
# RUNNER3_ENV, e.g. FREEKV_RESIDENT_FACTOR=4), reusing the first one's model folder.
for n in 2 3; do
  a=RUNNER${n}_ARGS e=RUNNER${n}_ENV t=RUNNER${n}_S
  [ -n "${!a:-}" ] && step runner$n "${!t:-120}" env ${!e:-} bash scripts/gpu/runner-bench.sh ${!a}
done
# NSYS_ARGS: one runner process under Nsight Systems (CUDA API and OS runtime traced), NSYS_S
# seconds, and the CUDA API summary as text: where the host's time goes (e.g. a prefill's issue).
if [ -n "${NSYS_ARGS:-}" ]; then
  step nsys "${NSYS_S:-150}" bash -c 'nsys profile -t cuda,osrt --sample=none --cpuctxsw=none -f true -o "$OUT/runner" \
      node --max-old-space-size=8192 .gpu/runner-bench.mjs --out "$OUT" '"${NSYS_ARGS}"' > "$OUT/runner.log" 2>&1;
    nsys stats -q --report cuda_api_sum,osrt_sum --format csv -o "$OUT/stats" "$OUT/runner.nsys-rep" > /dev/null 2>&1;
    nsys export --type sqlite -f true -o "$OUT/runner.sqlite" "$OUT/runner.nsys-rep" > /dev/null 2>&1 &&
      python3 scripts/gpu/nsys-step.py "$OUT/runner.sqlite" --json "$OUT/nsys-step.json" > "$OUT/nsys-step.txt" 2>&1;
    rm -f "$OUT/runner.sqlite"; cat "$OUT/nsys-step.txt"; ls "$OUT"; head -30 "$OUT"/stats*cuda_api_sum*.csv'
fi
py=python3
[ -x /opt/torch/.venv/bin/python3 ] && py=/opt/torch/.venv/bin/python3
step anchor "${ANCHOR_S:-100}" $py bench/anchor/hf_anchor.py --out "$work/anchor/anchor.json" \
  --prefill "${ANCHOR_PREFILL:-32768,131072}" --prefill-only --deadline-s $(( ${ANCHOR_S:-100} - 40 ))
if [ -f .gpu/services.tar.xz ]; then
  tar xJf .gpu/services.tar.xz
  step demo "${DEMO_S:-40}" env FREEKV_BACKEND=cuda node dist/tools/dev/demo.js
  [ -f .gpu/eval/tasks-16384.jsonl ] && step eval "${EVAL_S:-480}" bash scripts/gpu/eval.sh
  [ -f /tmp/freekv-8b/config.json ] && step ttft "${TTFT_S:-150}" env FREEKV_BACKEND=cuda FREEKV_MODEL=/tmp/freekv-8b ${TTFT_ENV:-} \
    node dist/bench/ttft.js --prompts "${TTFT_PROMPTS:-8192,32768,131072}" --runs "${TTFT_RUNS:-1}" --max-tokens 4 \
    --background "${TTFT_BACKGROUND-32768}" --background-tokens 400 --background-deadline-s "${TTFT_BACKGROUND_DEADLINE_S:-90}" \
    --log-level "${TTFT_LOG_LEVEL:-info}" --gap-ms "${TTFT_GAP_MS:-0}" --hf "$work/anchor/anchor.json" --out "$work/ttft/ttft.json"
  # TTFT2_ENV, TTFT3_ENV: the same time-to-first-token run again in other environments (A/B), with a
  # background session of TTFT2_BACKGROUND / TTFT3_BACKGROUND tokens (empty, the default: none).
  for n in 2 3; do
    envv=TTFT${n}_ENV prompts=TTFT${n}_PROMPTS bg=TTFT${n}_BACKGROUND limit=TTFT${n}_S gap=TTFT${n}_GAP_MS
    [ -f /tmp/freekv-8b/config.json ] && [ -n "${!envv:-}" ] && step ttft$n "${!limit:-120}" env FREEKV_BACKEND=cuda FREEKV_MODEL=/tmp/freekv-8b ${!envv} \
      node dist/bench/ttft.js --prompts "${!prompts:-${TTFT_PROMPTS:-8192,32768,131072}}" --runs "${TTFT_RUNS:-1}" --max-tokens 4 \
      --background "${!bg:-}" --background-tokens 400 --background-deadline-s "${TTFT_BACKGROUND_DEADLINE_S:-90}" \
      --log-level "${TTFT_LOG_LEVEL:-info}" --gap-ms "${!gap:-${TTFT_GAP_MS:-0}}" --hf "$work/anchor/anchor.json" --out "$work/ttft$n/ttft.json"
  done
  [ -f /tmp/freekv-8b/config.json ] && step serving "${SERVING_S:-300}" env FREEKV_BACKEND=cuda FREEKV_MODEL=/tmp/freekv-8b ${SERVING_ENV:-} \
    node dist/bench/serving.js --rates "${SERVING_RATES:-0.5,1,2}" --duration-s "${SERVING_DURATION_S:-45}" \
    --prompt-min 1024 --prompt-max 32768 --new-min 64 --new-max 512 --drain-s "${SERVING_DRAIN_S:-60}" --out "$work/serving/serving.json"
  # SERVING2_ENV: the same load again with the services in that environment (A/B).
  [ -f /tmp/freekv-8b/config.json ] && [ -n "${SERVING2_ENV:-}" ] && step serving2 "${SERVING_S:-300}" env FREEKV_BACKEND=cuda FREEKV_MODEL=/tmp/freekv-8b ${SERVING2_ENV} \
    node dist/bench/serving.js --rates "${SERVING_RATES:-0.5,1,2}" --duration-s "${SERVING_DURATION_S:-45}" \
    --prompt-min 1024 --prompt-max 32768 --new-min 64 --new-max 512 --drain-s "${SERVING_DRAIN_S:-60}" --out "$work/serving2/serving.json"
  [ -f /tmp/freekv-8b/config.json ] && step overhead "${OVERHEAD_S:-150}" env FREEKV_BACKEND=cuda FREEKV_MODEL=/tmp/freekv-8b FREEKV_MAX_CONTEXT_TOKENS=4096 \
    node dist/bench/overhead.js --commit "$(sed -n 's/.*at commit \([0-9a-f]*\).*/\1/p' .gpu/services-build.txt)" \
    --skip attention --gen-tokens 80 --out "$work/overhead/overhead.json"
else
  echo "demo, overhead: skipped (need .gpu/services.tar.xz; overhead also the model folder the runner step writes)" >> "$summary"
fi
# PROFILE=1: per-kernel device times of one decode step under Nsight Compute (duration only, clocks
# and caches left alone), for the point and mode of PROFILE_ARGS; needs the runner step's model folder.
if [ "${PROFILE:-0}" = 1 ] && [ -f /tmp/freekv-8b/config.json ]; then
  step profile "${PROFILE_S:-150}" ncu --profile-from-start off --clock-control none \
    --cache-control none --metrics gpu__time_duration.sum --csv --log-file "$work/profile/ncu.csv" \
    node --max-old-space-size=8192 .gpu/runner-bench.mjs --profile-steps 1 --out "$work/profile" ${PROFILE_ARGS:---points 16:8192 --modes freekv-direct --steps 2}
fi
step bench "${BENCH_S:-90}" bash bench/gpu/run.sh --bench-s $(( ${BENCH_S:-90} - 20 )) --runner-s 0 --anchor-s 0 \
  --sections "${BENCH_SECTIONS:-ceilings,attention,recall,prefill}"
cat "$summary"
