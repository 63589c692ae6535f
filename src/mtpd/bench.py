"""`mtpd bench`: speculative decoding against its baselines, same prompts, same run, after warm-up.

Methods are timed in interleaved rounds (baseline, speculative with a chain, with a tree if asked,
no-cache baseline, then again), so a noisy machine slows all of them alike. Tokens are counted the same
way for every method: generated tokens, EOS ignored so every row produces exactly max_new_tokens. Besides
wall-clock time, each method's CPU time is recorded: on a machine shared with other jobs it measures the
work done, where wall time also measures the waiting.

With `tree`, a static draft tree is chosen first (decode/tree_calibration.py: acceptance statistics on
validation prompts held out from the benchmark's, and timed steps) unless `tree_shape` gives one; the
report's `tree` object carries the same metrics as the chain's (top level), plus the tree's shape.
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
from mtpd.clock import wall_clock
from mtpd.config import DRAFT_THRESHOLD
from mtpd.decode import Greedy, autoregressive_generate, make_rule, speculative_generate
from mtpd.decode.generation import Generation
from mtpd.decode.tree import TreeShape, require_tree_support
from mtpd.decode.tree_calibration import calibrate_chain, calibrate_tree
from mtpd.decode.tree_draft import DynamicTree, StaticTree
from mtpd.errors import MtpdError, require
from mtpd.metrics import acceptance_rates, cumulative_acceptance, mean_accepted_tokens
from mtpd.model.hf import HFBackbone
from mtpd.peers import PROMPT_LOOKUP_TOKENS, hf_peer_methods
from mtpd.report import format_table


@dataclass(frozen=True)
class BenchConfig:
    max_new_tokens: int = 128
    batch_size: int = 1
    num_heads: int | None = None  # None: all of the checkpoint's heads
    auto_heads: bool = False  # draft with as many heads as calibration finds fastest (calibrate_chain)
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    rounds: int = 2
    no_cache_baseline: bool = True
    seed: int = 0
    draft_threshold: float = DRAFT_THRESHOLD  # > 0: dynamic draft length; 0: every head drafts
    tree: bool = False  # also decode with a draft tree, side by side with the chain
    tree_shape: str | None = None  # a static tree as rank paths ("0 1 0.0"); None: calibrated
    tree_nodes: int = 16  # calibration tries trees of up to this many nodes (root included)
    tree_dynamic: bool = False  # also decode with a dynamic (EAGLE-2) tree of the static tree's node count
    calibration_prompts: int = 16  # held-out validation prompts for the tree's or heads' acceptance statistics

    def calibration_tokens(self, depth: int) -> int:
        """Greedy tokens per calibration prompt: as many as the benchmark generates, and enough for the
        statistics to cover every head of a deep draft even when the benchmark generates few."""
        return max(self.max_new_tokens, 64, 4 * depth)

    @property
    def calibrates(self) -> bool:
        """Whether the bench needs calibration prompts: a tree to choose, or the number of heads."""
        return self.auto_heads or (self.tree and self.tree_shape is None)

    def validate(self) -> "BenchConfig":
        checks = [
            (self.tree_nodes >= 2, f"--tree-nodes must be >= 2: the root and at least one draft (got {self.tree_nodes})"),
            (self.max_new_tokens >= 2, f"--max-new-tokens must be >= 2 to benchmark speculative decoding (got "
                                       f"{self.max_new_tokens}; the first new token comes from the prompt's pass, "
                                       f"before any draft)"),
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (self.num_heads is None or self.num_heads >= 1, f"--heads must be >= 1 (got {self.num_heads})"),
            (self.rounds >= 1, f"--rounds must be >= 1 (got {self.rounds})"),
            (0 <= self.draft_threshold < 1, f"--draft-threshold must be in [0, 1) (got {self.draft_threshold})"),
        ]
        require(checks)
        make_rule(self.temperature, self.top_k, self.top_p)  # checks the sampling flags
        return self


def validation_prompts(val_tokens: torch.Tensor, num_prompts: int, prompt_tokens: int,
                       offset: float = 0.0) -> list[list[int]]:
    """Evenly spaced slices of the validation split, each `prompt_tokens` long, starting `offset` strides in
    (0.5: midway between the slices of offset 0, so calibration never sees the benchmark's prompts)."""
    if num_prompts < 1 or prompt_tokens < 1:
        raise MtpdError(f"--num-prompts and --prompt-tokens must be >= 1 (got {num_prompts}, {prompt_tokens})")
    if val_tokens.numel() < prompt_tokens * num_prompts:
        raise MtpdError(f"validation split has {val_tokens.numel()} tokens, too few for {num_prompts} prompts of "
                        f"{prompt_tokens} tokens: pass --prompts FILE or fewer --num-prompts")
    stride = (val_tokens.numel() - prompt_tokens) // max(num_prompts, 1)
    starts = [int((i + offset) * stride) for i in range(num_prompts)]
    return [val_tokens[s:s + prompt_tokens].tolist() for s in starts]


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
                  progress: Callable[[str], None] | None = None,
                  calibration_prompts: list[list[int]] | None = None) -> dict:
    """Calibrate what the config asks to be chosen, time every method (`time_methods`) and report (DESIGN §6;
    `speculative_metrics` per drafter; `seconds`: the warm-up and the timed rounds). `calibration_prompts`:
    held-out prompts the tree (with `tree` and no `tree_shape`) or the number of heads (with `auto_heads`) is
    calibrated on."""
    model = checkpoint.model.eval()
    context, longest = model.main.max_seq_len, max(len(p) for p in prompts)
    if longest + cfg.max_new_tokens > context:  # every method must generate exactly max_new_tokens
        raise MtpdError(f"prompts of up to {longest} tokens plus --max-new-tokens {cfg.max_new_tokens} exceed the "
                        f"model's context of {context} tokens: lower --max-new-tokens or --prompt-tokens")
    device = next(model.parameters()).device  # sampling draws from a generator on the model's device
    heads, heads_calibration = _heads(model, cfg), None
    if cfg.auto_heads:
        if not calibration_prompts:
            raise MtpdError("--heads auto calibrates on validation prompts, and none are available: pass --heads K "
                            "or a checkpoint whose corpus is available")
        heads_calibration = calibrate_chain(model, calibration_prompts, model.num_heads, cfg.draft_threshold,
                                            cfg.calibration_tokens(model.num_heads), progress=progress)
        heads = heads_calibration.shape.depth
    rule = make_rule(cfg.temperature, cfg.top_k, cfg.top_p)
    trees, calibration = _trees(model, heads, cfg, calibration_prompts, progress)
    methods = _methods(model, cfg, rule, heads, trees)
    started = time.perf_counter()
    timed = time_methods(methods, _batches(prompts, cfg.batch_size), cfg.rounds, cfg.seed, device, progress)
    greedy = isinstance(rule, Greedy)
    report = {
        "model": checkpoint.config.get("model"),
        "checkpoint": str(checkpoint.path),
        "heads": heads,
        "heads_calibration": heads_calibration.report() if heads_calibration else None,
        "device": str(device),
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
        "baseline_tokens_per_s": timed.rate["autoregressive"],
        "no_cache_tokens_per_s": timed.rate.get("autoregressive_no_cache"),
        "baseline_tokens_per_cpu_s": timed.cpu_rate["autoregressive"],
        "draft_threshold": cfg.draft_threshold,
        **speculative_metrics(timed, "speculative", heads, greedy),
        "peers": _peer_report(timed.rate, timed.outputs, rule, cfg.batch_size),
    }
    for name, tree in trees.items():
        report[name] = {**speculative_metrics(timed, name, heads, greedy), "drafter": tree.describe(),
                        "calibration": calibration.report() if calibration and name == "tree" else None}
    if "tree" in trees:
        report["tree_vs_chain"] = {
            "mean_accepted_tokens": report["tree"]["mean_accepted_tokens"] / report["mean_accepted_tokens"],
            "speedup": report["tree"]["speedup"] / report["speedup"]}
    report |= {"torch_version": torch.__version__, "seconds": time.perf_counter() - started}
    return report


