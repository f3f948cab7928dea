# H100 (80 GB): the machine's recall rows, then 16 x 32K on the topics feed: FreeKV pool 4 and pool 8
# at 32 layers (resident_sparse needs 64 GiB of KV beside 15 GiB of weights: it does not fit), then
# FreeKV against resident_sparse at 16 of the 32 layers (--layers 16), where both fit
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
run() {  # name min_seconds runner-arguments...
  local name=$1 need=$2; shift 2
  local left=$((585 - (SECONDS-t0)))
  [ $left -lt $need ] && { echo "$name skipped ($left s left)" >> $S; return; }
  OUT=$R/$name bash scripts/gpu/runner-bench.sh --timeout-s $left "$@" --keys topics --warmup 32 --steps 16 > $R/$name.txt 2>&1
  echo "$name rc=$? at $((SECONDS-t0))s" >> $S
  grep -a -E 'ms/step|Model.load|wrote|16 sessions filled' $R/$name.txt | cut -c1-260 >> $S
}
run b16-32k 250 --points 16:32768 --modes freekv@0.95,freekv-pool8@0.95
run b16-32k-16l 150 --layers 16 --points 16:32768 --modes freekv@0.95,resident_sparse@0.95
cd $OUT && tar cJf r.tar.xz r && rm -rf r
cat $S
