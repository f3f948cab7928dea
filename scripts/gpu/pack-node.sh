#!/usr/bin/env bash
# Packs this machine's Node.js into .gpu/node.xz for the GPU machine (it has no Node.js and reaches
# no registry). The binary travels stripped of its symbols (99 MB -> 86 MB; xz -9e: 24.2 MB -> 21.9 MB
# for node 20.20): the folder that travels to that machine has a 64 MiB limit, and the symbols are
# only for debuggers. Made again when the node on PATH changes.
#   bash scripts/gpu/pack-node.sh            (from the repository root)
# On the GPU machine: xz -dc .gpu/node.xz > /tmp/nodebin/node && chmod +x /tmp/nodebin/node
set -euo pipefail
root=$(git rev-parse --show-toplevel)
mkdir -p "$root/.gpu"
node_bin=$(readlink -f "$(command -v node)")
out="$root/.gpu/node.xz"
src="$node_bin $(node --version) stripped"
if [ ! -f "$out" ] || [ "$(cat "$out.src" 2>/dev/null)" != "$src" ]; then
  tmp=$(mktemp)
  trap 'rm -f "$tmp"' EXIT
  cp "$node_bin" "$tmp"
  strip --strip-all "$tmp" 2>/dev/null || cp "$node_bin" "$tmp"  # no binutils: the binary as it is
  chmod +x "$tmp"
  "$tmp" -e 'process.exit(0)'
  xz -T2 -9e -c "$tmp" > "$out.tmp" && mv "$out.tmp" "$out"
  echo "$src" > "$out.src"
fi
ls -la "$out"
