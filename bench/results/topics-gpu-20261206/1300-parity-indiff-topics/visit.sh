# parity at f6d574d, the recall benchmark's in_diff rows, then the steady-state step with keys around recurring topics
set -u
root=$PWD
cd .gpu && for f in freekv_shm.node.xz parity.mjs.xz runner-bench.mjs.xz run-checks.mjs.xz bench/freekv_gpu_bench.xz; do xz -df $f; done
xz -dc freekv.node.xz > freekv.node; chmod +x freekv.node bench/freekv_gpu_bench; cd "$root"
mkdir -p /tmp/nodebin; [ -x /tmp/nodebin/node ] || { xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node; }
export PATH=/tmp/nodebin:$PATH LD_LIBRARY_PATH=$root/.gpu/lib FREEKV_ADDON=$root/.gpu/freekv.node FREEKV_SHM_ADDON=$root/.gpu/freekv_shm.node
R=$OUT/r; mkdir -p $R; S=$OUT/summary.txt
cp .gpu/parity-build.txt $R/
t0=$SECONDS
nvidia-smi --query-gpu=name --format=csv,noheader >> $S
OUT=$R/parity timeout 70 bash scripts/gpu/parity.sh --timeout-s 60 > $R/parity.txt 2>&1; echo "parity rc=$? at $((SECONDS-t0))s" >> $S
grep -a -E 'parity checks pass|FAIL' $R/parity.txt | tail -3 >> $S
OUT=$R/bench timeout 100 bash bench/gpu/run.sh --bench-s 70 --runner-s 0 --anchor-s 0 --sections ceilings,recall > $R/bench.txt 2>&1
echo "bench rc=$? at $((SECONDS-t0))s" >> $S
grep -a -i 'in_diff' $R/bench.txt | cut -c1-160 | head -12 >> $S
run() {  # name points modes
  local left=$((575 - (SECONDS-t0)))
  [ $left -lt 40 ] && { echo "$1 skipped (time)" >> $S; return; }
  OUT=$R/$1 bash scripts/gpu/runner-bench.sh --timeout-s $left --points $2 --modes $3 --keys topics --warmup 32 --steps 16 > $R/$1.txt 2>&1
  echo "$1 rc=$? at $((SECONDS-t0))s" >> $S
  grep -a 'ms/step' $R/$1.txt | cut -c1-230 >> $S
}
run topics-b4-b16 4:32768,16:8192 freekv@0.95,resident_sparse@0.95,freekv-pool8@0.95
run topics-b1 1:32768 freekv@0.95,resident_sparse@0.95,freekv-pool8@0.95
cd $OUT && tar cJf r.tar.xz r && rm -rf r
cat $S
