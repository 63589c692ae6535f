"""llama.cpp as a peer for `mtpd bench` on a GGUF model: its autoregressive tokens/s on the same prompts.

What a user of SmolLM2's GGUF would run instead of mtpd: llama.cpp (through llama-cpp-python), on the same
file, with the same prompts (the question file's first turns rendered by mtpd's prompt layer, the token ids
handed to llama.cpp as they are), greedy, exactly --max-new-tokens per prompt (no stop token, as in
`mtpd bench`), batch 1, timed from the prompt's evaluation to the last token like mtpd's methods. llama.cpp
computes with the file's quantised weights (Q4_1 for SmolLM2), mtpd with them dequantised (bf16 or fp32), so
the two are different numerics of one model and their greedy outputs may differ.

Not a dependency of mtpd or its tests: `pip install llama-cpp-python` (it compiles llama.cpp, ~6 minutes on
2 cores). With --json the figures go into an existing `mtpd bench --json` report as "llama_cpp", with the
speedup of mtpd's speculative decoding over it.

    python benchmarks/llama_cpp_peer.py --hf smollm2 --prompts benchmarks/data/mt_bench_question.jsonl \\
        --max-new-tokens 256 --threads 2 --ubatch 1 --json docs/bench-smollm2/mt-bench-mtpd.json

Two rates: from each prompt's evaluation to its last token (how mtpd's methods are timed), and after the first
token (decoding alone). On the development CPU llama-cpp-python 0.3.36 segfaulted in llama.cpp's AMX path on
any pass over more than one token, so prompts there are evaluated a token at a time (--ubatch 1), which the
second rate leaves out; --no-repack avoids AMX instead and decoded at about half the rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

from mtpd.errors import MtpdError
from mtpd.model.source import load_hf_tokenizer, load_tokenizer, resolve_source
from mtpd.prompts import PromptFormatter, PromptStyle, file_prompts


def llama_cpp_rate(gguf: Path, prompts: list[list[int]], max_new_tokens: int, threads: int, ubatch: int = 512,
                   repack: bool = True, warmup: int = 1) -> dict:
    """Greedy autoregressive decoding of every prompt by llama.cpp, `max_new_tokens` each; tokens/s from the
    prompt's evaluation to the last token (as mtpd's methods are timed), and after the first token (decoding
    alone, without the prompt's evaluation). `ubatch`: llama.cpp's -ub, tokens per pass over a prompt;
    `repack` False: llama.cpp's --no-repack (no extra buffer types: no AMX or repacked weights)."""
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as library
    except ImportError:
        raise MtpdError("the llama.cpp peer needs llama-cpp-python: pip install llama-cpp-python") from None
    context = max(len(prompt) for prompt in prompts) + max_new_tokens
    default_params = library.llama_model_default_params

    def model_params():  # Llama() has no argument for use_extra_bufts: set it on the defaults it starts from
        params = default_params()
        params.use_extra_bufts = repack
        return params

    with mock.patch.object(library, "llama_model_default_params", model_params):
        model = llama_cpp.Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                                n_batch=max(ubatch, 512), n_ubatch=ubatch, verbose=False)

    def decode(prompt: list[int]) -> tuple[list[int], float]:
        """The tokens, and the seconds to the first one (the prompt's evaluation)."""
        model.reset()
        tokens, started = [], time.perf_counter()
        # generate() yields the greedy token forever (it does not stop at end-of-turn): cut at the budget.
        for token in model.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if not tokens:
                first = time.perf_counter() - started
            tokens.append(token)
            if len(tokens) == max_new_tokens:
                break
        return tokens, first

    for prompt in prompts[:warmup]:
        decode(prompt)
    started = time.perf_counter()
    outputs = [decode(prompt) for prompt in prompts]
    seconds = time.perf_counter() - started
    new_tokens = sum(len(tokens) for tokens, _ in outputs)
    to_first = sum(first for _, first in outputs)
    return {"tokens_per_s": new_tokens / seconds, "seconds": seconds, "new_tokens": new_tokens,
            "decode_tokens_per_s": (new_tokens - len(prompts)) / (seconds - to_first),
            "prompt_seconds": to_first, "num_prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "threads": threads, "batch_size": 1, "ubatch": ubatch, "repack": repack,
            "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"), "gguf": str(gguf)}


def _bench_report(path: str, num_prompts: int, max_new_tokens: int) -> dict:
    """The `mtpd bench --json` report the figures join, checked to be of the same prompts and budget."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MtpdError(f"cannot read the bench report {path} ({exc}): pass the --json of an `mtpd bench` run") from None
    if report.get("num_prompts") != num_prompts or report.get("max_new_tokens") != max_new_tokens:
        raise MtpdError(f"{path} benchmarked {report.get('num_prompts')} prompts x {report.get('max_new_tokens')} "
                        f"tokens, not {num_prompts} x {max_new_tokens}: pass the same --prompts, --num-prompts and "
                        f"--max-new-tokens")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", default="smollm2", help="a .gguf file or `smollm2` (default)")
    parser.add_argument("--prompts", required=True, help="a question file (.jsonl) or a text file, one prompt a line")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, help="the first N prompts only (default: all)")
    parser.add_argument("--ubatch", type=int, default=512,
                        help="llama.cpp's -ub: prompt tokens per pass (default: 512; 1 evaluates prompts a token at a "
                             "time, see --no-repack)")
    parser.add_argument("--no-repack", dest="repack", action="store_false",
                        help="llama.cpp's --no-repack: no extra buffer types (AMX, repacked weights). On the "
                             "development CPU (Zen 4, AMX int8 reported) llama-cpp-python 0.3.36 crashed in its AMX "
                             "path on passes over more than one token: run it with --ubatch 1 (AMX decoding, ~95 "
                             "tokens/s on one thread) or --no-repack (~50)")
    parser.add_argument("--json", help="an `mtpd bench --json` report to add the figures to, as \"llama_cpp\"")
    args = parser.parse_args(argv)
    try:
        source = resolve_source(args.hf)
        if source.gguf_file is None:
            raise MtpdError(f"--hf {args.hf} is not a GGUF file: llama.cpp reads GGUF models")
        hf_tokenizer = load_hf_tokenizer(source)
        formatter = PromptFormatter(PromptStyle.from_hf_tokenizer(hf_tokenizer), load_tokenizer(source))
        prompts = file_prompts(args.prompts, formatter).prompts[:args.num_prompts]  # first turns, as the bench
        report = _bench_report(args.json, len(prompts), args.max_new_tokens) if args.json else None
        result = llama_cpp_rate(source.path, prompts, args.max_new_tokens, args.threads, args.ubatch, args.repack)
        print(f"llama.cpp: {result['tokens_per_s']:.2f} tokens/s, {result['decode_tokens_per_s']:.2f} after the "
              f"prompts' evaluation ({result['num_prompts']} prompts x {args.max_new_tokens} tokens, "
              f"{args.threads} threads, batch 1, ubatch {args.ubatch}, repack {args.repack})")
        if report is not None:
            # The bench's own rates (report fields, docs/design.md §6) over llama.cpp's, on the same prompts.
            result["spec_speedup_over_it"] = report["spec_tokens_per_s"] / result["tokens_per_s"]
            result["baseline_speedup_over_it"] = report["baseline_tokens_per_s"] / result["tokens_per_s"]
            Path(args.json).write_text(json.dumps({**report, "llama_cpp": result}, indent=2) + "\n")
            print(f"wrote llama_cpp into {args.json}")
    except MtpdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
