"""`mtpd bench`: speculative decoding against its baselines, same prompts, same run, after warm-up.

Methods are timed interleaved: every batch of prompts is decoded by each method in turn (baseline,
speculative with a chain, with a tree if asked, no-cache baseline, then the next batch in reverse order),
so a noisy machine slows all of them alike. Tokens are counted the same
way for every method: generated tokens, EOS ignored so every row produces exactly max_new_tokens. Besides
wall-clock time, each method's CPU time is recorded: on a machine shared with other jobs it measures the
work done, where wall time also measures the waiting.

With `tree`, a static draft tree is chosen first (decode/tree_calibration.py: acceptance statistics on
validation prompts held out from the benchmark's, and timed steps) unless `tree_shape` gives one; the
report's `tree` object carries the same metrics as the chain's (top level), plus the tree's shape.

Prompts from a question file (prompts.py) carry categories: batches never span two, and every batch's
tokens and seconds are kept, so each category's speedup comes from the same rounds as the overall one
(`per_category`). Their second turns are timed after the first, in a `second_turn` object of the same fields.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mtpd.checkpoint import Checkpoint
from mtpd.clock import wall_clock
from mtpd.config import DRAFT_THRESHOLD, DRAFT_THRESHOLDS, LOOKUP_TOKENS
from mtpd.decode import ChainDrafter, Greedy, autoregressive_generate, make_rule, speculative_generate
from mtpd.decode.generation import Generation
from mtpd.decode.passes import graphs_compiled, passes_for
from mtpd.decode.lookup import LookupDrafter
from mtpd.decode.tree import TreeShape, require_tree_support
from mtpd.decode.tree_calibration import DraftStatistics, calibrate_chain, calibrate_tree, draft_statistics
from mtpd.decode.tree_draft import DynamicTree, StaticTree
from mtpd.errors import MtpdError, require
from mtpd.metrics import acceptance_rates, cumulative_acceptance, first_divergence, mean_accepted_tokens
from mtpd.model.hf import HFBackbone
from mtpd.model.source import load_transformers_model
from mtpd.peers import hf_peer_methods
from mtpd.precision import cast_for_decoding, weights_dtype
from mtpd.prompts import PromptSet
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
    peers: bool = True  # heads on a Hugging Face model: also time transformers' generate and prompt lookup
    seed: int = 0
    draft_threshold: float = DRAFT_THRESHOLD  # > 0: dynamic draft length; 0: every head drafts
    auto_threshold: bool = False  # the threshold calibration finds fastest instead (calibrate_chain, DRAFT_THRESHOLDS)
    tree: bool = False  # also decode with a draft tree, side by side with the chain
    tree_shape: str | None = None  # a static tree as rank paths ("0 1 0.0"); None: calibrated
    tree_nodes: int = 16  # calibration tries trees of up to this many nodes (root included)
    tree_dynamic: bool = False  # also decode with a dynamic (EAGLE-2) tree of the static tree's node count
    calibration_prompts: int = 16  # held-out validation prompts for the tree's or heads' acceptance statistics
    second_turns: bool = True  # question files: also the second turns, after the model's first answers
    compile: bool = False  # every method mtpd decodes (baselines, chain, trees) with its blocks compiled (decode/passes.py)
    lookup: bool = False  # also decode with prompt lookup: behind the heads' chain, and alone (decode/lookup.py)
    lookup_tokens: int = LOOKUP_TOKENS  # drafts per lookup match

    def calibration_tokens(self, depth: int) -> int:
        """Greedy tokens per calibration prompt: as many as the benchmark generates, and enough for the
        statistics to cover every head of a deep draft even when the benchmark generates few."""
        return max(self.max_new_tokens, 64, 4 * depth)

    @property
    def calibrates(self) -> bool:
        """Whether the bench needs calibration prompts: a tree to choose, or the number of heads."""
        return self.auto_heads or self.auto_threshold or (self.tree and self.tree_shape is None)

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
            (self.lookup_tokens >= 1, f"--lookup-tokens must be >= 1 (got {self.lookup_tokens})"),
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


def _batches(prompts: list[list[int]], size: int,
             categories: list[str] | None = None) -> tuple[list[list[list[int]]], list[str | None]]:
    """Consecutive prompts in batches of up to `size`, and each batch's category: a batch never spans two
    categories, so per-category rates are sums over whole batches. Rows stay in the prompts' order."""
    categories = categories or [None] * len(prompts)
    batches, labels = [], []
    for start in range(len(prompts)):
        if start == 0 or categories[start] != labels[-1] or len(batches[-1]) == size:
            batches.append([])
            labels.append(categories[start])
        batches[-1].append(prompts[start])
    return batches, labels


