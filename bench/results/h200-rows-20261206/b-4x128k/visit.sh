# H200: the machine's recall rows (ceilings, recall), then 4 x 128K on the topics feed:
# FreeKV (pool 4) and resident_sparse in one process, FreeKV pool 8 in a second one where time is left
set -u
root=$PWD
bash scripts/gpu/unpack.sh || exit 2
mkdir -p /tmp/nodebin; [ -x /tmp/nodebin/node ] || { xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node; }
R=$OUT/r; mkdir -p $R; S=$OUT/summary.txt
cp .gpu/parity-build.txt $R/
t0=$SECONDS
{ nvidia-smi --query-gpu=name,memory.total,pci.bus_id,driver_version --format=csv,noheader; df -h /dev/shm | tail -1; free -g | head -2; nproc; } >> $S 2>&1
OUT=$R/bench timeout 90 bash bench/gpu/run.sh --bench-s 60 --runner-s 0 --anchor-s 0 --sections ceilings,recall > $R/bench.txt 2>&1
echo "bench rc=$? at $((SECONDS-t0))s" >> $S
grep -a -E 'gather|residency diff|H2D|D2H' $R/bench.txt | cut -c1-150 | head -16 >> $S
run() {  # name points modes min_seconds
  local left=$((585 - (SECONDS-t0)))
  [ $left -lt $4 ] && { echo "$1 skipped ($left s left)" >> $S; return; }
  OUT=$R/$1 bash scripts/gpu/runner-bench.sh --timeout-s $left --points $2 --modes $3 --keys topics --warmup 32 --steps 16 > $R/$1.txt 2>&1
  echo "$1 rc=$? at $((SECONDS-t0))s" >> $S
  grep -a -E 'ms/step|Model.load|wrote|4 sessions filled' $R/$1.txt | cut -c1-260 >> $S
}
run b4-128k 4:131072 freekv@0.95,resident_sparse@0.95 300
run b4-128k-pool8 4:131072 freekv-pool8@0.95 170
cd $OUT && tar cJf r.tar.xz r && rm -rf r
cat $S
