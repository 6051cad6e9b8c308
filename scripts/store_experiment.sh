#!/bin/bash
# Copies a finished `fastntk experiment` directory into benchmarks/results/
# experiments/<name>/, without its checkpoints (they are large and rebuilt by
# rerunning the experiment). Usage: scripts/store_experiment.sh RESULTS_DIR
set -euo pipefail
src="$1"
name="$(basename "$src")"
dst="benchmarks/results/experiments/$name"
rm -rf "$dst.tmp"
mkdir -p "$dst.tmp"
(cd "$src" && find . -type f ! -name '*.ckpt' ! -name '*.tmp' -print0) |
  while IFS= read -r -d '' f; do
    mkdir -p "$dst.tmp/$(dirname "$f")"
    cp "$src/$f" "$dst.tmp/$f"
  done
rm -rf "$dst"
mv "$dst.tmp" "$dst"
echo "stored $src -> $dst"