def run_benchmark(checkpoint: Checkpoint, prompts: list[list[int]] | PromptSet, cfg: BenchConfig,
                  progress: Callable[[str], None] | None = None,
                  calibration_prompts: list[list[int]] | None = None, dtype_reason: str | None = None) -> dict:
    """Calibrate what the config asks to be chosen, time every method (`time_methods`) and report (docs/design.md §6;
    `speculative_metrics` per drafter; `seconds`: the warm-up and the timed rounds). `calibration_prompts`:
    held-out prompts the tree (with `tree` and no `tree_shape`) or the number of heads (with `auto_heads`) is
    calibrated on. The model decodes in the dtype of its weights (precision.cast_for_decoding);
    `dtype_reason` says why it is that one (precision.dtype_reason).

    `prompts` from a question file (a PromptSet with categories) add `per_category` figures and, with
    `cfg.second_turns`, a `second_turn` object: the questions' second turns, asked after the model's own first
    answers (the AR baseline's round-0 output, cut at its first stop token), timed and reported alike."""
    prompt_set = prompts if isinstance(prompts, PromptSet) else PromptSet(prompts)
    prompts = prompt_set.prompts
    model = checkpoint.model.eval()
    context = model.main.max_seq_len
    passes_for(model.main, cfg.compile)  # a model mtpd cannot compile is refused before any work
    _check_fits([len(p) for p in prompts], cfg, context, "prompts", "lower --max-new-tokens or --prompt-tokens")
    if cfg.second_turns:  # estimated before any work; the rendered second turns are checked again
        _check_fits(prompt_set.second_turn_lengths(cfg.max_new_tokens), cfg, context,
                    "second-turn prompts (turn 1, an answer of up to --max-new-tokens, turn 2)",
                    "lower --max-new-tokens or pass --first-turn-only")
    device = next(model.parameters()).device  # sampling draws from a generator on the model's device
    heads, heads_calibration = _heads(model, cfg), None
    stats = _calibration_statistics(model, cfg, calibration_prompts, progress)
    if cfg.auto_heads or cfg.auto_threshold:
        if not calibration_prompts:
            flag = "--heads auto" if cfg.auto_heads else "--draft-threshold auto"
            raise MtpdError(f"{flag} calibrates on validation prompts, and none are available: pass a number "
                            f"instead, or a checkpoint whose corpus is available")
        heads_calibration = calibrate_chain(
            model, calibration_prompts, model.num_heads,
            thresholds=DRAFT_THRESHOLDS if cfg.auto_threshold else (cfg.draft_threshold,),
            depths=None if cfg.auto_heads else (heads,), new_tokens=cfg.calibration_tokens(model.num_heads),
            progress=progress, stats=stats)
        heads = heads_calibration.shape.depth
        cfg = dataclasses.replace(cfg, draft_threshold=heads_calibration.draft_threshold)
    rule = make_rule(cfg.temperature, cfg.top_k, cfg.top_p)
    trees, calibration = _trees(model, heads, cfg, calibration_prompts, progress, stats)
    drafters = trees | _lookups(cfg)  # every drafter besides the chain, reported under its name
    methods = _methods(model, cfg, rule, heads, drafters)
    greedy = isinstance(rule, Greedy)
    turn, timed, seconds = _bench_turn(model, methods, prompt_set, cfg, heads, drafters, greedy, device, progress)
    report = {
        "model": checkpoint.config.get("model"),
        "checkpoint": str(checkpoint.path),
        "heads": heads,
        "heads_calibration": heads_calibration.report() if heads_calibration else None,
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": weights_dtype(model),
        "dtype_reason": dtype_reason,
        "compiled": cfg.compile,
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "num_prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        **prompt_set.report(),
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "rounds": cfg.rounds,
        "draft_threshold": cfg.draft_threshold,
        **turn,
    }
    for name in trees:
        report[name]["calibration"] = calibration.report() if calibration and name == "tree" else None
    second = prompt_set.second_turns(timed.outputs["autoregressive"]) if cfg.second_turns else None
    if second is not None:
        _check_fits([len(p) for p in second.prompts], cfg, context, "second-turn prompts",
                    "lower --max-new-tokens or pass --first-turn-only")
        labelled = (lambda line: progress(f"second turns, {line}")) if progress else None  # noqa: E731
        turn, _, turn_seconds = _bench_turn(model, methods, second, cfg, heads, drafters, greedy, device, labelled,
                                            warm_up=False)
        report["second_turn"] = {"num_prompts": len(second.prompts),
                                 "prompt_tokens": [len(p) for p in second.prompts], **turn}
        seconds += turn_seconds
    report |= {"torch_version": torch.__version__, "seconds": seconds}
    return report


