#!/usr/bin/env bash
# On the GPU machine, from the repository root, after tools/dev/gpu/pack.sh filled tmp/ here:
# the demo through both tiers with FREEKV_BACKEND=cuda, then with the CPU backend.
set -uo pipefail
mkdir -p /tmp/nodebin
xz -dc tmp/gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node
export PATH=/tmp/nodebin:$PATH
export LD_LIBRARY_PATH=$PWD/tmp/gpu/lib:${LD_LIBRARY_PATH:-}
export FREEKV_ADDON=$PWD/tmp/gpu/freekv.node
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
node -e 'const a=require(process.env.FREEKV_ADDON); console.log(JSON.stringify(a.backendInfo()))'
echo "== demo, FREEKV_BACKEND=cuda =="
FREEKV_BACKEND=cuda timeout 200 node tmp/gpu/dev/demo.js; rc1=$?
echo "== demo, FREEKV_BACKEND=cpu (same machine) =="
FREEKV_BACKEND=cpu timeout 200 node tmp/gpu/dev/demo.js; rc2=$?
echo "rc cuda=$rc1 cpu=$rc2"
exit $rc1
