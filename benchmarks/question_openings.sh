#!/usr/bin/env bash
# Do question openings buy acceptance on MT-Bench? Two arms of SmolLM2 self-distillation data, the same number
# of conversations, 4 MTP-D heads each trained on the same number of tokens with the same seed, then judged by
# benchmarks/acceptance_gap.py (online AR_k / CAR_k / tau and offline acceptance, bf16) on 40 MT-Bench first
# turns and on 24 held-out conversations of the model's own (distill-data --seed 1, no openings). Token-equal,
# not time-equal, so the figures do not depend on the machine's speed; the two arms run side by side, one
# thread each (~65 minutes on a 2-core Zen 4).
#
# Usage: benchmarks/question_openings.sh [OUT]     (default: runs/question-openings)
# Environment: N=400 conversations per arm, TOKENS=1048576 training tokens per arm; MTPD, PYTHON as for
# smollm2_recipe.sh.
set -euo pipefail
out=${1:-runs/question-openings}
here=$(cd "$(dirname "$0")" && pwd)
mtpd=${MTPD:-mtpd}
python=${PYTHON:-python3}
n=${N:-400}
tokens=${TOKENS:-1048576}
mkdir -p "$out/heldout" "$out/none" "$out/tasks"
if [ ! -e "$out/heldout/questions.jsonl" ]; then
  $mtpd distill-data --hf smollm2 --out "$out/heldout/chat.jsonl" --samples 24 --seed 1 --question-openings none \
    --quiet --resume
  $python -c "import json, sys
with open(sys.argv[2], 'w') as out:
    for i, line in enumerate(open(sys.argv[1])):
        out.write(json.dumps({'question_id': i, 'category': 'own', 'turns': [json.loads(line)['question']]}) + '\n')
" "$out/heldout/chat.jsonl" "$out/heldout/questions.jsonl"
fi
arm() {
  local name=$1 dir=$out/$1
  if [ ! -e "$dir/chat.jsonl.done" ]; then
    $mtpd distill-data --hf smollm2 --out "$dir/chat.jsonl" --samples "$n" --batch-size 16 --max-new-tokens 256 \
      --seed 0 --question-openings "$name" --quiet --resume
    touch "$dir/chat.jsonl.done"
  fi
  $mtpd train --hf smollm2 --heads 4 --data "$dir/chat.jsonl" --batch-size 8 --seq-len 256 --warmup-steps 10 \
    --save-every 20 --seed 0 --quiet --max-tokens "$tokens" --out "$dir/mtpd" --resume
  $mtpd eval --ckpt "$dir/mtpd" --windows 64 --json "$dir/eval.json"
  [ -e "$dir/gap-heldout.json" ] || $python "$here/acceptance_gap.py" --ckpt "$dir/mtpd" --num-questions 24 \
    --questions "$out/heldout/questions.jsonl" --dtype bf16 --json "$dir/gap-heldout.json"
  [ -e "$dir/gap-mtbench.json" ] || $python "$here/acceptance_gap.py" --ckpt "$dir/mtpd" --num-questions 40 \
    --questions "$here/data/mt_bench_question.jsonl" --dtype bf16 --json "$dir/gap-mtbench.json"
}
OMP_NUM_THREADS=1 arm none > "$out/none/log" 2>&1 & none=$!
OMP_NUM_THREADS=1 arm tasks > "$out/tasks/log" 2>&1 & tasks=$!
wait $none && wait $tasks  # a failed arm fails the script: its log says why
