#!/usr/bin/env bash
# `freekv eval` of the trained model (models/retrieval-8m) on the CUDA backend, on the GPU machine
# (a step of scripts/gpu/visit.sh, after dist/ and node_modules/ are unpacked from
# .gpu/services.tar.xz). The task files are made here first, from the machine's filler corpus:
#
#   node tools/train/corpus.mjs && npm run build:ts && for T in 8192 16384 32768; do
#     node dist/tools/tasks/main.js --corpus .gpu/corpus/corpus.txt --seed 31 --count 18 --context-tokens $T \
#       --chars-per-token 3.77 --families single_needle,multi_key,multi_value,multi_query,variable_tracking,ordered_retrieval \
#       --depths 0.15,0.5,0.85 --out .gpu/eval/tasks-$T.jsonl; done
#
# Runs (each under its own time limit, so one cut short leaves the others' results; one per task
# file, whose task ids repeat from one length to the next):
#   1. the issue's budget, 512 sink + 1024 selected + 512 window, pages of 32, at 8K, 16K and 32K,
#      every mode;
#   2. a smaller budget, 64 + 256 + 64 with pages of 16, at 16K, every mode.
# Writes eval-*.json / .svg / .txt under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-.}
model=${EVAL_MODEL:-models/retrieval-8m}
conc=${EVAL_CONCURRENCY:-8}
modes=dense,oracle,speculative,freekv,sink_window
# EVAL_PER_LENGTH tasks of each file (the files cycle through the families, so 12 = 2 per family).
per=${EVAL_PER_LENGTH:-18}
# EVAL_LENGTHS: the context lengths run with the main budget (task files .gpu/eval/tasks-$T.jsonl).
lengths=${EVAL_LENGTHS:-8192 16384 32768}
for T in $lengths; do head -n "$per" .gpu/eval/tasks-$T.jsonl > /tmp/eval-$T.jsonl; done
head -n "${EVAL_SMALL_PER_LENGTH:-$per}" .gpu/eval/tasks-16384.jsonl > /tmp/eval-small.jsonl
run() {  # run NAME SECONDS TASKS BUDGET PAGE
  local name=$1 limit=$2 tasks=$3 budget=$4 page=$5
  echo "[eval] $name: budget $budget, pages of $page, $(wc -l < "$tasks") tasks x 5 modes, limit $limit s"
  timeout "$limit" node dist/tools/cli/main.js eval --backend cuda --model "$model" --tasks "$tasks" --modes $modes \
    --budget "$budget" --page-size "$page" --concurrency "$conc" --json "$out/eval-$name.json" --svg "$out/eval-$name.svg" \
    > "$out/eval-$name.txt" 2>&1
  echo "[eval] $name: exit $?"
  grep -E "^all |^freekv |^dense |^oracle |^speculative |^sink_window " "$out/eval-$name.txt" | head -12
}
for T in $lengths; do run "budget2048-$T" "${EVAL_MAIN_S:-100}" /tmp/eval-$T.jsonl 512+1024+512 32; done
run budget384-16384 "${EVAL_SMALL_S:-100}" /tmp/eval-small.jsonl 64+256+64 16
