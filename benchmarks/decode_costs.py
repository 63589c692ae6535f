"""Per-pass costs of the decode loop's pieces (DESIGN §9), on random weights: acceptance does not matter here.

    t_1      main model, one token, KV cache holding `--context` positions
    t_{K+1}  main model, K+1 tokens (a verification pass)
    t_h      one head step (projection + block + the shared vocabulary projection), one token

and the speedup these imply at a given mean accepted tokens tau: tau * t_1 / (t_{K+1} + K * t_h).
Usage: python benchmarks/decode_costs.py --preset small --heads 4 [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mtpd.config import preset
from mtpd.model import MTPModel


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
def measure(preset_name: str, heads: int, context: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MTPModel(preset(preset_name, mtp_heads=heads)).eval()
    main, V, d = model.main, model.cfg.vocab_size, model.cfg.d_model
    context = min(context, model.cfg.max_seq_len - heads - 2)
    cache = main.new_cache(1, context + heads + 2)
    main(torch.randint(0, V, (1, context)), torch.arange(context)[None], cache)
    head_cache = model.new_head_caches(1, context + heads + 2)[0]
    model.head_step(1, torch.randn(1, context, d), torch.arange(context)[None],
                    torch.randint(0, V, (1, context)), head_cache)

    def main_pass(T: int):
        tokens, positions = torch.randint(0, V, (1, T)), torch.arange(context, context + T)[None]
        return lambda: main.logits(main(tokens, positions, cache))

    hidden, token, position = torch.randn(1, 1, d), torch.randint(0, V, (1, 1)), torch.tensor([[context]])
    head = lambda: model.head_logits(1, model.head_step(1, hidden, position, token, head_cache))  # noqa: E731
    costs = {"t_1": median_ms(main_pass(1), repeats), f"t_{heads + 1}": median_ms(main_pass(heads + 1), repeats),
             "t_h": median_ms(head, repeats)}
    spec_step = costs[f"t_{heads + 1}"] + heads * costs["t_h"]
    return {"preset": preset_name, "heads": heads, "context": context, "threads": torch.get_num_threads(),
            "params_main": sum(p.numel() for p in main.parameters()), **{k: round(v, 3) for k, v in costs.items()},
            "spec_step_ms": round(spec_step, 3),
            "implied_speedup_at_tau": {tau: round(tau * costs["t_1"] / spec_step, 3)
                                       for tau in (1.5, 2.0, 2.5, 3.0, 3.5, heads + 1.0)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.preset, args.heads, args.context, args.repeats)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