def _methods(model, cfg: BenchConfig, rule, heads: int,
             trees: dict) -> dict[str, Callable[[list[list[int]], torch.Generator], Generation]]:
    """Every way of decoding the bench compares, by report name: KV-cached AR (the baseline), the chain,
    the trees, no-cache AR, and a Hugging Face model's own methods."""
    def speculative(tree):
        threshold = cfg.draft_threshold if tree is None else 0.0  # dynamic draft length is the chain's
        return lambda batch, generator: speculative_generate(model, batch, cfg.max_new_tokens, rule, heads,
                                                             generator=generator, tree=tree,
                                                             draft_threshold=threshold)

    methods = {"autoregressive": lambda batch, generator: autoregressive_generate(
                   model.main, batch, cfg.max_new_tokens, rule, generator=generator),
               "speculative": speculative(None)}
    methods |= {name: speculative(tree) for name, tree in trees.items()}
    if cfg.no_cache_baseline:
        methods["autoregressive_no_cache"] = lambda batch, generator: autoregressive_generate(
            model.main, batch, cfg.max_new_tokens, rule, use_cache=False, generator=generator)
    if isinstance(model.main, HFBackbone):  # what users of a Hugging Face model would run instead
        methods |= hf_peer_methods(model.main.model, cfg.max_new_tokens, rule)
    return methods


