#!/usr/bin/env bash
# On the GPU machine, from the repository root with .gpu carried (bench/gpu/build.sh, then
# scripts/gpu/squeeze.sh): the machine's recall rows (the benchmark's ceilings and recall sections), then runner points on
# the topics feed (--keys topics --warmup 32 --steps 16 unless an argument says otherwise; the HBM
# floors at the copy rate the bench measured), one runner process an argument:
#   bash scripts/gpu/points.sh 'NAME|MIN_SECONDS|RUNNER ARGUMENTS' ...
# A process starts only where MIN_SECONDS are left of the command's VISIT_S (585 unless set);
# everything lands in $OUT/summary.txt and $OUT/r.tar.xz.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/.gpu/out}
bash scripts/gpu/unpack.sh || exit 2
R=$OUT/r; mkdir -p $R; S=$OUT/summary.txt
cp .gpu/parity-build.txt $R/
t0=$SECONDS
{ nvidia-smi --query-gpu=name,memory.total,pci.bus_id,driver_version --format=csv,noheader; df -h /dev/shm | tail -1; free -g | head -2; nproc; } >> $S 2>&1
OUT=$R/bench timeout 90 bash bench/gpu/run.sh --bench-s 60 --runner-s 0 --anchor-s 0 --sections ceilings,recall > $R/bench.txt 2>&1
echo "bench rc=$? at $((SECONDS-t0))s" >> $S
grep -a -E 'gather|residency diff|H2D|D2H' $R/bench.txt | cut -c1-150 | head -16 >> $S
# The runners' HBM floors at this machine's measured copy bandwidth (as bench/gpu/run.sh does), else
# at runner-bench's default (the H200's), said so.
hbm=$(bash bench/gpu/hbm-rate.sh "$R/bench/bench.json") \
  && echo "floors at the measured HBM copy rate, $hbm GB/s" >> $S \
  || { hbm=4290; echo "floors at $hbm GB/s (runner-bench's default; no measured copy rate)" >> $S; }
for spec in "$@"; do
  IFS='|' read -r name need args <<< "$spec"
  left=$((${VISIT_S:-585} - (SECONDS-t0)))
  [ $left -lt $need ] && { echo "$name skipped ($left s left)" >> $S; continue; }
  # shellcheck disable=SC2086  # the runner arguments split on spaces
  OUT=$R/$name bash scripts/gpu/runner-bench.sh --timeout-s $left --hbm-gbps $hbm --keys topics --warmup 32 --steps 16 $args > $R/$name.txt 2>&1
  echo "$name rc=$? at $((SECONDS-t0))s" >> $S
  grep -a -E 'ms/step|Model.load|wrote|sessions filled' $R/$name.txt | cut -c1-260 >> $S
done
cd $OUT && tar cJf r.tar.xz r && rm -rf r
cat $S
