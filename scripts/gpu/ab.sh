#!/usr/bin/env bash
# A/B of the service's decode step (scripts/gpu/runner-bench.sh), one runner process per variant and
# round, the variants' order reversed every other round (so none always runs first on a fresh
# machine), then scripts/gpu/ab-summary.mjs over all runs. From the repository root:
#   bash scripts/gpu/ab.sh [--rounds 2] [--timeout-s 150] [--ref MODE] \
#     --variant NAME[:VAR=VALUE[,VAR=VALUE...]] --variant ... -- runner arguments
# e.g. (an addon against the packed one, and the pool of eight selections against the default):
#   bash scripts/gpu/ab.sh --ref resident_sparse@0.95 --variant new --variant base:FREEKV_ADDON=$PWD/.gpu/base.node \
#     -- --points 1:32768 --modes freekv@0.95,resident_sparse@0.95 --warmup 32 --steps 16
#   bash scripts/gpu/ab.sh --variant f4 --variant f8:FREEKV_RESIDENT_FACTOR=8 -- --points 4:32768 --modes freekv@0.95
# Each run writes $OUT/r<round>-<NAME>/ (runner-bench.log and .json); the summary goes to stdout and
# $OUT/ab-summary.json. --timeout-s bounds each run. Exit code 0 when every run finished.
set -uo pipefail
cd "$(dirname "$0")/../.."
rounds=2
limit=150
ref=""
variants=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --timeout-s) limit=$2; shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    --variant) variants+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "ab.sh: unknown argument $1 (runner arguments go after --)" >&2; exit 2 ;;
  esac
done
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "ab.sh: --rounds must be a positive integer" >&2; exit 2; }
[ ${#variants[@]} -ge 1 ] || { echo "ab.sh: name at least one --variant" >&2; exit 2; }
names=()
for v in "${variants[@]}"; do
  name=${v%%:*}
  [[ "$name" =~ ^[A-Za-z0-9_.]+$ ]] || { echo "ab.sh: variant name '$name' must be letters, digits, _ or ." >&2; exit 2; }
  for n in "${names[@]}"; do [ "$n" != "$name" ] || { echo "ab.sh: variant $name named twice" >&2; exit 2; }; done
  names+=("$name")
done
export OUT=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT"
dirs=()
status=0
for ((r = 1; r <= rounds; r++)); do
  order=("${variants[@]}")
  if ((r % 2 == 0)); then
    order=()
    for ((i = ${#variants[@]} - 1; i >= 0; i--)); do order+=("${variants[$i]}"); done
  fi
  for v in "${order[@]}"; do
    name=${v%%:*}
    envs=()
    if [ "$v" != "$name" ]; then IFS=, read -r -a envs <<< "${v#*:}"; fi
    dir=$OUT/r$r-$name
    echo "== round $r, $name ${envs[*]:-} =="
    env ${envs[@]+"${envs[@]}"} OUT="$dir" bash scripts/gpu/runner-bench.sh --timeout-s "$limit" "$@" > "$dir.txt" 2>&1
    rc=$?
    [ $rc -eq 0 ] || { echo "round $r, $name: runner exit $rc (log $dir.txt)"; status=1; }
    grep -a 'ms/step' "$dir.txt" | cut -c1-160
    dirs+=("$dir")
  done
done
[ -d /tmp/nodebin ] && export PATH=/tmp/nodebin:$PATH
node scripts/gpu/ab-summary.mjs ${ref:+--ref "$ref"} --json "$OUT/ab-summary.json" "${dirs[@]}" || status=1
exit $status
