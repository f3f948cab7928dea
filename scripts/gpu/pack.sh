#!/usr/bin/env bash
# Packs what the CUDA correctness run needs into the git-ignored .gpu/ folder (the GPU machine has
# no Node.js and no node_modules; nothing is built there):
#   .gpu/node.xz          Node.js of this machine, stripped (scripts/gpu/pack-node.sh)
#   .gpu/freekv.node      the addon, built here with nvcc (sm_90a) and libcudart_static
#   .gpu/lib/             libgomp (the addon's OpenMP runtime), in case the GPU image lacks it
#   .gpu/run-checks.mjs   scripts/gpu/run-checks.ts bundled with esbuild (cases + binding)
# Then run on the GPU machine with .gpu copied alongside the tree: see scripts/gpu/README.md.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
flock /tmp/freekv-native.lock node native/build.mjs >/tmp/freekv-gpu-pack-build.log 2>&1 || { tail -30 /tmp/freekv-gpu-pack-build.log; exit 1; }
node -e 'const a=require("./native/build/Release/freekv.node"); if(!a.backendInfo().cudaBuilt){console.error("the addon has no CUDA backend (nvcc missing?)"); process.exit(1)}'
bash scripts/gpu/pack-node.sh >/dev/null
mkdir -p .gpu/lib
cp native/build/Release/freekv.node .gpu/freekv.node
cp native/build/Release/freekv_shm.node .gpu/freekv_shm.node
gomp=$(ldd native/build/Release/freekv.node | awk '/libgomp/ {print $3}')
[ -n "$gomp" ] && cp -L "$gomp" .gpu/lib/
npx esbuild scripts/gpu/run-checks.ts --minify-whitespace --minify-syntax --bundle --platform=node --format=esm --target=node20 \
    --banner:js="import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" \
  --outfile=.gpu/run-checks.mjs --log-level=warning
cp scripts/gpu/run.sh .gpu/run.sh
du -sh .gpu; ls -la .gpu .gpu/lib
