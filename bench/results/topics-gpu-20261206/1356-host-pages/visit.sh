# the SMs' read rate of host memory against the store's page size (4 KiB shared, THP, hugetlb), with the host's settings
set -u
root=$PWD
cd .gpu && xz -df bench/freekv_gpu_bench.xz && chmod +x bench/freekv_gpu_bench; cd "$root"
R=$OUT/r; mkdir -p $R; S=$OUT/summary.txt
{ nvidia-smi --query-gpu=name,pci.bus_id --format=csv,noheader
  echo "thp: $(cat /sys/kernel/mm/transparent_hugepage/enabled) shmem: $(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>&1)"
  echo "cmdline: $(cat /proc/cmdline)"; echo "iommu groups: $(ls /sys/kernel/iommu_groups 2>/dev/null | wc -l); iommu class: $(ls /sys/class/iommu 2>/dev/null | tr '\n' ' ')"
  grep -i -E 'hugepages_total|hugepagesize' /proc/meminfo | tr '\n' ' '; echo
  nproc; lscpu | grep -E 'Model name|NUMA node\(s\)'; } >> $S 2>&1
nvidia-smi -q > $R/nvidia-smi-q.txt 2>&1; nvidia-smi topo -m > $R/topo.txt 2>&1
echo 2200 > /proc/sys/vm/nr_hugepages 2>> $S; echo "nr_hugepages now $(cat /proc/sys/vm/nr_hugepages)" >> $S
for m in shared thp hugetlb shared; do
  FKB_STORE_PAGES=$m timeout 60 .gpu/bench/freekv_gpu_bench --out $R/bench-$m.json --deadline-s 50 --sections ceilings,recall > $R/bench-$m.txt 2>&1
  echo "== $m rc=$?" >> $S
  grep -a -E 'recall store|gather|residency diff|H2D' $R/bench-$m.txt | cut -c1-120 >> $S
done
cd $OUT && tar cJf r.tar.xz r && rm -rf r
cat $S