@dataclass
class Timed:
    """What the timed rounds measured, per method."""

    rate: dict[str, float]  # generated tokens per second of wall time
    cpu_rate: dict[str, float | None]  # per second of this process's CPU time
    outputs: dict[str, list[list[int]]]  # round 0's tokens
    records: dict[str, Generation]  # round 0's per-step records (speculative methods)


def time_methods(methods: dict, batches: list[list[list[int]]], rounds: int, seed: int, device: torch.device,
                 progress: Callable[[str], None] | None = None) -> Timed:
    """One warm-up call of every method, then `rounds` interleaved rounds over all batches; round r samples
    with seed + r for every method alike."""
    for generate in methods.values():  # warm-up: first-call allocations, lazy init
        generate(batches[0], torch.Generator(device).manual_seed(seed))
    clock = wall_clock(device)
    seconds, cpu_seconds = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0.0)
    tokens = dict.fromkeys(methods, 0)
    outputs: dict[str, list[list[int]]] = {name: [] for name in methods}
    records = {name: Generation([]) for name in methods}
    for round_index in range(rounds):
        for name, generate in methods.items():
            generator = torch.Generator(device).manual_seed(seed + round_index)
            for batch in batches:
                t0, c0 = clock(), time.process_time()
                result = generate(batch, generator)
                seconds[name] += clock() - t0
                cpu_seconds[name] += time.process_time() - c0
                tokens[name] += result.num_tokens
                if round_index == 0:
                    outputs[name] += result.tokens
                    records[name].accepted += result.accepted
                    records[name].drafted += result.drafted
                    records[name].verified += result.verified
            if progress:
                progress(f"round {round_index + 1}/{rounds}: {name} {tokens[name] / seconds[name]:.1f} tok/s")
    return Timed({name: tokens[name] / seconds[name] for name in methods},
                 {name: tokens[name] / cpu_seconds[name] if cpu_seconds[name] else None for name in methods},
                 outputs, records)


