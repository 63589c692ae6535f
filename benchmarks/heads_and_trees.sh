#!/usr/bin/env bash
# One model with many heads (e.g. looped 4 -> 8 -> 16), every way of drafting with it, each in its own
# `mtpd bench` run (batch 1, greedy, speedup vs KV-cached AR of the same model in the same run), most heads
# first: for all, 8, 4 and 1 heads, the chain with dynamic draft length (threshold 0.05) and, from 2 heads
# on, the calibrated tree side by side with the chain drafting with every head (threshold 0; for 1 head that
# chain alone); then `--heads auto`. Writes OUT/<what>.json.
# Usage: benchmarks/heads_and_trees.sh CKPT [OUT] [extra bench flags, e.g. --device cuda]
set -uo pipefail
ckpt=$1; out=${2:-runs/heads-and-trees}; shift; shift || true
mkdir -p "$out"
bench() { python3 -m mtpd bench --ckpt "$ckpt" --skip-no-cache "$@"; }
heads=$(python3 -c "import sys; from mtpd.checkpoint import load_checkpoint; print(load_checkpoint(sys.argv[1]).model.num_heads)" "$ckpt")
for k in $(printf '%s\n' 1 4 8 "$heads" | awk -v h="$heads" '$1 <= h' | sort -nru); do
  if [ "$k" -ge 2 ]; then
    bench --heads "$k" --tree --draft-threshold 0 --json "$out/tree-k$k.json" "$@"
  else
    bench --heads "$k" --draft-threshold 0 --json "$out/chain-k$k-t0.json" "$@"
  fi
  bench --heads "$k" --json "$out/chain-k$k-t0.05.json" "$@"
done
bench --heads auto --json "$out/heads-auto.json" "$@"
