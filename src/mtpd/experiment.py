"""`mtpd experiment`: the paper's claims checked at small scale, one command per suite.

A suite is a list of variants trained on the same corpus, in the same data order, from the same seed and
for the same number of tokens, differing only in what the variant names: number of heads, the objective
(MTP vs MTP-D, stop-gradient, top-N, beta, KL direction) or looped extension. Each variant is trained,
evaluated teacher-forced (main-head loss, offline acceptance per head) and benchmarked online (acceptance,
cumulative acceptance, mean accepted tokens, speedup vs KV-cached autoregressive decoding). Finished
variants are skipped when the suite is run again, so an interrupted suite resumes where it stopped.

    runs/exp/variants/<name>/      the variant's training run, and result.json once it is done
    runs/exp/results.json          every variant's figures, the suite and scale, the training-cost probe
    runs/exp/report.md + *.png     tables and plots (report.py)
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mtpd.atomic import discarded_on_failure, write_json
from mtpd.bench import BenchConfig, run_benchmark
from mtpd.checkpoint import list_checkpoints, load_checkpoint
from mtpd.clock import wall_clock
from mtpd.config import DRAFT_THRESHOLD, LossConfig, preset
from mtpd.data import TokenBatches
from mtpd.errors import MtpdError
from mtpd.losses import mtp_d_loss
from mtpd.model import MTPModel
from mtpd.run import benchmark_prompts, extend, pretrain, resolve_device, tokenized_corpus
from mtpd.train import TrainConfig, autocast_dtype


@dataclass(frozen=True)
class Variant:
    name: str
    heads: int
    beta: float | None = None  # None: the paper's default (1.0 with one head, 0.5 with more)
    stop_grad: bool = True
    top_n: int | None = None  # None: mass-covering N; 0 stands for the full vocabulary
    kl: str = "forward"
    extend_from: str | None = None  # looped extension of that variant (its heads copied, only new ones train)
    token_factor: float = 1.0  # pretraining tokens relative to the scale's (to match looped runs' totals)
    description: str = ""

    @property
    def looped(self) -> bool:
        return self.extend_from is not None

    def loss_config(self, vocab_size: int) -> LossConfig:
        top_n = vocab_size if self.top_n == 0 else self.top_n
        return LossConfig(beta=self.beta, stop_grad=self.stop_grad, top_n=top_n, kl_direction=self.kl).validate()


_BASE = [
    Variant("mtp-k1", 1, beta=0.0, description="plain MTP, 1 head"),
    Variant("mtpd-k1", 1, description="MTP-D, 1 head (beta 1.0)"),
    Variant("mtp-k4", 4, beta=0.0, description="plain MTP, 4 heads"),
    Variant("mtpd-k4", 4, description="MTP-D, 4 heads (beta 0.5, top-N by mass, stop-gradient)"),
]
_ABLATIONS = [
    Variant("mtpd-k4-no-stop-grad", 4, stop_grad=False, description="MTP-D without stop-gradient on the main head"),
    Variant("mtpd-k4-top10", 4, top_n=10, description="KL over the teacher's top-10"),
    Variant("mtpd-k4-top100", 4, top_n=100, description="KL over the teacher's top-100"),
    Variant("mtpd-k4-full-vocab", 4, top_n=0, description="KL over the full vocabulary"),
    Variant("mtpd-k4-beta1.0", 4, beta=1.0, description="MTP-D, beta 1.0"),
    Variant("mtpd-k4-beta1.5", 4, beta=1.5, description="MTP-D, beta 1.5"),
    Variant("mtpd-k4-reverse-kl", 4, kl="reverse", description="MTP-D with reverse KL(head || main)"),
]
_LOOPED = [
    Variant("mtpd-k8-looped", 8, extend_from="mtpd-k4", description="looped extension 4 -> 8"),
    Variant("mtpd-k16-looped", 16, extend_from="mtpd-k8-looped", description="looped extension 8 -> 16"),
]

SUITES: dict[str, list[Variant]] = {
    "paper": _BASE + _ABLATIONS + _LOOPED,  # every claim of the paper, plus looped extension
    "looped": [_BASE[0], _BASE[2], _BASE[3], *_LOOPED],  # extension vs 1 and 4 heads (see Scale.joint_comparison)
    "mtp-vs-mtpd": _BASE,
}


@dataclass(frozen=True)
class Scale:
    """How big every variant is: preset, tokens, and the evaluation and benchmark sizes."""

    preset: str
    tokens: int  # pretraining tokens per variant
    extend_fraction: float = 0.2  # looped: tokens of each extension, as a fraction of `tokens` (paper: 70B / 350B)
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    warmup_steps: int = 50
    eval_windows: int = 64
    bench_prompts: int = 8
    bench_prompt_tokens: int = 64
    bench_new_tokens: int = 96
    draft_threshold: float = 0.0  # > 0: the online benchmark also runs with dynamic draft length
    joint_comparison: bool = True  # looped suites also train 8 heads jointly for the same total tokens
    cost_probe_steps: int = 6

    def train_config(self, tokens: int) -> TrainConfig:
        steps = max(1, tokens // (self.batch_size * self.seq_len))
        return TrainConfig(batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                           warmup_steps=min(self.warmup_steps, max(1, steps // 5)), max_tokens=tokens,
                           eval_every=max(1, steps // 4), eval_windows=self.eval_windows,
                           save_every=max(1, steps // 8), seed=0).validate()


SCALES: dict[str, Scale] = {
    # `tiny`, ~150k tokens a variant: the whole paper suite in about half an hour on 2 CPU cores.
    "quick": Scale("tiny", 150_000, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=20, eval_windows=32,
                   bench_prompts=4, bench_new_tokens=64, cost_probe_steps=4),
    # The reference preset: hours on 2 CPU cores.
    "full": Scale("small", 1_000_000, draft_threshold=DRAFT_THRESHOLD),
}


def suite_variants(suite: str, scale: Scale) -> list[Variant]:
    if suite not in SUITES:
        raise MtpdError(f"unknown suite '{suite}': choose one of {', '.join(SUITES)}")
    variants = list(SUITES[suite])
    looped = [v for v in variants if v.looped]
    if looped and scale.joint_comparison:
        # Looped 8 heads saw base + one extension's tokens; the joint run gets the same total.
        variants.append(Variant("mtpd-k8-joint", 8, token_factor=1 + scale.extend_fraction,
                                description="8 heads trained jointly for the looped run's total tokens"))
    return variants


def run_suite(suite: str, scale: Scale, out_dir: str | Path, data_path: str | None = None, device: str = "auto",
              log=print, show_progress: bool = True) -> dict:
    """Train, evaluate and benchmark every variant of `suite` (skipping finished ones); write results.json."""
    out_dir = Path(out_dir)
    variants = suite_variants(suite, scale)
    context = preset(scale.preset).max_seq_len
    if scale.bench_prompt_tokens + scale.bench_new_tokens > context:  # refused before any variant trains
        raise MtpdError(f"preset {scale.preset} has a context of {context} tokens, fewer than the benchmark's "
                        f"{scale.bench_prompt_tokens} prompt + {scale.bench_new_tokens} new tokens: use a larger "
                        f"--preset or --scale quick")
    started = time.perf_counter()
    results = []
    # A suite that fails before any variant saved something (a bad corpus, Ctrl-C while tokenizing) leaves
    # no --out behind: settings.json alone records nothing worth keeping.
    with discarded_on_failure(out_dir, disposable=("settings.json",)):
        _check_same_settings(out_dir, {"scale": dataclasses.asdict(scale), "data": data_path or "stdlib"})
        for index, variant in enumerate(variants, start=1):
            log(f"[{index}/{len(variants)}] {variant.name}: {variant.description}")
            results.append(run_variant(variant, scale, out_dir, data_path, device, log, show_progress))
    probe_path = out_dir / "training_cost.json"
    if probe_path.exists():
        cost = json.loads(probe_path.read_text())
    else:
        log("measuring training cost of MTP vs MTP-D (interleaved steps on the same batches)")
        trained = next((r for r in results if r["name"] == "mtpd-k4"), None)
        cost = training_cost(scale, data_path, device, top_n=trained["objective"]["resolved_top_n"] if trained else None)
        write_json(probe_path, cost)
    summary = {"suite": suite, "scale": dataclasses.asdict(scale), "data": data_path or "stdlib",
               "device": str(resolve_device(device)), "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch_version": torch.__version__,
               "seconds_this_run": time.perf_counter() - started, "training_cost": cost, "variants": results}
    write_json(out_dir / "results.json", summary)
    return summary


def _check_same_settings(out_dir: Path, settings: dict) -> None:
    """Finished variants are reused, so an experiment directory holds one scale and corpus: refuse others."""
    path = out_dir / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(key for key in {**saved["scale"], **settings["scale"]}
                         if saved["scale"].get(key) != settings["scale"].get(key))
        changed += ["data"] if saved["data"] != settings["data"] else []
        if changed:
            raise MtpdError(f"{out_dir} holds an experiment with other settings ({', '.join(changed)} differ), whose "
                            f"finished variants would be reused: choose another --out")
    else:
        write_json(path, settings)


def run_variant(variant: Variant, scale: Scale, out_dir: Path, data_path: str | None, device: str, log,
                show_progress: bool) -> dict:
    run_dir = out_dir / "variants" / variant.name
    result_path = run_dir / "result.json"
    if result_path.exists():
        log("  done before: skipped")
        return json.loads(result_path.read_text())
    started = time.perf_counter()
    quiet = lambda *_: None  # noqa: E731 (the trainer's summary lines; the progress bar stays)
    if variant.looped:
        base = out_dir / "variants" / variant.extend_from
        if not list_checkpoints(base):
            raise MtpdError(f"variant {variant.name} extends {variant.extend_from}, which has no checkpoint in {base}: "
                            f"run the suite that trains it first")
        budget = {"max_tokens": max(1, round(scale.extend_fraction * scale.tokens))}
        metrics, path = extend(base, variant.heads, run_dir, budget, data_path=data_path, resume=True,
                               device=device, show_progress=show_progress, log=quiet)
    else:
        tokens = round(scale.tokens * variant.token_factor)
        model_cfg = preset(scale.preset, mtp_heads=variant.heads)
        metrics, path = pretrain(model_cfg, scale.train_config(tokens), variant.loss_config(model_cfg.vocab_size),
                                 run_dir, data_path, resume=True, device=device, show_progress=show_progress,
                                 log=quiet)
    train_seconds = time.perf_counter() - started
    checkpoint = load_checkpoint(path, resolve_device(device))
    prompts = benchmark_prompts(checkpoint, num_prompts=scale.bench_prompts, prompt_tokens=scale.bench_prompt_tokens)
    online = {}
    for threshold in sorted({0.0, scale.draft_threshold}):
        cfg = BenchConfig(max_new_tokens=scale.bench_new_tokens, rounds=1, no_cache_baseline=False,
                          draft_threshold=threshold)
        online[f"{threshold:g}"] = _online_figures(run_benchmark(checkpoint, prompts, cfg))
    config = checkpoint.config
    result = {"name": variant.name, "description": variant.description, "heads": variant.heads,
              "objective": {**config["loss"], "resolved_beta": LossConfig(**config["loss"]).resolved_beta(variant.heads),
                            "resolved_top_n": config["state"].get("top_n")},
              "extend_from": variant.extend_from, "tokens": config["state"]["tokens_seen"],
              "total_tokens": total_tokens(config),
              "history": config.get("history", []),
              **{k: metrics[k] for k in ("val_loss", "val_ppl", "head_ce", "offline_acceptance")},
              "train_tokens_per_s": _mean_train_speed(run_dir), "train_seconds_this_run": train_seconds,
              "online": online, "checkpoint": str(path)}
    write_json(result_path, result)
    log(f"  val loss {result['val_loss']:.4f}, offline acceptance "
        f"{' '.join(f'{a:.2f}' for a in result['offline_acceptance'])}, speedup {online['0']['speedup']:.2f}x, "
        f"tau {online['0']['mean_accepted_tokens']:.2f}")
    return result


def total_tokens(config: dict) -> int:
    """Tokens of every stage that built a checkpoint: pretraining, earlier extensions, and its own run."""
    history = config.get("history", [])
    return sum(event.get("tokens") or 0 for event in history[:-1]) + config["state"]["tokens_seen"]


def _online_figures(report: dict) -> dict:
    keys = ("acceptance_rate", "cumulative_acceptance", "mean_accepted_tokens", "speedup", "baseline_tokens_per_s",
            "spec_tokens_per_s", "efficiency", "mean_draft_length", "identical_to_baseline", "draft_threshold")
    return {k: report[k] for k in keys}


def _mean_train_speed(run_dir: Path) -> float | None:
    """Mean tokens/s over the run's logged training steps (noisy on a shared machine; see training_cost)."""
    speeds = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []:
        record = json.loads(line)
        if record.get("event") == "train" and "tok_per_s" in record:
            speeds.append(record["tok_per_s"])
    return sum(speeds) / len(speeds) if speeds else None


