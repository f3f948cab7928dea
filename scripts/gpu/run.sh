#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, after scripts/gpu/pack.sh filled .gpu/ here.
# Unpacks Node.js, then runs every CUDA correctness case; log + JSON under $OUT.
set -uo pipefail
mkdir -p /tmp/nodebin
xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node
export PATH=/tmp/nodebin:$PATH
export LD_LIBRARY_PATH=$PWD/.gpu/lib:${LD_LIBRARY_PATH:-}
export FREEKV_ADDON=$PWD/.gpu/freekv.node
export OUT=${OUT:-$PWD/.gpu/out}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader || true
node .gpu/run-checks.mjs
