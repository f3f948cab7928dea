#!/usr/bin/env bash
# Packs what running the services themselves on the GPU machine needs (it has no Node.js toolchain
# and no node_modules): the compiled TypeScript (dist/, `npm run build:ts`) and the production
# dependencies (npm ci --omit=dev, no install scripts) and the built-in model into
# .gpu/services.tar.xz. Needs the rest
# of .gpu/ from scripts/gpu/pack.sh (Node.js, the addon).
#
# On the GPU machine, from the repository root with .gpu/ alongside:
#   tar xJf .gpu/services.tar.xz            # dist/ and node_modules/ in place
#   export PATH=/tmp/nodebin:$PATH FREEKV_ADDON=$PWD/.gpu/freekv.node LD_LIBRARY_PATH=$PWD/.gpu/lib
#   FREEKV_BACKEND=cuda FREEKV_MODEL=/path/to/hf-folder node dist/bench/overhead.js --skip attention
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
npx tsc -p tsconfig.json
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp package.json package-lock.json "$tmp/"
(cd "$tmp" && npm ci --omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
mkdir -p .gpu
# Type declarations, source maps, READMEs and the packages' own tests are not run: leaving them out
# keeps the folder that travels to the GPU machine under its size limit (5.1 MB -> about 2.6 MB).
XZ_OPT=-9e tar -cJf .gpu/services.tar.xz --exclude='*.map' --exclude='*.d.ts' --exclude='*.d.cts' --exclude='*.d.mts' \
  --exclude='*.md' --exclude='node_modules/*/test' --exclude='node_modules/*/tests' dist models/builtin -C "$tmp" node_modules
echo "services packed at commit $(git rev-parse --short=12 HEAD) $(date -u +%FT%TZ)" > .gpu/services-build.txt
ls -la .gpu/services.tar.xz