def _check_fits(prompt_lengths: list[int], cfg: BenchConfig, context: int, what: str, remedy: str) -> None:
    """Every method must generate exactly max_new_tokens after each prompt, so prompt + budget must fit."""
    longest = max(prompt_lengths, default=0)
    if longest + cfg.max_new_tokens > context:
        raise MtpdError(f"{what} of up to {longest} tokens plus --max-new-tokens {cfg.max_new_tokens} exceed the "
                        f"model's context of {context} tokens: {remedy}")


def _bench_turn(model, methods: dict, prompt_set: PromptSet, cfg: BenchConfig, heads: int, drafters: dict, greedy: bool,
                device: torch.device, progress: Callable[[str], None] | None,
                warm_up: bool = True) -> tuple[dict, Timed, float]:
    """Time every method on one set of prompts; returns their speed and acceptance fields (baselines, the
    chain's at top level, each other drafter's, the peers', and per category when the prompts have categories), the
    timings, and the seconds the timed rounds took."""
    batches, categories = _batches(prompt_set.prompts, cfg.batch_size, prompt_set.categories)
    started = time.perf_counter()
    timed = time_methods(methods, batches, cfg.rounds, cfg.seed, device, progress, warm_up, count_graphs=cfg.compile)
    seconds = time.perf_counter() - started  # the divergence passes below are not part of the benchmark
    gap = divergence_gap(model.main, prompt_set.prompts, timed.outputs["autoregressive"]) if greedy else None
    report = {
        "baseline_tokens_per_s": timed.rate["autoregressive"],
        "no_cache_tokens_per_s": timed.rate.get("autoregressive_no_cache"),
        "baseline_tokens_per_cpu_s": timed.cpu_rate["autoregressive"],
        **speculative_metrics(timed, "speculative", heads, gap),
        "peers": _peer_report(timed.rate, timed.outputs, gap, cfg.batch_size),
        **compile_report(timed, cfg.compile),
    }
    for name, drafter in drafters.items():
        report[name] = {**speculative_metrics(timed, name, heads, gap), "drafter": drafter.describe()}
    if "tree" in drafters:
        report["tree_vs_chain"] = {
            "mean_accepted_tokens": report["tree"]["mean_accepted_tokens"] / report["mean_accepted_tokens"],
            "speedup": report["tree"]["speedup"] / report["speedup"]}
    if prompt_set.categories is not None:
        report["per_category"] = per_category(timed, categories, "speculative", heads)
        for name in drafters:
            report[name]["per_category"] = per_category(timed, categories, name, heads)
    return report, timed, seconds


