"""Compiled against eager decoding (`--compile`, decode/passes.py) in one process: KV-cached autoregressive
decoding and speculative decoding (a chain with every head drafting), each eager and compiled, timed in the
same interleaved rounds after a warm-up of each (bench.time_methods), on random heads: acceptance is not the
point here, what a step costs is. The figures in docs/compile-cpu come from:

    python benchmarks/compiled_decoding.py --preset small --heads 4 --json docs/compile-cpu/small-fp32.json
    python benchmarks/compiled_decoding.py --preset small --heads 4 --dtype bf16 --json docs/compile-cpu/small-bf16.json
    python benchmarks/compiled_decoding.py --hf smollm2 --heads 2 --dtype bf16 --json docs/compile-cpu/smollm2-bf16.json

`compile_ratio` is compiled tokens/s over eager tokens/s of the same method; `speedup` is speculative over
autoregressive tokens/s, eager with eager and compiled with compiled. `pass_ms` times the pieces alone,
eager and compiled alternately (median CPU milliseconds of `--repeats` calls each): the main model over 1
and K+1 tokens (its blocks and final norm, not the output layer) and a head step over 1 and 2 tokens, the
KV caches holding the prompt; on a shared machine these are steadier than one decode's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from mtpd.bench import baseline_agreement, divergence_gap, time_methods
from mtpd.decode import ChainDrafter, autoregressive_generate, speculative_generate
from mtpd.decode.passes import EAGER, passes_for
from mtpd.metrics import mean_accepted_tokens
from mtpd.model import MTPModel
from mtpd.precision import cast_for_decoding, resolve_dtype
from untrained import add_model_source, untrained_heads_model


def build(args) -> MTPModel:
    model = untrained_heads_model(args, args.heads, max_seq_len=args.prompt_tokens + args.new_tokens + 64)
    return cast_for_decoding(model, resolve_dtype(args.dtype, "cpu"))


@torch.no_grad()
def pass_ms(model: MTPModel, context: int, heads: int, repeats: int) -> dict:
    """Median CPU ms of each piece, eager and compiled, alternating call by call."""
    variants = {"eager": EAGER, "compiled": passes_for(model.main, True)}
    vocab, d, capacity = model.cfg.vocab_size, model.cfg.d_model, context + heads + 2
    prompt, positions = torch.randint(0, vocab, (1, context)), torch.arange(context)[None]
    caches = {}
    for name, passes in variants.items():
        main_cache, head_cache = passes.main_cache(model.main, 1, capacity), passes.head_caches(model, 1, capacity)[0]
        passes.main(model.main, prompt, positions, main_cache)
        passes.head(model, 1, torch.randn(1, context, d, dtype=model.main.embed.weight.dtype), positions, prompt,
                    head_cache)
        caches[name] = main_cache, head_cache
    pieces = {}
    for T in (1, heads + 1):
        tokens, at = torch.randint(0, vocab, (1, T)), torch.arange(context, context + T)[None]
        pieces[f"main_{T}"] = {name: lambda p=p, n=name, t=tokens, a=at: p.main(model.main, t, a, caches[n][0])
                               for name, p in variants.items()}
    for T in (1, 2):
        hidden = torch.randn(1, T, d, dtype=model.main.embed.weight.dtype)
        tokens, at = torch.randint(0, vocab, (1, T)), torch.arange(context - T, context)[None]
        pieces[f"head_{T}"] = {name: lambda p=p, n=name, h=hidden, t=tokens, a=at: p.head(model, 1, h, a, t, caches[n][1])
                               for name, p in variants.items()}
    result = {}
    for piece, calls in pieces.items():
        times = {name: [] for name in calls}
        for round_index in range(repeats + 3):
            for name, call in calls.items():
                started = time.process_time()
                call()
                if round_index >= 3:  # the first calls compile
                    times[name].append(time.process_time() - started)
        result[piece] = {name: round(sorted(t)[len(t) // 2] * 1e3, 3) for name, t in times.items()}
        result[piece]["compiled_speedup"] = round(result[piece]["eager"] / result[piece]["compiled"], 3)
        print(piece, result[piece], file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source(parser)
    parser.add_argument("--heads", type=int, default=4, help="heads drafting, all of them every step (default: 4)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--prompts", type=int, default=4, help="random prompts, decoded one at a time (default: 4)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=40, help="calls of each piece for pass_ms (default: 40)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    vocab = model.cfg.vocab_size
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (args.prompt_tokens,), generator=generator).tolist() for _ in range(args.prompts)]
    batches = [[prompt] for prompt in prompts]
    new = args.new_tokens

    def autoregressive(compile: bool):
        return lambda batch, g: autoregressive_generate(model.main, batch, new, generator=g, compile=compile)

    def speculative(compile: bool):
        return lambda batch, g: speculative_generate(model, batch, new, drafter=ChainDrafter(0.0), generator=g,
                                                     compile=compile)

    methods = {"autoregressive": autoregressive(False), "speculative": speculative(False),
               "autoregressive_compiled": autoregressive(True), "speculative_compiled": speculative(True)}
    timed = time_methods(methods, batches, args.rounds, 0, torch.device("cpu"),
                         progress=lambda line: print(line, file=sys.stderr), count_graphs=True)
    rate, cpu_rate, outputs = timed.rate, timed.cpu_rate, timed.outputs
    report = {
        "command": "python " + " ".join(sys.argv),
        "model": args.hf or args.preset, "model_config": model.cfg.to_dict(), "heads": args.heads,
        "dtype": args.dtype, "threads": torch.get_num_threads(),
        "device_name": platform.processor() or platform.machine(), "torch_version": torch.__version__,
        "load_average_after": os.getloadavg(),
        "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": new, "rounds": args.rounds,
        "methods": {name: {"tokens_per_s": rate[name], "tokens_per_cpu_s": cpu_rate[name],
                           "warm_up_seconds": timed.warm_up_seconds[name], "compiled_graphs": timed.graphs[name]}
                    for name in methods},
        "graphs_compiled_while_timed": timed.graphs_while_timed,
        "compile_ratio": {"autoregressive": rate["autoregressive_compiled"] / rate["autoregressive"],
                          "speculative": rate["speculative_compiled"] / rate["speculative"]},
        "compile_ratio_cpu_time": {
            "autoregressive": cpu_rate["autoregressive_compiled"] / cpu_rate["autoregressive"],
            "speculative": cpu_rate["speculative_compiled"] / cpu_rate["speculative"]},
        "speedup": {"eager": rate["speculative"] / rate["autoregressive"],
                    "compiled": rate["speculative_compiled"] / rate["autoregressive_compiled"]},
        "mean_accepted_tokens": {name: mean_accepted_tokens(timed.records[name].accepted)
                                 for name in ("speculative", "speculative_compiled")},
        # greedy agreement (bench.baseline_agreement): with eager AR, and compiled speculative with compiled AR;
        # top-2 logit gaps from eager teacher-forced passes
        "agreement_with_autoregressive": {
            name: baseline_agreement(outputs[name], outputs["autoregressive"],
                                     divergence_gap(model.main, prompts, outputs["autoregressive"]))
            for name in methods if name != "autoregressive"},
        "speculative_compiled_agreement_with_autoregressive_compiled": baseline_agreement(
            outputs["speculative_compiled"], outputs["autoregressive_compiled"],
            divergence_gap(model.main, prompts, outputs["autoregressive_compiled"])),
    }
    summary = {name: agreement["identical_fraction"] for name, agreement in report["agreement_with_autoregressive"].items()}
    report["pass_ms"] = pass_ms(model, args.prompt_tokens, args.heads, args.repeats)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps({"compile_ratio": report["compile_ratio"], "speedup": report["speedup"],
                      "identical_fraction": summary}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
