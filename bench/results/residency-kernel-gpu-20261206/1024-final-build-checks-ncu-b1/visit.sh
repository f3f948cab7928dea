# the attention table's overlap from shared memory: engine cases, Nsight Compute, then 1 x 32K against the addon of 8f0c280
set -u
root=$PWD
cd .gpu && for f in freekv_shm.node.xz parity.mjs.xz runner-bench.mjs.xz run-checks.mjs.xz; do xz -df $f; done
xz -dc freekv.node.xz > freekv.node; xz -dc base.node.xz > base.node; chmod +x freekv.node base.node; cd "$root"
mkdir -p /tmp/nodebin; [ -x /tmp/nodebin/node ] || { xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node; }
export PATH=/tmp/nodebin:$PATH LD_LIBRARY_PATH=$root/.gpu/lib FREEKV_SHM_ADDON=$root/.gpu/freekv_shm.node
R=$OUT/r; mkdir -p $R; S=$OUT/summary.txt
cp .gpu/parity-build.txt $R/
t0=$SECONDS
nvidia-smi --query-gpu=name --format=csv,noheader >> $S
OUT=$R/checks timeout 110 bash .gpu/run.sh --timeout-s 100 --no-timing > $R/checks.txt 2>&1; echo "checks rc=$? at $((SECONDS-t0))s" >> $S
grep -a -E 'cases pass|FAIL' $R/checks.txt | tail -5 >> $S
mkdir -p $R/ncu
for m in freekv-direct resident_sparse-direct; do
  FREEKV_ADDON=$root/.gpu/freekv.node timeout 60 ncu --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    --log-file $R/ncu/ncu-$m.csv node --max-old-space-size=8192 .gpu/runner-bench.mjs --dir /tmp/m8b --layers 4 \
    --profile-steps 1 --points 1:32768 --modes $m@0.95 --warmup 32 --steps 3 --out $R/ncu/r-$m > $R/ncu/log-$m.txt 2>&1
  echo "ncu $m rc=$? at $((SECONDS-t0))s" >> $S
done
run() {  # name addon points
  local left=$((280 - (SECONDS-t0)))
  [ $left -lt 40 ] && { echo "$1 skipped (time)" >> $S; return; }
  FREEKV_ADDON=$root/.gpu/$2 OUT=$R/$1 bash scripts/gpu/runner-bench.sh --timeout-s $left --points $3 \
    --modes freekv@0.95,resident_sparse@0.95 --warmup 32 --steps 16 > $R/$1.txt 2>&1
  echo "$1 ($2) rc=$? at $((SECONDS-t0))s" >> $S
  grep -a 'ms/step' $R/$1.txt | cut -c1-150 >> $S
}
run new-b1 freekv.node 1:32768
run base-b1 base.node 1:32768
cd $OUT && tar cJf r.tar.xz r && rm -rf r
cat $S