CATEGORY_FIELDS = ("spec_tokens_per_s", "speedup", "cpu_speedup", "mean_accepted_tokens", "acceptance_rate",
                   "cumulative_acceptance", "verification_steps")


def per_category(timed: Timed, batch_categories: list[str | None], name: str, heads: int) -> dict[str, dict]:
    """Speed and acceptance of one speculative method on each category's batches: tokens/s over the AR
    baseline's on the same batches of the same interleaved rounds, as the overall speedup is measured."""
    report = {}
    for category in dict.fromkeys(batch_categories):
        part = timed.subset([i for i, label in enumerate(batch_categories) if label == category])
        metrics = speculative_metrics(part, name, heads, gap=None)  # rows here are not the gap's rows
        report[category] = {"num_prompts": sum(len(result.tokens) for result in part.results[name]),
                            "baseline_tokens_per_s": part.rate["autoregressive"],
                            **{field: metrics[field] for field in CATEGORY_FIELDS}}
    return report


def _methods(model, cfg: BenchConfig, rule, heads: int,
             drafters: dict) -> dict[str, Callable[[list[list[int]], torch.Generator], Generation]]:
    """Every way of decoding the bench compares, by report name: KV-cached AR (the baseline), the chain,
    the other drafters (trees, prompt lookup), no-cache AR, and a Hugging Face model's own methods."""
    def speculative(drafter):
        return lambda batch, generator: speculative_generate(model, batch, cfg.max_new_tokens, rule, heads,
                                                             generator=generator, drafter=drafter, compile=cfg.compile)

    methods = {"autoregressive": lambda batch, generator: autoregressive_generate(
                   model.main, batch, cfg.max_new_tokens, rule, generator=generator, compile=cfg.compile),
               "speculative": speculative(ChainDrafter(cfg.draft_threshold))}
    methods |= {name: speculative(drafter) for name, drafter in drafters.items()}
    if cfg.no_cache_baseline:
        methods["autoregressive_no_cache"] = lambda batch, generator: autoregressive_generate(
            model.main, batch, cfg.max_new_tokens, rule, use_cache=False, generator=generator, compile=cfg.compile)
    if cfg.peers and model.main.source is not None:  # an imported model: what its users would run instead
        methods |= hf_peer_methods(transformers_peer(model.main), cfg.max_new_tokens, rule)
    return methods


def _lookups(cfg: BenchConfig) -> dict:
    """Prompt lookup drafters to benchmark ({} without cfg.lookup): behind the chain (`lookup`: a row drafts from
    its context where its last tokens occurred before, else with the heads) and alone (`lookup_only`: mtpd's own
    prompt lookup decoding, no heads; the peer to compare heads with in the same decoder)."""
    if not cfg.lookup:
        return {}
    return {"lookup": LookupDrafter(ChainDrafter(cfg.draft_threshold), cfg.lookup_tokens),
            "lookup_only": LookupDrafter(None, cfg.lookup_tokens)}


def transformers_peer(main):
    """transformers' own model of an imported main model, in the same dtype and device: the adapter's, or
    loaded anew when mtpd's decoder computes the model itself."""
    if isinstance(main, HFBackbone):
        return main.model
    weight = main.embed.weight
    return cast_for_decoding(load_transformers_model(main.source, torch.float32).to(weight.device), weight.dtype)


