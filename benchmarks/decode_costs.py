"""Per-pass costs of the decode loop's pieces (docs/design.md §9, §10), on random heads: acceptance does not
matter here, only what each piece costs.

    pass_ms[T]   the main model over T tokens (with their logits), the KV cache holding `--context` positions:
                 T = 1 is an autoregressive step, T = K+1 a verification pass of K drafts
    head_ms[V']  one head step for one token: projection + block + the output layer over V' tokens (the full
                 vocabulary, or a draft vocabulary of the V' most frequent tokens)
    ar_tokens_per_s  the real KV-cached autoregressive loop (`autoregressive_generate`), one prompt
    spec_step_ms     pass_ms[K+1] + K * head_ms: a speculative step with K heads drafting, and its cost in AR
                     steps (the mean accepted tokens tau it needs to break even)

for each dtype asked, in one process (so the fp32 / bf16 ratios come from the same run). With two or more
dtypes, `ar_interleaved` then times the autoregressive loop again, one copy of the model per dtype, in
`--ar-rounds` rounds that decode the same prompt with every dtype back to back (alternating the order), so
that a machine whose speed drifts slows every dtype alike: median tokens/s per dtype and each one's ratio to
the first dtype's.

    python benchmarks/decode_costs.py --preset small --heads 4
    python benchmarks/decode_costs.py --hf smollm2 --dtypes fp32 bf16 --draft-vocab 0 8192 --json costs.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from mtpd.decode import autoregressive_generate
from mtpd.model import MTPModel
from mtpd.model.packed import pack_for_decoding
from mtpd.precision import resolve_dtype
from untrained import add_model_source, untrained_heads_model


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


@torch.no_grad()
def measure(model: MTPModel, dtype: torch.dtype, tokens: list[int], context: int, repeats: int) -> dict:
    model = model.to(dtype)
    pack_for_decoding(model)  # as mtpd decodes (model/packed.py: bf16 on a CPU)
    main, V, d, K = model.main, model.cfg.vocab_size, model.cfg.d_model, model.num_heads
    cache = main.new_cache(1, context + max(tokens) + 2)
    main(torch.randint(0, V, (1, context)), torch.arange(context)[None], cache)
    head_cache = model.new_head_caches(1, context + 2)[0]
    model.head_step(1, torch.randn(1, context, d, dtype=dtype), torch.arange(context)[None],
                    torch.randint(0, V, (1, context)), head_cache)

    def main_pass(T: int):
        ids, positions = torch.randint(0, V, (1, T)), torch.arange(context, context + T)[None]
        return lambda: main.logits(main(ids, positions, cache))

    hidden = torch.randn(1, 1, d, dtype=dtype)
    token, position = torch.randint(0, V, (1, 1)), torch.tensor([[context]])
    head = lambda: model.draft_logits(1, model.head_step(1, hidden, position, token, head_cache))  # noqa: E731
    pass_ms = {T: median_ms(main_pass(T), repeats) for T in tokens}
    head_ms = median_ms(head, repeats)
    prompt = torch.randint(0, V, (context,), generator=torch.Generator().manual_seed(1)).tolist()
    autoregressive_generate(main, [prompt], 8)  # warm-up
    t0 = time.perf_counter()
    new = autoregressive_generate(main, [prompt], 64).num_tokens
    ar_rate = new / (time.perf_counter() - t0)
    result = {"pass_ms": {T: round(v, 3) for T, v in pass_ms.items()}, "head_ms": round(head_ms, 3),
              "ar_tokens_per_s": round(ar_rate, 2)}
    if K + 1 in pass_ms:
        step = pass_ms[K + 1] + K * head_ms
        result |= {"spec_step_ms": round(step, 3), "spec_step_in_ar_steps": round(step / pass_ms[1], 3)}
    return result


@torch.no_grad()
def ar_interleaved(main, dtypes: list[str], context: int, new_tokens: int, rounds: int) -> dict:
    """KV-cached AR tokens/s of the same prompt with the main model in each dtype, timed back to back."""
    models = {name: copy.deepcopy(main).to(resolve_dtype(name, "cpu")) for name in dtypes}
    for model in models.values():
        pack_for_decoding(model)
    prompt = torch.randint(0, main.cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(1)).tolist()
    rates = {name: [] for name in dtypes}
    for model in models.values():
        autoregressive_generate(model, [prompt], 8)  # warm-up
    for r in range(rounds):
        for name in dtypes if r % 2 == 0 else dtypes[::-1]:
            t0 = time.perf_counter()
            new = autoregressive_generate(models[name], [prompt], new_tokens).num_tokens
            rates[name].append(new / (time.perf_counter() - t0))
    median = {name: sorted(r)[len(r) // 2] for name, r in rates.items()}
    return {"new_tokens": new_tokens, "rounds": rounds,
            "tokens_per_s": {name: round(v, 2) for name, v in median.items()},
            "all_tokens_per_s": {name: [round(v, 2) for v in r] for name, r in rates.items()},
            "ratio_to_" + dtypes[0]: {name: round(v / median[dtypes[0]], 3) for name, v in median.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source(parser)
    parser.add_argument("--heads", type=int, default=4, help="K: the verification pass covers K+1 tokens")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 3, 5, 9, 17], help="pass sizes T")
    parser.add_argument("--draft-vocab", nargs="+", type=int, default=[0],
                        help="head output sizes to time; 0 = the full vocabulary (default: 0)")
    parser.add_argument("--context", type=int, default=64, help="positions already in the KV cache (default: 64)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--ar-tokens", type=int, default=64, help="new tokens per interleaved AR decode (default: 64)")
    parser.add_argument("--ar-rounds", type=int, default=7, help="interleaved AR rounds (default: 7)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = sorted(set(args.tokens) | {1, args.heads + 1})
    report = {"model": args.hf or args.preset, "heads": args.heads, "context": args.context,
              "threads": torch.get_num_threads(), "device_name": platform.processor() or platform.machine(),
              "torch_version": torch.__version__, "results": []}
    for draft_vocab in args.draft_vocab:
        model = untrained_heads_model(args, args.heads, args.context + 64, draft_vocab)
        report["params_main"] = sum(p.numel() for p in model.main.parameters())
        report["vocab_size"] = model.cfg.vocab_size
        for name in args.dtypes:
            result = {"dtype": name, "draft_vocab": draft_vocab or model.cfg.vocab_size,
                      **measure(model, resolve_dtype(name, "cpu"), tokens, args.context, args.repeats)}
            print(json.dumps(result), flush=True)
            report["results"].append(result)
    if len(args.dtypes) > 1:
        main = untrained_heads_model(args, args.heads, args.context + 64).main
        report["ar_interleaved"] = ar_interleaved(main, args.dtypes, args.context,
                                                  args.ar_tokens, args.ar_rounds)
        print(json.dumps(report["ar_interleaved"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
