#!/usr/bin/env bash
# Same-budget comparison on `tiny`: plain MTP (beta 0) vs MTP-D (default beta 0.5 with 4 heads).
# Same data order, tokens and seed; only the objective differs. Writes OUT/{mtp,mtpd}/eval.json.
# Usage: benchmarks/tiny_mtp_vs_mtpd.sh [OUT] [TOKENS]     (defaults: runs/tiny-cmp, 1200000)
set -euo pipefail
out=${1:-runs/tiny-cmp}
tokens=${2:-1200000}
common=(--preset tiny --heads 4 --max-tokens "$tokens" --batch-size 8 --seq-len 128 --lr 3e-3 --warmup-steps 30
        --seed 0 --eval-every 500 --save-every 1000 --quiet)
for variant in mtp mtpd; do
  beta=(); [ "$variant" = mtp ] && beta=(--beta 0)
  mtpd train "${common[@]}" "${beta[@]}" --out "$out/$variant" --resume
  mtpd eval --ckpt "$out/$variant" --windows 128 --json "$out/$variant/eval.json"
done
