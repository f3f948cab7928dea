#!/usr/bin/env bash
# Makes .gpu/train/: everything the GPU machine needs to train the model with one command.
#   bash tools/train/pack.sh
# Contents: the corpus (xz), its description, the built task generator (JS), the Python trainer,
# the tokenizer (trained here when Python's `tokenizers` is importable, else on the GPU machine),
# and this machine's node binary (xz; used there only when that machine has no node >= 20).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.gpu/train
CORPUS=.gpu/corpus

npx tsc -p tsconfig.json
[ -f "$CORPUS/corpus.txt" ] || node tools/train/corpus.mjs --out "$CORPUS"

rm -rf "$DEST"
mkdir -p "$DEST/js"
cp dist/tools/tasks/{main,generate,filler,rng}.js "$DEST/js/"
echo '{ "type": "module" }' > "$DEST/js/package.json"
cp tools/train/{train.py,tokenizer.py,run.sh} "$DEST/"
cp "$CORPUS/corpus.json" "$DEST/"
xz -T2 -6 -c "$CORPUS/corpus.txt" > "$DEST/corpus.txt.xz"

bash scripts/gpu/pack-node.sh > /dev/null
cp .gpu/node.xz "$DEST/node.xz"

if python3 -c "import tokenizers" 2>/dev/null; then
  python3 tools/train/train.py --tokenizer-only --corpus "$CORPUS/corpus.txt" --tasks-js dist/tools/tasks/main.js --out "$DEST/tokenizer"
else
  echo "python3 tokenizers not importable here: the tokenizer will be trained on the GPU machine"
fi

du -sh "$DEST"
echo
echo "On the GPU machine, from the repository root with .gpu/train carried along:"
echo "  bash .gpu/train/run.sh --minutes 6.5"
echo "(the model folder is written to \$OUT/model; --out DIR to change it, --help for every option)"