@dataclass
class Timed:
    """What the timed rounds measured, per method and per batch: tokens and seconds summed over the rounds,
    and round 0's generation. Rates over any subset of the batches (one category's) come from the same
    interleaved rounds as the overall ones (`subset`)."""

    tokens: dict[str, list[int]]  # generated tokens of each batch, all rounds
    seconds: dict[str, list[float]]  # wall time of each batch, all rounds
    cpu_seconds: dict[str, list[float]]  # this process's CPU time of each batch, all rounds
    results: dict[str, list[Generation]]  # round 0's generation of each batch
    warm_up_seconds: dict[str, float] = field(default_factory=dict)  # each method's warm-up calls, not timed
    graphs: dict[str, int] | None = None  # graphs torch.compile compiled in each method's warm-up (when counted)
    graphs_while_timed: int | None = None  # ... and during the timed rounds: 0 when they timed compiled code only

    def subset(self, batches: list[int]) -> "Timed":
        """What the rounds measured on these batches only."""
        pick = lambda per_batch: {name: [values[i] for i in batches] for name, values in per_batch.items()}  # noqa: E731
        return Timed(pick(self.tokens), pick(self.seconds), pick(self.cpu_seconds), pick(self.results))

    @property
    def rate(self) -> dict[str, float]:
        """Generated tokens per second of wall time."""
        return {name: sum(self.tokens[name]) / sum(self.seconds[name]) for name in self.tokens}

    @property
    def cpu_rate(self) -> dict[str, float | None]:
        """Generated tokens per second of this process's CPU time."""
        return {name: sum(self.tokens[name]) / sum(cpu) if sum(cpu) else None for name, cpu in self.cpu_seconds.items()}

    @property
    def outputs(self) -> dict[str, list[list[int]]]:
        """Round 0's tokens, one row per prompt, in the batches' order."""
        return {name: [row for result in results for row in result.tokens] for name, results in self.results.items()}

    @property
    def records(self) -> dict[str, Generation]:
        """Round 0's per-step records (speculative methods), all batches together."""
        return {name: Generation([], accepted=[a for r in results for a in r.accepted],
                                 drafted=[d for r in results for d in r.drafted],
                                 verified=[v for r in results for v in r.verified])
                for name, results in self.results.items()}


def time_methods(methods: dict, batches: list[list[list[int]]], rounds: int, seed: int, device: torch.device,
                 progress: Callable[[str], None] | None = None, warm_up: bool = True,
                 count_graphs: bool = False) -> Timed:
    """A warm-up call of every method on the first batch of each batch size (unless `warm_up` is False: they
    ran already), then `rounds` rounds over all batches, each batch decoded by every method in turn; round r
    samples with seed + r for every method alike (each method its own generator, so its draws do not depend
    on the others'). Warm-up covers each batch size because compiled code compiles anew for a batch of one
    (decode/passes.py); `count_graphs` counts the graphs compiled in each method's warm-up and in the rounds."""
    clock = wall_clock(device)
    first_of_size = [batch for i, batch in enumerate(batches) if all(len(b) != len(batch) for b in batches[:i])]
    warm_up_seconds, graphs = {}, {} if count_graphs else None
    for name, generate in methods.items() if warm_up else ():  # first-call allocations, lazy init, compilation
        before, t0 = graphs_compiled() if count_graphs else 0, clock()
        for batch in first_of_size:
            generate(batch, torch.Generator(device).manual_seed(seed))
        warm_up_seconds[name] = clock() - t0
        if count_graphs:
            graphs[name] = graphs_compiled() - before
    before_rounds = graphs_compiled() if count_graphs else 0
    seconds = {name: [0.0] * len(batches) for name in methods}
    cpu_seconds = {name: [0.0] * len(batches) for name in methods}
    tokens = {name: [0] * len(batches) for name in methods}
    results: dict[str, list[Generation]] = {name: [] for name in methods}
    names = list(methods)

    def rates() -> str:
        return ", ".join(f"{name} {sum(tokens[name]) / max(sum(seconds[name]), 1e-9):.1f}" for name in names)

    # A bar over the batches of every round (a long benchmark shows its pace), drawn between timed calls.
    with tqdm(total=rounds * len(batches), disable=progress is None, unit="batch", dynamic_ncols=True,
              leave=False) as bar:
        for round_index in range(rounds):
            generators = {name: torch.Generator(device).manual_seed(seed + round_index) for name in names}
            for index, batch in enumerate(batches):
                # Every method decodes this batch back to back, in alternating order (A B C, C B A, ...): a
                # machine that slows down or speeds up during the run then shifts all methods alike, batch by batch.
                for name in names if (round_index * len(batches) + index) % 2 == 0 else names[::-1]:
                    t0, c0 = clock(), time.process_time()
                    result = methods[name](batch, generators[name])
                    seconds[name][index] += clock() - t0
                    cpu_seconds[name][index] += time.process_time() - c0
                    tokens[name][index] += result.num_tokens
                    if round_index == 0:
                        results[name].append(result)
                bar.update(1)
                bar.set_postfix_str(f"round {round_index + 1}/{rounds}, tok/s {rates()}", refresh=False)
            if progress:
                bar.clear()
                progress(f"round {round_index + 1}/{rounds}: tok/s {rates()}")
    return Timed(tokens, seconds, cpu_seconds, results, warm_up_seconds, graphs,
                 graphs_compiled() - before_rounds if count_graphs else None)


