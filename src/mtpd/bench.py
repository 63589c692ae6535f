"""`mtpd bench`: speculative decoding against its baselines, same prompts, same run, after warm-up.

Methods are timed in interleaved rounds (baseline, no-cache baseline, speculative, then again), so a
noisy machine slows all of them alike. Tokens are counted the same way for every method: generated
tokens, EOS ignored so every row produces exactly max_new_tokens.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from mtpd.checkpoint import Checkpoint
from mtpd.decode import Greedy, autoregressive_generate, make_rule, speculative_generate
from mtpd.decode.generation import Generation
from mtpd.errors import MtpdError
from mtpd.metrics import acceptance_rates, cumulative_acceptance, mean_accepted_tokens
from mtpd.model.hf import HFBackbone
from mtpd.peers import PROMPT_LOOKUP_TOKENS, hf_peer_methods
from mtpd.report import format_table


@dataclass(frozen=True)
class BenchConfig:
    max_new_tokens: int = 128
    batch_size: int = 1
    num_heads: int | None = None  # None: all of the checkpoint's heads
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    rounds: int = 2
    no_cache_baseline: bool = True
    seed: int = 0
    draft_threshold: float = 0.0  # > 0: dynamic draft length

    def validate(self) -> "BenchConfig":
        checks = [
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (self.num_heads is None or self.num_heads >= 1, f"--heads must be >= 1 (got {self.num_heads})"),
            (self.rounds >= 1, f"--rounds must be >= 1 (got {self.rounds})"),
            (0 <= self.draft_threshold < 1, f"--draft-threshold must be in [0, 1) (got {self.draft_threshold})"),
        ]
        for ok, message in checks:
            if not ok:
                raise MtpdError(message)
        make_rule(self.temperature, self.top_k, self.top_p)  # checks the sampling flags
        return self


def validation_prompts(val_tokens: torch.Tensor, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """Evenly spaced slices of the validation split, each `prompt_tokens` long."""
    if num_prompts < 1 or prompt_tokens < 1:
        raise MtpdError(f"--num-prompts and --prompt-tokens must be >= 1 (got {num_prompts}, {prompt_tokens})")
    if val_tokens.numel() < prompt_tokens * num_prompts:
        raise MtpdError(f"validation split has {val_tokens.numel()} tokens, too few for {num_prompts} prompts of "
                        f"{prompt_tokens} tokens: pass --prompts FILE or fewer --num-prompts")
    stride = (val_tokens.numel() - prompt_tokens) // max(num_prompts, 1)
    return [val_tokens[i * stride:i * stride + prompt_tokens].tolist() for i in range(num_prompts)]


def file_prompts(path: str | Path, tokenizer: Tokenizer) -> list[list[int]]:
    """One prompt per non-empty line of a UTF-8 file (write `\\n` for a line break inside a prompt)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MtpdError(f"prompts file '{path}' does not exist: pass a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MtpdError(f"cannot read prompts file '{path}' ({exc}): pass a UTF-8 text file, one prompt per line") from None
    prompts = [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise MtpdError(f"prompts file '{path}' has no non-empty line: write one prompt per line")
    return [tokenizer.encode(prompt, add_special_tokens=False).ids for prompt in prompts]


def _batches(prompts: list[list[int]], size: int) -> list[list[list[int]]]:
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def run_benchmark(checkpoint: Checkpoint, prompts: list[list[int]], cfg: BenchConfig,
                  progress: Callable[[str], None] | None = None) -> dict:
    model = checkpoint.model.eval()
    heads = model.num_heads if cfg.num_heads is None else cfg.num_heads
    if not 1 <= heads <= model.num_heads:
        raise MtpdError(f"--heads {heads} is not available: the checkpoint has {model.num_heads} heads")
    rule = make_rule(cfg.temperature, cfg.top_k, cfg.top_p)
    batches = _batches(prompts, cfg.batch_size)
    methods: dict[str, Callable[[list[list[int]], torch.Generator], Generation]] = {
        "autoregressive": lambda b, g: autoregressive_generate(model.main, b, cfg.max_new_tokens, rule, generator=g),
        "speculative": lambda b, g: speculative_generate(model, b, cfg.max_new_tokens, rule, heads, generator=g,
                                                       draft_threshold=cfg.draft_threshold),
    }
    if cfg.no_cache_baseline:
        methods["autoregressive_no_cache"] = lambda b, g: autoregressive_generate(
            model.main, b, cfg.max_new_tokens, rule, use_cache=False, generator=g)
    if isinstance(model.main, HFBackbone):  # what users of a Hugging Face model would run instead
        methods |= hf_peer_methods(model.main.model, cfg.max_new_tokens, rule)

    for name, generate in methods.items():  # warm-up: first-call allocations, lazy init
        generate(batches[0], torch.Generator().manual_seed(cfg.seed))
    started = time.perf_counter()
    seconds = dict.fromkeys(methods, 0.0)
    tokens = dict.fromkeys(methods, 0)
    outputs: dict[str, list[list[int]]] = {name: [] for name in methods}
    accepted, drafted = [], []
    for round_index in range(cfg.rounds):
        for name, generate in methods.items():
            generator = torch.Generator().manual_seed(cfg.seed + round_index)
            for batch in batches:
                t0 = time.perf_counter()
                result = generate(batch, generator)
                seconds[name] += time.perf_counter() - t0
                tokens[name] += result.num_tokens
                if round_index == 0:
                    outputs[name] += result.tokens
                    accepted += result.accepted
                    drafted += result.drafted
            if progress:
                progress(f"round {round_index + 1}/{cfg.rounds}: {name} {tokens[name] / seconds[name]:.1f} tok/s")

    rate = {name: tokens[name] / seconds[name] for name in methods}
    tau = mean_accepted_tokens(accepted)
    speedup = rate["speculative"] / rate["autoregressive"]
    report = {
        "model": checkpoint.config.get("model"),
        "checkpoint": str(checkpoint.path),
        "heads": heads,
        "device": str(next(model.parameters()).device),
        "device_name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "compiled": False,
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "num_prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "rounds": cfg.rounds,
        "baseline_tokens_per_s": rate["autoregressive"],
        "spec_tokens_per_s": rate["speculative"],
        "speedup": speedup,
        "no_cache_tokens_per_s": rate.get("autoregressive_no_cache"),
        "speedup_vs_no_cache": (rate["speculative"] / rate["autoregressive_no_cache"]
                                if "autoregressive_no_cache" in rate else None),
        "mean_accepted_tokens": tau,
        "efficiency": speedup / tau if tau else None,
        "draft_threshold": cfg.draft_threshold,
        "mean_draft_length": sum(drafted) / len(drafted) if drafted else 0.0,
        "acceptance_rate": acceptance_rates(accepted, heads, drafted),
        "cumulative_acceptance": cumulative_acceptance(accepted, heads),
        "verification_steps": len(accepted),
        "identical_to_baseline": outputs["speculative"] == outputs["autoregressive"] if isinstance(rule, Greedy) else None,
        "peers": _peer_report(rate, outputs, rule, cfg.batch_size),
        "torch_version": torch.__version__,
        "seconds": time.perf_counter() - started,
    }
    return report


def _peer_report(rate: dict, outputs: dict, rule, batch_size: int) -> dict:
    """Hugging Face's own decoders beside ours (only for heads on a Hugging Face model)."""
    peers = {}
    for name, batch in (("hf_generate", batch_size), ("hf_prompt_lookup", 1)):
        if name in rate:
            peers[name] = {"tokens_per_s": rate[name], "batch_size": batch,
                           "spec_speedup_over_it": rate["speculative"] / rate[name],
                           "identical_to_spec": outputs[name] == outputs["speculative"] if isinstance(rule, Greedy) else None}
    if "hf_prompt_lookup" in peers:
        peers["hf_prompt_lookup"]["prompt_lookup_num_tokens"] = PROMPT_LOOKUP_TOKENS
    return peers


def bench_table(report: dict) -> str:
    heads = report["heads"]
    per_head = format_table(["head", "acceptance rate", "cumulative"],
                            [(k + 1, report["acceptance_rate"][k], report["cumulative_acceptance"][k])
                             for k in range(heads)])
    rows = [("autoregressive (KV cache)", report["baseline_tokens_per_s"], 1.0)]
    if report["no_cache_tokens_per_s"] is not None:
        rows.append(("autoregressive (no cache)", report["no_cache_tokens_per_s"],
                     report["no_cache_tokens_per_s"] / report["baseline_tokens_per_s"]))
    labels = {"hf_generate": "transformers generate", "hf_prompt_lookup": "transformers prompt lookup (batch 1)"}
    for name, peer in report.get("peers", {}).items():
        rows.append((labels[name], peer["tokens_per_s"], peer["tokens_per_s"] / report["baseline_tokens_per_s"]))
    rows.append((f"speculative, {heads} heads", report["spec_tokens_per_s"], report["speedup"]))
    speed = format_table(["method", "tokens/s", "vs KV-cached AR"], rows)
    identical = report["identical_to_baseline"]
    lines = [per_head, "", speed, "",
             f"mean accepted tokens per verification (tau): {report['mean_accepted_tokens']:.3f}   "
             f"efficiency (speedup / tau): {report['efficiency']:.3f}   "
             f"mean draft length: {report['mean_draft_length']:.2f}"]
    if report["speedup_vs_no_cache"] is not None:
        lines.append(f"speedup vs no-cache AR (the paper's setting): {report['speedup_vs_no_cache']:.2f}x")
    if identical is not None:
        lines.append(f"greedy output identical to autoregressive: {'yes' if identical else 'NO'}")
    for name, peer in report.get("peers", {}).items():
        same = "" if peer["identical_to_spec"] is None else f"; greedy output identical: {'yes' if peer['identical_to_spec'] else 'NO'}"
        lines.append(f"speculative vs {name}: {peer['spec_speedup_over_it']:.2f}x{same}")
    return "\n".join(lines)
