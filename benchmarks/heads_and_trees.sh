#!/usr/bin/env bash
# One model with many heads (e.g. looped 4 -> 8 -> 16), every way of drafting with it, each in its own
# `mtpd bench` run (batch 1, greedy, speedup vs KV-cached AR of the same model in the same run):
# the chain with 1, 4, 8 and all heads, with and without dynamic draft length; `--heads auto`; and chain vs
# calibrated tree with 4, 8 and all heads. Writes OUT/<what>.json.
# Usage: benchmarks/heads_and_trees.sh CKPT [OUT] [extra bench flags, e.g. --device cuda]
set -uo pipefail
ckpt=$1; out=${2:-runs/heads-and-trees}; shift; shift || true
mkdir -p "$out"
bench() { python3 -m mtpd bench --ckpt "$ckpt" --skip-no-cache "$@"; }
heads=$(python3 -c "import json,sys; from mtpd.checkpoint import load_checkpoint; print(load_checkpoint(sys.argv[1]).model.num_heads)" "$ckpt")
for k in $(printf '%s\n' 1 4 8 "$heads" | awk -v h="$heads" '$1 <= h' | sort -nu); do
  bench --heads "$k" --draft-threshold 0 --json "$out/chain-k$k-t0.json" "$@"
  bench --heads "$k" --json "$out/chain-k$k-t0.05.json" "$@"
  [ "$k" -ge 2 ] && bench --heads "$k" --tree --draft-threshold 0 --json "$out/tree-k$k.json" "$@"
done
bench --heads auto --json "$out/heads-auto.json" "$@"
