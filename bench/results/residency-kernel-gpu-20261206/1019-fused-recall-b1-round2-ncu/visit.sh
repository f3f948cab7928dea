# second round at 1 x 32K, the other order (base first), then Nsight Compute of the new addon
set -u
root=$PWD
cd .gpu && for f in freekv_shm.node.xz runner-bench.mjs.xz; do xz -df $f; done
xz -dc freekv.node.xz > freekv.node; xz -dc base.node.xz > base.node; chmod +x freekv.node base.node; cd "$root"
export PATH=/tmp/nodebin:$PATH LD_LIBRARY_PATH=$root/.gpu/lib FREEKV_SHM_ADDON=$root/.gpu/freekv_shm.node
R=$OUT/r; mkdir -p $R; S=$OUT/summary.txt
t0=$SECONDS
run() {  # name addon points
  FREEKV_ADDON=$root/.gpu/$2 OUT=$R/$1 bash scripts/gpu/runner-bench.sh --timeout-s 110 --points $3 \
    --modes freekv@0.95,resident_sparse@0.95 --warmup 32 --steps 16 > $R/$1.txt 2>&1
  echo "$1 ($2) rc=$? at $((SECONDS-t0))s" >> $S
  grep -a 'ms/step' $R/$1.txt | cut -c1-150 >> $S
}
run base-b1-r2 base.node 1:32768
run new-b1-r2 freekv.node 1:32768
mkdir -p $R/ncu
for m in freekv-direct resident_sparse-direct; do
  FREEKV_ADDON=$root/.gpu/freekv.node timeout 100 ncu --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    --log-file $R/ncu/ncu-$m.csv node --max-old-space-size=8192 .gpu/runner-bench.mjs --dir /tmp/m8b --layers 4 \
    --profile-steps 1 --points 1:32768 --modes $m@0.95 --warmup 32 --steps 3 --out $R/ncu/r-$m > $R/ncu/log-$m.txt 2>&1
  echo "ncu $m rc=$? at $((SECONDS-t0))s" >> $S
done
cd $OUT && tar cJf r.tar.xz r && rm -rf r
cat $S