def training_cost(scale: Scale, data_path: str | None = None, device: str = "auto", heads: int = 4,
                  top_n: int | None = None) -> dict:
    """Tokens/s of one training step with the MTP and the MTP-D objective, measured on the same model and
    batches with the steps interleaved, so a busy machine slows both alike (unlike the training logs).
    `top_n`: the KL's support, as resolved by the trained MTP-D run (None: the full vocabulary)."""
    dev = resolve_device(device)
    model_cfg = preset(scale.preset, mtp_heads=heads)
    data = tokenized_corpus(data_path, model_cfg.vocab_size)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data.tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = MTPModel(model_cfg).to(dev).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = TokenBatches(data.train, scale.batch_size, scale.seq_len, seed=0)
    objectives = {"mtp": LossConfig(beta=0.0), "mtpd": LossConfig(top_n=top_n)}
    autocast = autocast_dtype(scale.train_config(scale.tokens), dev)  # as the variants trained: bf16 on a GPU
    clock = wall_clock(dev)
    seconds = dict.fromkeys(objectives, 0.0)
    for step in range(scale.cost_probe_steps + 1):  # step 0 warms up
        window = batches.next_batch().to(dev)
        order = list(objectives.items())
        for name, loss_cfg in order if step % 2 else order[::-1]:  # alternate who runs first (warm caches)
            started = clock()
            with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
                main_logits, head_logits = model(window[:, :-1])
                loss = mtp_d_loss(window, main_logits, head_logits, loss_cfg).total
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                seconds[name] += clock() - started
    tokens = scale.cost_probe_steps * scale.batch_size * scale.seq_len
    rate = {name: tokens / s for name, s in seconds.items()}
    return {"preset": scale.preset, "heads": heads, "steps": scale.cost_probe_steps, "top_n": top_n,
            "mtp_tokens_per_s": rate["mtp"], "mtpd_tokens_per_s": rate["mtpd"], "mtpd_vs_mtp": rate["mtpd"] / rate["mtp"]}
