"""Where do the drafts fail? Online chain acceptance on chat prompts, read against the heads' teacher-forced
(offline) predictions on the very same answers (docs/design.md §5).

For each question, mtpd's chain (all heads drafting, greedy, threshold 0) writes the answer, and the model with
its heads then runs once, teacher-forced, over prompt + answer. In greedy decoding a step that starts with its
pending token at position c-1 has head k propose token c-1+k from position c-2, reading the cascade built on
the true tokens whenever heads 1..k-1 were accepted; so the step's accepted length is predictable from the
teacher-forced heads: the number of leading heads whose top-1 at c-2 equals the answer's token. This script

  1. checks that prediction step by step (`steps_predicted`: near 1.0 in fp32, below it in bf16, where a
     1-token and a many-token pass round differently): the drafter uses its heads as trained;
  2. reports offline acceptance over every answer position (`offline_acceptance`), in buckets of answer
     position (`offline_by_position`), beside the online AR_k / CAR_k / tau, so an offline figure measured on
     training data's held-out split (`mtpd eval`) can be told apart from a shift between those conversations
     and the benchmark's.

Not a speed benchmark (`mtpd bench` measures speed). MT-Bench is read, never trained on.

    python benchmarks/acceptance_gap.py --ckpt runs/smollm2-recipe/mtpd --num-questions 20 \
        --json docs/bench-smollm2/acceptance-gap.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mtpd.decode import ChainDrafter, speculative_generate
from mtpd.metrics import acceptance_rates, cumulative_acceptance, mean_accepted_tokens, teacher_forced_accepts
from mtpd.prompts import checkpoint_formatter, file_prompts
from mtpd.run import load_for_decoding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="heads trained on the model (mtpd train --hf ...)")
    parser.add_argument("--questions", default="benchmarks/data/mt_bench_question.jsonl")
    parser.add_argument("--num-questions", type=int, default=20, help="evenly spread over the file (default: 20)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--bucket", type=int, default=64, help="answer positions per offline bucket (default: 64)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--json")
    args = parser.parse_args()

    checkpoint, reason = load_for_decoding(args.ckpt, "cpu", dtype=args.dtype)
    model, formatter = checkpoint.model, checkpoint_formatter(checkpoint)
    K = model.num_heads
    prompt_set = file_prompts(args.questions, formatter).spread(args.num_questions)
    accepted, agree, checked = [], 0, 0
    matches = torch.zeros(K)
    positions = torch.zeros(K)
    buckets: dict[int, list[float]] = {}
    started = time.perf_counter()
    for done, prompt in enumerate(prompt_set.prompts, start=1):
        generation = speculative_generate(model, [prompt], args.max_new_tokens, drafter=ChainDrafter(),
                                          stop_ids=formatter.stop_ids)
        tokens = prompt + generation.tokens[0]
        with torch.no_grad():
            main_logits, head_logits = model(torch.tensor([tokens]), main_scores="full")
        main_top1 = main_logits[0].argmax(-1)
        head_top1 = [model.to_token_ids(logits[0].argmax(-1)) for logits in head_logits]
        P = len(prompt)
        # Offline acceptance over the answer: head k at position i predicts token i+1+k; judged where that
        # token is an answer token past the first (the first comes from the prefill) and the main head's top-1
        # for it is the answer's own (always in fp32 greedy decoding).
        for k, top1 in enumerate(head_top1, start=1):
            at = torch.arange(P - 1, len(tokens) - 1 - k)
            hit = (top1[at] == main_top1[at + k]).float()
            matches[k - 1] += hit.sum()
            positions[k - 1] += len(at)
            for answer_pos, h in zip((at + 1 + k - P).tolist(), hit.tolist()):
                row = buckets.setdefault(answer_pos // args.bucket, [0.0] * (2 * K))
                row[2 * (k - 1)] += h
                row[2 * (k - 1) + 1] += 1
        accepted += generation.accepted
        predicted = teacher_forced_accepts(head_top1, tokens, P, generation.accepted)
        # A row's last step may accept drafts past its end (budget or stop token), which cannot be checked.
        checked += len(predicted) - 1
        agree += sum(a == p for a, p in zip(generation.accepted[:-1], predicted[:-1]))
        print(f"{done}/{len(prompt_set.prompts)}: {len(generation.tokens[0])} tokens, tau "
              f"{mean_accepted_tokens(generation.accepted):.2f}", flush=True)
    report = {
        "checkpoint": str(checkpoint.path), "dtype": args.dtype, "dtype_reason": reason,
        "questions": [question.id for question in prompt_set.questions], "max_new_tokens": args.max_new_tokens,
        "heads": K, "steps": len(accepted), "seconds": round(time.perf_counter() - started, 1),
        "steps_predicted": agree / checked if checked else 0.0,
        "online": {"AR_k": acceptance_rates(accepted, K), "CAR_k": cumulative_acceptance(accepted, K),
                   "tau": mean_accepted_tokens(accepted)},
        "offline_acceptance": (matches / positions.clamp_min(1)).tolist(),
        "offline_by_position": [
            {"answer_tokens": [b * args.bucket, (b + 1) * args.bucket - 1],
             "acceptance": [row[2 * k] / row[2 * k + 1] if row[2 * k + 1] else None for k in range(K)],
             "positions": int(row[1])}
            for b, row in sorted(buckets.items())],
        "torch_version": torch.__version__,
    }
    print(json.dumps({key: report[key] for key in ("steps_predicted", "online", "offline_acceptance")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
