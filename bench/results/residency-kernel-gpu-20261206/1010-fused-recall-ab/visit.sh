# the fused recall + scanned attention table: engine cases, parity, then A/B against the addon of 8f0c280
set -u
root=$PWD
cd .gpu && for f in freekv_shm.node.xz parity.mjs.xz runner-bench.mjs.xz run-checks.mjs.xz; do xz -df $f; done
xz -dc freekv.node.xz > freekv.node; xz -dc base.node.xz > base.node; chmod +x freekv.node base.node; cd "$root"
mkdir -p /tmp/nodebin; xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node
export PATH=/tmp/nodebin:$PATH LD_LIBRARY_PATH=$root/.gpu/lib FREEKV_SHM_ADDON=$root/.gpu/freekv_shm.node
R=$OUT/r; mkdir -p $R; S=$OUT/summary.txt
cp .gpu/parity-build.txt $R/
t0=$SECONDS
nvidia-smi --query-gpu=name --format=csv,noheader >> $S
OUT=$R/checks timeout 130 bash .gpu/run.sh --timeout-s 120 --no-timing > $R/checks.txt 2>&1; echo "checks rc=$? at $((SECONDS-t0))s" >> $S
grep -a -E 'cases pass|FAIL' $R/checks.txt | tail -5 >> $S
OUT=$R/parity timeout 70 bash scripts/gpu/parity.sh --timeout-s 60 > $R/parity.txt 2>&1; echo "parity rc=$? at $((SECONDS-t0))s" >> $S
grep -a -E 'parity checks pass|FAIL' $R/parity.txt | tail -5 >> $S
run() {  # name addon points
  local left=$((565 - (SECONDS-t0)))
  [ $left -lt 60 ] && { echo "$1 skipped (time)" >> $S; return; }
  FREEKV_ADDON=$root/.gpu/$2 OUT=$R/$1 bash scripts/gpu/runner-bench.sh --timeout-s $((left-5)) --points $3 \
    --modes freekv@0.95,resident_sparse@0.95 --warmup 32 --steps 16 > $R/$1.txt 2>&1
  echo "$1 ($2) rc=$? at $((SECONDS-t0))s" >> $S
  grep -a 'ms/step' $R/$1.txt | cut -c1-150 >> $S
}
run new-b1b4 freekv.node 1:32768,4:32768
run base-b1b4 base.node 1:32768,4:32768
run new-b16 freekv.node 16:8192
run new-128k freekv.node 1:131072
cd $OUT && tar cJf r.tar.xz r && rm -rf r
cat $S
