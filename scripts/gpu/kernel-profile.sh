#!/usr/bin/env bash
# One kernel launch under Nsight Compute with the full section set (warp states, source counters
# with sampled stall reasons per SASS instruction, pipes), printed as text for reading here:
#   bash scripts/gpu/kernel-profile.sh OUTDIR prefill [N[:VARIANT]]    the sm_90a prefill attention
#   bash scripts/gpu/kernel-profile.sh OUTDIR selection [CONTEXT]      the selection's scoring pass
#   bash scripts/gpu/kernel-profile.sh OUTDIR sass                     the prefill kernel's variants:
#       where the compiler put the wait for the previous PV (exp2s between the two waits = overlapped)
# Writes OUTDIR/<what>.ncu-rep, <what>-details.txt and <what>-sass.csv (per-instruction samples).
set -uo pipefail
out=$1 what=$2 arg=${3:-}
mkdir -p "$out"
bench=.gpu/bench/freekv_gpu_bench
case $what in
  prefill)
    FKB_PREFILL_ONE=${arg:-32768} ncu --set full --import-source no -k regex:FlashPrefillWgmma --launch-skip 1 \
      --launch-count 1 -f -o "$out/prefill" "$bench" --sections prefill --out "$out/prefill-bench.json" ;;
  selection)
    FKB_SELECTION_CONTEXTS=${arg:-1048576} ncu --set full --import-source no -k regex:SelectionScore --launch-skip 4 \
      --launch-count 1 -f -o "$out/selection" "$bench" --sections selection --out "$out/selection-bench.json" ;;
  sass)
    cuobjdump -sass "$bench" | awk '/Function : / { keep = /FlashPrefillWgmmaKernel/ } keep' > "$out/prefill.sass"
    awk '/Function : .*FlashPrefillWgmmaKernel/ { if (name) print name, ex1, ex0; match($0, /Kernel(I|ILi)[0-9]+/); name = $0; sub(/.*KernelILi/, "variant ", name); sub(/E.*/, "", name); state = 0; ex1 = 0; ex0 = 0 }
         /WARPGROUP.DEPBAR.LE gsb0, 0x1/ { state = 1 }
         /WARPGROUP.DEPBAR.LE gsb0, 0x0/ { if (state == 1) state = 2 }
         /MUFU.EX2/ { if (state == 1) ex1++; else if (state == 2) ex0++ }
         END { if (name) print name, ex1, ex0 }' "$out/prefill.sass" | sed 's/^/exp2s after wait<1>, before and after the next wait<0>: /' | tee "$out/sass-summary.txt"
    exit 0 ;;
  *) echo "unknown kernel $what" >&2; exit 2 ;;
esac
ncu -i "$out/$what.ncu-rep" --page details --print-units base > "$out/$what-details.txt" 2>&1
ncu -i "$out/$what.ncu-rep" --page source --csv --print-source sass > "$out/$what-sass.csv" 2>&1 ||
  ncu -i "$out/$what.ncu-rep" --page source --csv > "$out/$what-sass.csv" 2>&1
ls -la "$out"
