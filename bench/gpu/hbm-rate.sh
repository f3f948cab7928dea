#!/usr/bin/env bash
# Prints the HBM copy rate (GB/s, read + write) the kernel program measured in the JSON it wrote
# (`ceilings.d2d_copy_GBps_read_plus_write`), the bandwidth runner-bench's floors are computed at;
# exits 1 when the file or the figure is missing:  bash bench/gpu/hbm-rate.sh BENCH_JSON
node -e 'try { const c = require(require("node:path").resolve(process.argv[1])).ceilings.d2d_copy_GBps_read_plus_write; if (!(c > 0)) throw 0; process.stdout.write(String(c)); } catch { process.exit(1); }' "$1" 2>/dev/null
