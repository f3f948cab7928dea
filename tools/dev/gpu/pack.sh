#!/usr/bin/env bash
# Packs the demo for the GPU machine (no Node.js toolchain, no node_modules there) into the
# git-ignored tmp/ folder: Node.js, the addon built here with nvcc, and the kvstore, compute and
# demo bundled with esbuild. Then, on the GPU machine, from the repository root:
#   bash tmp/gpu/run.sh    # on the GPU machine, in a copy of the tree that includes the git-ignored tmp/gpu, tmp/proto; time limit 420 s
# which runs the demo with FREEKV_BACKEND=cuda, then with the CPU backend on the same machine.
#
# Bundles keep reading .proto files at run time: ours from proto/ (it travels with the tree),
# grpc.health.v1 and grpc.reflection from tmp/proto/ (where the bundled libraries look, next to
# the bundle), and grpc-health-check's protoPath from a two-file package written into tmp/gpu/node_modules.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
flock /tmp/freekv-native.lock node native/build.mjs >/tmp/freekv-gpu-demo-build.log 2>&1 || { tail -30 /tmp/freekv-gpu-demo-build.log; exit 1; }
node -e 'const a=require("./native/build/Release/freekv.node"); if(!a.backendInfo().cudaBuilt){console.error("the addon has no CUDA backend (nvcc missing?)"); process.exit(1)}'
rm -rf tmp/gpu tmp/proto
mkdir -p tmp/gpu/lib tmp/proto/health/v1 tmp/proto/grpc/reflection tmp/gpu/node_modules/grpc-health-check
if [ -f .gpu/node.xz ]; then cp .gpu/node.xz tmp/gpu/node.xz; else bash scripts/gpu/pack-node.sh >/dev/null && cp .gpu/node.xz tmp/gpu/node.xz; fi
cp native/build/Release/freekv.node tmp/gpu/
gomp=$(ldd native/build/Release/freekv.node | awk '/libgomp/ {print $3}')
[ -n "$gomp" ] && cp -L "$gomp" tmp/gpu/lib/
banner="import { createRequire as __cr } from 'module'; import { fileURLToPath as __fu } from 'url'; import { dirname as __dn } from 'path'; const require = __cr(import.meta.url); const __filename = __fu(import.meta.url); const __dirname = __dn(__filename);"
for e in services/kvstore/main services/compute/main tools/dev/demo; do
  npx esbuild "$e.ts" --bundle --platform=node --format=esm --target=node20 --outfile="tmp/gpu/${e#*/}.js" --log-level=warning --banner:js="$banner"
done
health=node_modules/grpc-health-check/proto/health/v1/health.proto
cp "$health" tmp/proto/health/v1/
cp "$health" tmp/gpu/node_modules/grpc-health-check/
echo '{"name":"grpc-health-check","main":"index.js"}' > tmp/gpu/node_modules/grpc-health-check/package.json
echo 'module.exports = { protoPath: __dirname + "/health.proto" };' > tmp/gpu/node_modules/grpc-health-check/index.js
cp -r node_modules/@grpc/reflection/build/proto/grpc/reflection/v1 node_modules/@grpc/reflection/build/proto/grpc/reflection/v1alpha tmp/proto/grpc/reflection/
cp tools/dev/gpu/run.sh tmp/gpu/run.sh
du -sh tmp/gpu tmp/proto