def speculative_metrics(timed: Timed, name: str, heads: int, greedy: bool) -> dict:
    """DESIGN §5-6 metrics of one speculative method, against the KV-cached AR baseline of the same rounds."""
    record, rate, cpu_rate = timed.records[name], timed.rate, timed.cpu_rate
    accepted, drafted, verified = record.accepted, record.drafted, record.verified
    tau = mean_accepted_tokens(accepted)
    speedup = rate[name] / rate["autoregressive"]
    return {
        "spec_tokens_per_s": rate[name],
        "speedup": speedup,
        "speedup_vs_no_cache": (rate[name] / rate["autoregressive_no_cache"]
                                if "autoregressive_no_cache" in rate else None),
        "spec_tokens_per_cpu_s": cpu_rate[name],
        "cpu_speedup": (cpu_rate[name] / cpu_rate["autoregressive"]
                        if cpu_rate[name] and cpu_rate["autoregressive"] else None),
        "mean_accepted_tokens": tau,
        "efficiency": speedup / tau if tau else None,
        "mean_draft_length": sum(drafted) / len(drafted) if drafted else 0.0,
        "tokens_verified_per_step": 1 + sum(verified) / len(verified) if verified else 1.0,
        "acceptance_rate": acceptance_rates(accepted, heads, drafted),
        "cumulative_acceptance": cumulative_acceptance(accepted, heads),
        "verification_steps": len(accepted),
        "identical_to_baseline": timed.outputs[name] == timed.outputs["autoregressive"] if greedy else None,
    }


def _heads(model, cfg: BenchConfig) -> int:
    heads = model.num_heads if cfg.num_heads is None else cfg.num_heads
    if not 1 <= heads <= model.num_heads:
        raise MtpdError(f"--heads {heads} is not available: the checkpoint has {model.num_heads} heads")
    return heads


def check_tree(checkpoint: Checkpoint, cfg: BenchConfig) -> None:
    """Refuse tree flags this checkpoint cannot honour (a backbone without tree attention, such as a Hugging
    Face model; a tree deeper than the heads) before any work: calibration prompts, warm-up."""
    if cfg.tree:
        model = checkpoint.model
        shape = TreeShape.chain(1) if cfg.tree_shape is None else TreeShape.parse(cfg.tree_shape)
        require_tree_support(model, shape.depth, _heads(model, cfg), shape.candidates)


def _trees(model, heads: int, cfg: BenchConfig, calibration_prompts: list[list[int]] | None,
           progress: Callable[[str], None] | None):
    """The draft trees to benchmark ({} without cfg.tree) and the calibration that chose the static one."""
    if not cfg.tree:
        return {}, None
    calibration = None
    require_tree_support(model, 1, heads)  # a backbone without tree attention: refuse before calibrating
    if cfg.tree_shape is not None:
        shape = TreeShape.parse(cfg.tree_shape)
    else:
        if not calibration_prompts:
            raise MtpdError("--tree without --tree-shape calibrates on validation prompts, and none are available: "
                            "pass --tree-shape (e.g. '0 1 0.0 0.0.0') or a checkpoint whose corpus is available")
        calibration = calibrate_tree(model, calibration_prompts, heads, cfg.tree_nodes, cfg.calibration_tokens(heads),
                                     progress=progress)
        shape = calibration.shape
    trees = {"tree": StaticTree(shape)}
    if cfg.tree_dynamic:
        trees["tree_dynamic"] = dynamic_like(shape)
    return trees, calibration


