"""Token-for-token checks on a real model (docs/design.md §10): mtpd's autoregressive decoding against
transformers' `generate`, and speculative decoding (chain, tree, prompt lookup behind the chain and alone)
against mtpd's autoregressive decoding,
on chat-templated MT-Bench first turns, greedy, in one dtype (fp32: exact equality is the contract; bf16:
outputs may part at near-ties, and the top-2 logit gap at each first divergence is reported).

Not a speed benchmark (each method runs once, untimed): `mtpd bench` measures speed.

    python benchmarks/real_model_lossless.py --ckpt runs/smollm2-heads --num-questions 20 --max-new-tokens 128 \
        --json docs/real-model/lossless-fp32.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mtpd.bench import divergence_gap, transformers_peer
from mtpd.decode import ChainDrafter, autoregressive_generate, speculative_generate
from mtpd.decode.lookup import LookupDrafter
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_draft import StaticTree
from mtpd.metrics import first_divergence
from mtpd.peers import hf_generate
from mtpd.prompts import checkpoint_formatter, file_prompts
from mtpd.run import load_for_decoding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="heads trained on the model (mtpd train --hf ...)")
    parser.add_argument("--questions", default="benchmarks/data/mt_bench_question.jsonl")
    parser.add_argument("--num-questions", type=int, default=20, help="evenly spread over the file (default: 20)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree-shape", default="0 1 0.0 0.1 0.0.0 0.0.0.0")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--json")
    args = parser.parse_args()

    checkpoint, reason = load_for_decoding(args.ckpt, "cpu", dtype=args.dtype)
    model = checkpoint.model
    prompt_set = file_prompts(args.questions, checkpoint_formatter(checkpoint)).spread(args.num_questions)
    prompts = prompt_set.prompts
    n = args.max_new_tokens
    peer = transformers_peer(model.main)
    methods = {
        "transformers_generate": lambda p: hf_generate(peer, [p], n).tokens[0],
        "chain": lambda p: speculative_generate(model, [p], n, drafter=ChainDrafter()).tokens[0],
        "tree": lambda p: speculative_generate(model, [p], n, drafter=StaticTree(TreeShape.parse(args.tree_shape))
                                               ).tokens[0],
        "lookup": lambda p: speculative_generate(model, [p], n, drafter=LookupDrafter(ChainDrafter())).tokens[0],
        "lookup_only": lambda p: speculative_generate(model, [p], n, drafter=LookupDrafter(None)).tokens[0],
    }
    outputs, seconds = {"autoregressive": []}, {}
    started = time.perf_counter()
    outputs["autoregressive"] = [autoregressive_generate(model.main, [p], n).tokens[0] for p in prompts]
    seconds["autoregressive"] = time.perf_counter() - started
    for name, generate in methods.items():
        started = time.perf_counter()
        outputs[name] = [generate(p) for p in prompts]
        seconds[name] = time.perf_counter() - started
        print(f"{name}: {seconds[name]:.0f}s", flush=True)
    reference = outputs["autoregressive"]
    gaps = divergence_gap(model.main, prompts, reference)
    report = {"checkpoint": str(checkpoint.path), "dtype": args.dtype, "dtype_reason": reason,
              "questions": [question.id for question in prompt_set.questions],
              "categories": sorted(set(prompt_set.categories or [])),
              "prompt_format": prompt_set.report()["prompt_format"], "max_new_tokens": n,
              "tree_shape": args.tree_shape, "seconds": seconds, "torch_version": torch.__version__, "methods": {}}
    for name in methods:
        rows = [first_divergence(a, b) for a, b in zip(outputs[name], reference)]
        parted = [(row, at) for row, at in enumerate(rows) if at is not None]
        report["methods"][name] = {
            "identical_rows": len(rows) - len(parted), "rows": len(rows),
            "divergences": [{"row": row, "token": at, "top2_gap": gaps(row, at)} for row, at in parted]}
        print(f"{name} vs autoregressive: {len(rows) - len(parted)}/{len(rows)} rows identical", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
