#!/usr/bin/env bash
# The figures a GPU machine adds: the CUDA tests, the paper suite at full scale on the reference preset
# (`small`, 1M tokens a variant, looped 8/16 heads included), then chain vs tree decoding on the 4-head and
# looped 8/16-head models, batch 1 greedy (4 heads also batch 4 and sampling). Every stage writes under OUT.
# Usage: benchmarks/gpu_figures.sh [OUT]      (default: runs/gpu; about 15 minutes on one H200)
set -uo pipefail
out=${1:-runs/gpu}
mkdir -p "$out"
mtpd() { python3 -m mtpd "$@"; }  # works from a checkout with PYTHONPATH=src as well as after pip install
stage() { echo; echo "=== $(date +%T) $*"; }

stage environment
nvidia-smi -L; python3 -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())'

stage "CUDA tests"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15

stage "paper suite, full scale, on cuda"
mtpd experiment --suite paper --scale full --device cuda --quiet --out "$out/exp" 2>&1

variants=$out/exp/variants
stage "chain vs tree, 4 heads (batch 1, greedy; then batch 4; then sampling at temperature 1)"
mtpd bench --ckpt "$variants/mtpd-k4" --device cuda --tree --tree-dynamic --draft-threshold 0 --json "$out/bench-k4-tree.json"
mtpd bench --ckpt "$variants/mtpd-k4" --device cuda --json "$out/bench-k4-thr0.05.json" --skip-no-cache
mtpd bench --ckpt "$variants/mtpd-k4" --device cuda --batch-size 4 --draft-threshold 0 --skip-no-cache --json "$out/bench-k4-batch4.json"
mtpd bench --ckpt "$variants/mtpd-k4" --device cuda --temperature 1 --draft-threshold 0 --skip-no-cache --json "$out/bench-k4-sampling.json"
for k in 8 16; do
  stage "chain vs tree, looped $k heads"
  mtpd bench --ckpt "$variants/mtpd-k$k-looped" --device cuda --tree --tree-dynamic --draft-threshold 0 --skip-no-cache --json "$out/bench-k$k-tree.json"
  mtpd bench --ckpt "$variants/mtpd-k$k-looped" --device cuda --skip-no-cache --json "$out/bench-k$k-thr0.05.json"
done
stage "CUDA tests: the whole suite on this machine's torch (CLI runs pick the GPU by default)"
python3 -m pytest -q -p no:cacheprovider -n 8 2>&1 | tail -25
stage done