def compile_report(timed: Timed, compiled: bool) -> dict:
    """docs/design.md §6's compilation fields: each method's warm-up seconds (where it compiled) and graphs,
    and the graphs compiled while timed (0: the rounds timed compiled code only); null when not compiled."""
    if not compiled:
        return dict.fromkeys(("compile_seconds", "compiled_graphs", "graphs_compiled_while_timed"))
    return {"compile_seconds": timed.warm_up_seconds or None, "compiled_graphs": timed.graphs or None,
            "graphs_compiled_while_timed": timed.graphs_while_timed}


def speculative_metrics(timed: Timed, name: str, heads: int, gap: Callable[[int, int], float] | None) -> dict:
    """docs/design.md §5-6 metrics of one speculative method, against the KV-cached AR baseline of the same rounds;
    `gap` (greedy only, None when sampling): see `baseline_agreement`."""
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
        **baseline_agreement(timed.outputs[name], timed.outputs["autoregressive"], gap),
    }


def baseline_agreement(outputs: list[list[int]], reference: list[list[int]],
                       gap: Callable[[int, int], float] | None) -> dict:
    """How a greedy method's rows compare with the KV-cached AR baseline's (`reference`): whether all are
    identical, the fraction that is, and for each row that differs the index of its first differing token
    and `gap(row, index)`, the main model's top-2 logit gap there (`divergence_gap`). In fp32 any divergence
    is a bug; in bf16 a k-token verification and a 1-token pass round differently, so rows may part where
    the top two logits nearly tie, and the gaps say how near. All None when sampling (`gap` None)."""
    if gap is None:
        return dict.fromkeys(("identical_to_baseline", "identical_fraction", "divergences", "max_divergence_gap"))
    divergences = []
    for row, (output, expected) in enumerate(zip(outputs, reference, strict=True)):
        index = first_divergence(output, expected)
        if index is not None:
            divergences.append({"row": row, "index": index, "top2_gap": gap(row, index)})
    return {"identical_to_baseline": not divergences,
            "identical_fraction": 1 - len(divergences) / len(reference) if reference else 1.0,
            "divergences": divergences,
            "max_divergence_gap": max((d["top2_gap"] for d in divergences), default=None)}


def divergence_gap(main, prompts: list[list[int]], reference: list[list[int]]) -> Callable[[int, int], float]:
    """gap(row, index): the main model's top-2 logit gap before token `index` of the reference row (prompt +
    reference[row][:index], teacher-forced, `top2_gap`); computed once per place, however many methods part
    from the reference there."""
    return functools.cache(lambda row, index: top2_gap(main, prompts[row], reference[row][:index]))


