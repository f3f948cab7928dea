#!/usr/bin/env bash
# Runs on the GPU machine from the folder made by tools/train/pack.sh:
#   bash .gpu/train/run.sh [train.py options, e.g. --minutes 7]
# Unpacks node (when none is on PATH) and the corpus, then trains, saves and evaluates. The model
# folder goes to $OUT/model (or --out DIR).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${TMPDIR:-/tmp}/freekv-train
mkdir -p "$WORK"
unxz_to() { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"), 1 << 20)' "$1" "$2"; }

NODE=$(command -v node || true)
if [ -z "$NODE" ] || ! "$NODE" -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then
  NODE="$WORK/node"
  [ -x "$NODE" ] || { unxz_to "$HERE/node.xz" "$NODE.tmp" && chmod +x "$NODE.tmp" && mv "$NODE.tmp" "$NODE"; }
fi
echo "node: $NODE $("$NODE" --version)"
[ -f "$WORK/corpus.txt" ] || unxz_to "$HERE/corpus.txt.xz" "$WORK/corpus.txt"

TOK=()
[ -f "$HERE/tokenizer/tokenizer.json" ] && TOK=(--tokenizer "$HERE/tokenizer")
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python3 -u "$HERE/train.py" --corpus "$WORK/corpus.txt" --tasks-js "$HERE/js/main.js" --node "$NODE" \
  --out "${OUT:-$HERE/out}/model" --total-minutes 9.3 "${TOK[@]}" "$@"