def dynamic_like(shape: TreeShape) -> DynamicTree:
    """A dynamic tree with the static tree's budget: as deep, verifying as many nodes; the two most probable
    nodes per depth expanded, with enough children each that the drafted nodes can fill the budget."""
    children = 2
    while DynamicTree(shape.depth, width=2, children=children).max_nodes < shape.num_nodes:
        children += 1
    return DynamicTree(shape.depth, width=2, children=children, nodes=shape.num_nodes)


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
    trees = [name for name in ("tree", "tree_dynamic") if name in report]
    columns = ["head", "acceptance rate", "cumulative"]
    per_head_rows = [[k + 1, report["acceptance_rate"][k], report["cumulative_acceptance"][k]] for k in range(heads)]
    for name in trees:
        columns += [f"{name}: rate", f"{name}: cumulative"]
        for k in range(heads):
            per_head_rows[k] += [report[name]["acceptance_rate"][k], report[name]["cumulative_acceptance"][k]]
    per_head = format_table(columns, [tuple(r) for r in per_head_rows])
    rows = [("autoregressive (KV cache)", report["baseline_tokens_per_s"], 1.0, 1.0, 1.0)]
    if report["no_cache_tokens_per_s"] is not None:
        rows.append(("autoregressive (no cache)", report["no_cache_tokens_per_s"],
                     report["no_cache_tokens_per_s"] / report["baseline_tokens_per_s"], "-", 1.0))
    labels = {"hf_generate": "transformers generate", "hf_prompt_lookup": "transformers prompt lookup (batch 1)"}
    for name, peer in report.get("peers", {}).items():
        rows.append((labels[name], peer["tokens_per_s"], peer["tokens_per_s"] / report["baseline_tokens_per_s"], "-", 1.0))
    methods = [(f"speculative, {heads} head{'s' if heads > 1 else ''}, chain", report)]
    methods += [(f"speculative, {report[n]['drafter']['kind']} tree of {report[n]['drafter']['nodes']} nodes",
                 report[n]) for n in trees]
    for label, m in methods:
        rows.append((label, m["spec_tokens_per_s"], m["speedup"], m["cpu_speedup"] or "-", m["mean_accepted_tokens"]))
    speed = format_table(["method", "tokens/s", "vs KV-cached AR", "same, CPU time", "tokens per pass"], rows)
    identical = report["identical_to_baseline"]
    lines = [per_head, "", speed, "",
             f"mean accepted tokens per verification (tau): {report['mean_accepted_tokens']:.3f}   "
             f"efficiency (speedup / tau): {report['efficiency']:.3f}   "
             f"mean draft length: {report['mean_draft_length']:.2f}"]
    if report.get("heads_calibration"):
        choice = report["heads_calibration"]
        lines.append(f"--heads auto: {heads} heads (expected tau {choice['expected_mean_accepted_tokens']:.2f}, "
                     f"{choice['step_ms']:.1f} ms a step; all {len(choice['candidates'])}: expected tau "
                     f"{choice['chain_expected_mean_accepted_tokens']:.2f}, {choice['candidates'][-1]['step_ms']:.1f} ms)")
    if report["speedup_vs_no_cache"] is not None:
        lines.append(f"speedup vs no-cache AR (the paper's setting): {report['speedup_vs_no_cache']:.2f}x")
    for name in trees:
        tree = report[name]
        shape = f", shape {tree['drafter']['shape']}" if "shape" in tree["drafter"] else ""
        lines.append(f"{name}: tau {tree['mean_accepted_tokens']:.3f}, {tree['tokens_verified_per_step']:.1f} tokens "
                     f"verified per pass{shape}")
    if "tree_vs_chain" in report:
        ratio = report["tree_vs_chain"]
        lines.append(f"tree vs chain: {ratio['mean_accepted_tokens']:.2f}x mean accepted tokens, "
                     f"{ratio['speedup']:.2f}x speedup")
    if identical is not None:
        same = all(m["identical_to_baseline"] for _, m in methods)
        lines.append(f"greedy output identical to autoregressive: {'yes' if same else 'NO'}")
    for name, peer in report.get("peers", {}).items():
        same = "" if peer["identical_to_spec"] is None else f"; greedy output identical: {'yes' if peer['identical_to_spec'] else 'NO'}"
        lines.append(f"speculative vs {name}: {peer['spec_speedup_over_it']:.2f}x{same}")
    return "\n".join(lines)