@torch.no_grad()
def top2_gap(main, prompt: list[int], tokens: list[int]) -> float:
    """The main model's top logit minus its second for the token after prompt + tokens: one teacher-forced
    pass (no cache) in the model's dtype, the logits compared in fp32."""
    sequence = torch.tensor([prompt + tokens], device=next(main.parameters()).device)
    top = main.logits(main(sequence)[:, -1]).float().topk(2, dim=-1).values[0]
    return float(top[0] - top[1])


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


def _calibration_statistics(model, cfg: BenchConfig, calibration_prompts: list[list[int]] | None,
                            progress: Callable[[str], None] | None) -> DraftStatistics | None:
    """The calibration prompts' greedy continuations and every head's ranks along them, gathered once for
    whatever the bench calibrates (the chain's heads and threshold, the tree): None when nothing is."""
    if not (cfg.calibrates and calibration_prompts):
        return None
    return draft_statistics(model, calibration_prompts, cfg.calibration_tokens(model.num_heads), model.num_heads,
                            progress=progress)


def _trees(model, heads: int, cfg: BenchConfig, calibration_prompts: list[list[int]] | None,
           progress: Callable[[str], None] | None, stats: DraftStatistics | None):
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
                                     progress=progress, stats=stats)
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


def _peer_report(rate: dict, outputs: dict, gap: Callable[[int, int], float] | None, batch_size: int) -> dict:
    """Hugging Face's own decoders beside ours (only for heads on a Hugging Face model); `gap` None when
    sampling (`baseline_agreement`)."""
    peers = {}
    for name, batch in (("hf_generate", batch_size), ("hf_prompt_lookup", 1)):
        if name in rate:
            peers[name] = {"tokens_per_s": rate[name], "batch_size": batch,
                           "spec_speedup_over_it": rate["speculative"] / rate[name],
                           "identical_to_spec": outputs[name] == outputs["speculative"] if gap is not None else None,
                           **baseline_agreement(outputs[name], outputs["autoregressive"], gap)}
    if "hf_prompt_lookup" in peers:
        peers["hf_prompt_lookup"]["prompt_lookup_num_tokens"] = LOOKUP_TOKENS
    return peers


def agreement_lines(methods: list[tuple[str, dict]], rows: int, dtype: str) -> list[str]:
    """The table's verdict on greedy losslessness (`baseline_agreement` fields of each labelled method): one
    line when every row of every method equals the AR baseline's, else one per method."""
    if all(m["identical_to_baseline"] for _, m in methods):
        return [f"greedy output identical to autoregressive: yes, {rows}/{rows} rows"]
    why = ("bf16 rounding at near-ties" if dtype == "bfloat16" else
           f"{dtype} should be identical: please report this")
    lines = []
    for label, m in methods:
        same = round(m["identical_fraction"] * rows)
        line = f"greedy output identical to autoregressive ({label}): {'yes, ' if same == rows else ''}{same}/{rows} rows"
        if m["divergences"]:
            line += f"; first divergences at top-2 logit gaps <= {m['max_divergence_gap']:.3g} ({why})"
        lines.append(line)
    return lines


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
    lookups = {"lookup": "speculative, prompt lookup + heads' chain", "lookup_only": "prompt lookup (mtpd, no heads)"}
    methods += [(label, report[name]) for name, label in lookups.items() if name in report]
    for label, m in methods:
        rows.append((label, m["spec_tokens_per_s"], m["speedup"], m["cpu_speedup"] or "-", m["mean_accepted_tokens"]))
    speed = format_table(["method", "tokens/s", "vs KV-cached AR", "same, CPU time", "tokens per pass"], rows)
    identical = report["identical_to_baseline"]
    lines = [per_head, "", speed, "",
             f"mean accepted tokens per verification (tau): {report['mean_accepted_tokens']:.3f}   "
             f"efficiency (speedup / tau): {report['efficiency']:.3f}   "
             f"mean draft length: {report['mean_draft_length']:.2f}"]
    if report["compiled"]:
        lines.append(compile_line(report))
    if report.get("heads_calibration"):
        choice = report["heads_calibration"]
        lines.append(f"calibrated chain: {heads} heads, draft threshold {choice['draft_threshold']:g} (expected tau "
                     f"{choice['expected_mean_accepted_tokens']:.2f}, {choice['step_ms']:.1f} ms a step; "
                     f"{len(choice['candidates'])} candidates in the report's heads_calibration)")
    if report["speedup_vs_no_cache"] is not None:
        lines.append(f"speedup vs no-cache AR (the paper's setting): {report['speedup_vs_no_cache']:.2f}x")
    for name in trees:
        tree = report[name]
        shape = f", shape {tree['drafter']['shape']}" if "shape" in tree["drafter"] else ""
        lines.append(f"{name}: tau {tree['mean_accepted_tokens']:.3f}, {tree['tokens_verified_per_step']:.1f} tokens "
                     f"verified per pass{shape}")
    for name in lookups:
        if name in report:
            m = report[name]
            lines.append(f"{name}: tau {m['mean_accepted_tokens']:.3f}, {m['tokens_verified_per_step']:.1f} tokens verified "
                         f"per pass, up to {m['drafter']['lookup_tokens']} drafts a match")
    if "tree_vs_chain" in report:
        ratio = report["tree_vs_chain"]
        lines.append(f"tree vs chain: {ratio['mean_accepted_tokens']:.2f}x mean accepted tokens, "
                     f"{ratio['speedup']:.2f}x speedup")
    if identical is not None:
        peers = [(labels[name], peer) for name, peer in report.get("peers", {}).items()]
        lines += agreement_lines(methods + peers, report["num_prompts"], report["dtype"])
    for name, peer in report.get("peers", {}).items():
        same = "" if peer["identical_to_spec"] is None else f"; greedy output identical: {'yes' if peer['identical_to_spec'] else 'NO'}"
        lines.append(f"speculative vs {name}: {peer['spec_speedup_over_it']:.2f}x{same}")
    return "\n".join(lines + turn_lines(report))


def compile_line(report: dict) -> str:
    """The table's note on compilation: time and graphs of the warm-up, and whether the rounds compiled more."""
    seconds, graphs = report["compile_seconds"] or {}, report["compiled_graphs"] or {}
    return (f"compiled: warm-up (compilation) {sum(seconds.values()):.1f}s, {sum(graphs.values())} graphs "
            f"(" + ", ".join(f"{name} {seconds[name]:.1f}s" for name in seconds) + "); compiled while timed: "
            f"{report['graphs_compiled_while_timed']} graphs")


def turn_lines(report: dict) -> list[str]:
    """The table's part for a question file: how its prompts were made, and the chain's tau and speedup per
    category, for the first turns and, when they ran, the second turns."""
    lines = [f"prompts: {report['prompt_note']}"] if report.get("prompt_note") else []
    turns = [("first turns", report)] + ([("second turns", report["second_turn"])] if "second_turn" in report else [])
    for label, turn in turns:
        if "per_category" not in turn:
            continue
        rows = [(category, m["num_prompts"], m["mean_accepted_tokens"], m["speedup"])
                for category, m in turn["per_category"].items()]
        rows.append(("all", turn["num_prompts"], turn["mean_accepted_tokens"], turn["speedup"]))
        identical = turn["identical_to_baseline"]
        same = "" if identical is None else f"; greedy output identical to autoregressive: {'yes' if identical else 'NO'}"
        lines += ["", f"{label} ({report['prompt_format']}), chain, by category{same}",
                  format_table(["category", "prompts", "tau", "speedup"], rows)]
    return lines
