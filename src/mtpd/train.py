"""One trainer for every mode (docs/design.md §3).

    joint pretraining      everything trains
    head-only (frozen)     freeze_main=True: the main model is frozen, only the heads train
    looped extension       freeze_main=True, frozen_heads=m: heads 1..m frozen too, only the new ones train

Frozen parts are not in the optimizer, get no gradient, and run under no_grad (cheaper and bit-identical
afterwards). The loop is plain PyTorch: AdamW, warm-up + cosine schedule, gradient accumulation and
clipping, optional bf16 autocast, periodic evaluation and atomic checkpoints with exact resume.

With the main model frozen a step computes only what the heads learn from (docs/design.md §3.2): the main
head over the draft vocabulary as their teacher (no full-vocabulary logits, no main CE: evaluation reports
it), a pretrained model held in bf16 when that is the training precision, and its hidden states read from
the teacher cache (teacher_cache.py) for windows it has seen.

Under torchrun the same loop runs on every rank (distributed.py, parallel.py): each rank trains on its rows
of the global batch (batch_size per rank x world size), gradients are averaged by DDP (or reduced by FSDP2),
reported losses and token counts are global, and every decision that ends the run (budget, time, NaN) is
the same on all ranks. Rank 0 alone logs and writes checkpoints; the others wait for it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from mtpd import distributed
from mtpd.checkpoint import (STATE_FILE, USE_AN_EARLIER_ONE, checkpoint_dir, list_checkpoints, prune_checkpoints,
                             save_checkpoint)
from mtpd.config import LossConfig
from mtpd.data import TokenBatches, validation_windows
from mtpd.atomic import atomic_file
from mtpd.errors import MtpdError, require
from mtpd.evaluate import evaluate
from mtpd.losses import LossTerms, heads_loss, mtp_d_loss, top_n_for_mass
from mtpd.model.draft_vocab import draft_index_map
from mtpd.model import MTPModel
from mtpd.parallel import parallelize
from mtpd.precision import cast_for_decoding, resolve_dtype
from mtpd.teacher_cache import TeacherCache


BUDGET_FIELDS = ("max_steps", "max_tokens", "time_budget")
# With a time budget, the schedule's horizon is fixed from the speed of this many steps (after one warm-up
# step, whose allocations and first-call overheads would make the estimate too short), and refitted as often
# from the mean speed of the last RECENT_STEPS steps: a machine that was busy during the first steps would
# otherwise end the run long before its time is up (or, the other way round, cut it short).
PROBE_STEPS = 4
RECENT_STEPS = 16
# How heads on a pretrained model start: random (init_weights), or each head's block a copy of the main
# model's last block (MTPModel.init_heads_from_last_block).
HEAD_INITS = ("random", "last-block")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    time_budget: float | None = None  # seconds of training (evaluation and saving excluded)
    eval_every: int = 100
    eval_windows: int = 32
    save_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    freeze_main: bool = False
    frozen_heads: int = 0
    # Heads on a pretrained model (run.train_heads): how they start (HEAD_INITS), and whether the frozen main
    # model's hidden states are read from / kept in a disk cache (teacher_cache.py).
    head_init: str = "random"
    teacher_cache: bool = False

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def budget(self) -> dict:
        """The limits that stop training; totals over the whole run, resumed segments included."""
        return {name: getattr(self, name) for name in BUDGET_FIELDS}

    def validate(self) -> "TrainConfig":
        checks = [
            (self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})"),
            (self.seq_len >= 2, f"--seq-len must be >= 2 (got {self.seq_len})"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1 (got {self.grad_accum})"),
            (self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1 (got {self.max_steps})"),
            (self.max_tokens is None or self.max_tokens >= 1, f"--max-tokens must be >= 1 (got {self.max_tokens})"),
            (self.time_budget is None or self.time_budget > 0, f"--time-budget must be > 0 (got {self.time_budget})"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0 (got {self.warmup_steps})"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0 (got {self.weight_decay})"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0, 0 = off (got {self.grad_clip})"),
            (self.eval_every >= 1 and self.save_every >= 1, "--eval-every and --save-every must be >= 1"),
            (self.eval_windows >= 1, f"--eval-windows must be >= 1 (got {self.eval_windows})"),
            # 0 would delete every checkpoint, including the one just written, and with it --resume.
            (self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1 (got {self.keep_checkpoints})"),
            (self.frozen_heads >= 0, f"frozen_heads must be >= 0 (got {self.frozen_heads})"),
            (self.dtype in ("auto", "fp32", "bf16"), f"--dtype must be auto, fp32 or bf16 (got {self.dtype})"),
            (self.head_init in HEAD_INITS, f"--head-init must be {' or '.join(HEAD_INITS)} (got {self.head_init})"),
        ]
        require(checks)
        return self


def learning_rate(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast_dtype(cfg: TrainConfig, device: torch.device, pretrained_teacher: bool = False) -> torch.dtype | None:
    """The autocast dtype of `--dtype`: auto is bf16 on CUDA and, for heads on a frozen pretrained model
    (`pretrained_teacher`), wherever the device computes bf16 natively (precision.py: on this project's CPU the
    frozen SmolLM2 runs 2x faster in bf16); built-in models keep fp32 on a CPU."""
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if cfg.dtype == "auto" and pretrained_teacher and resolve_dtype("auto", device) == torch.bfloat16:
        return torch.bfloat16
    return None


def trainable_parameters(model: MTPModel, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Set requires_grad by training mode and return the parameters the optimizer should own."""
    for param in model.parameters():
        param.requires_grad_(False)
    modules = [] if cfg.freeze_main else [model.main]
    modules += list(model.heads[cfg.frozen_heads:])
    params = []
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(True)
            params.append(param)
    if not params:
        raise MtpdError("nothing to train: the main model is frozen and there are no unfrozen heads")
    return params


class Trainer:
    def __init__(self, model: MTPModel, tokenizer: Tokenizer, train_tokens: torch.Tensor,
                 val_tokens: torch.Tensor, cfg: TrainConfig, loss_cfg: LossConfig, out_dir: Path,
                 meta: dict | None = None, device: str | torch.device = "cpu", show_progress: bool = True,
                 fsdp: bool = False):
        self.cfg, self.loss_cfg = cfg.validate(), loss_cfg.validate()
        self.device = torch.device(device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.meta = meta or {}
        self.show_progress = show_progress and self.is_main
        # Heads on a Hugging Face model: checkpoints reference the frozen main model instead of saving it.
        pretrained_teacher = cfg.freeze_main and model.main.source is not None
        self.autocast = autocast_dtype(cfg, self.device, pretrained_teacher)
        if pretrained_teacher and self.autocast is not None:
            # Held in the autocast dtype (cast once): autocast would cast its frozen weights again at every
            # matmul of every step, since it caches casts only of weights that require grad. The heads keep
            # fp32 master weights.
            cast_for_decoding(model.main, self.autocast)
        if cfg.teacher_cache and not cfg.freeze_main:
            raise MtpdError("--teacher-cache keeps a frozen main model's hidden states: it applies to heads trained "
                            "on a frozen model (--hf, mtpd extend), not to joint pretraining")
        trainable_parameters(model, cfg)
        # The module the training step calls (DDP or FSDP2 under torchrun); self.model is the model itself
        # (sharded in place under FSDP2), for evaluation and checkpoints.
        self.parallel = parallelize(model.to(self.device), self.device, fsdp)
        self.model = self.parallel.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # After the cast and the move: the cache is keyed by the weights as they compute.
        self.teacher_cache = TeacherCache(self.model.main, self.autocast) if cfg.teacher_cache else None
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(0.9, 0.95), fused=self.device.type == "cuda")
        self.batches = TokenBatches(train_tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=self.rank,
                                    world_size=self.world_size)
        self.val_windows = validation_windows(val_tokens, cfg.seq_len, cfg.eval_windows)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0  # seconds spent in training steps, summed over resumed segments
        self.total_steps = self._planned_steps()
        self.top_n = loss_cfg.top_n
        # With a frozen main model its cross-entropy is only reported (by evaluation), not optimised.
        self.objective = dataclasses.replace(loss_cfg, main_weight=0.0) if cfg.freeze_main else loss_cfg
        self.beta = loss_cfg.resolved_beta(model.num_heads)
        self.last_eval: dict = {}
        self.last_eval_step = -1
        self.last_save_step = -1

    @property
    def tokens_per_step(self) -> int:
        """Training tokens of one optimizer step over all ranks (cfg.batch_size is per rank)."""
        return self.cfg.tokens_per_step * self.world_size

    # --- budget -----------------------------------------------------------------------------------------
    def _planned_steps(self) -> int | None:
        """Steps implied by --max-steps / --max-tokens; None with only a time budget (estimated later)."""
        candidates = []
        if self.cfg.max_steps is not None:
            candidates.append(self.cfg.max_steps)
        if self.cfg.max_tokens is not None:
            candidates.append(math.ceil(self.cfg.max_tokens / self.tokens_per_step))
        if not candidates and self.cfg.time_budget is None:
            raise MtpdError("no training budget: pass --max-steps, --max-tokens or --time-budget")
        return min(candidates) if candidates else None

    def _estimate_total_steps(self, seconds_per_step: float) -> int:
        """With a time budget, set the schedule's horizon from the measured seconds per step, so the learning
        rate has decayed when time runs out (also when --max-steps would only be reached later)."""
        by_time = self.step + int((self.cfg.time_budget - self.elapsed) / seconds_per_step)
        planned = self._planned_steps()
        return max(self.step + 1, by_time if planned is None else min(planned, by_time))

    def _budget_reached(self) -> bool:
        if self.cfg.time_budget is None:
            return self.total_steps is not None and self.step >= self.total_steps
        # With a time budget the estimated horizon only shapes the schedule (it is refitted as speed changes):
        # the run ends when the time is up, or at --max-steps / --max-tokens if given as well.
        planned = self._planned_steps()
        return self.elapsed >= self.cfg.time_budget or (planned is not None and self.step >= planned)

    # --- one optimisation step ----------------------------------------------------------------------------
    def loss(self, window: torch.Tensor) -> LossTerms:
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if not self.cfg.freeze_main:
                main_logits, head_logits = self.parallel.module(window[:, :-1])
                return mtp_d_loss(window, main_logits, head_logits, self.objective, self.top_n, self.model.draft_ids)
            # A frozen main model is only the teacher: its head scores the draft vocabulary alone (no [B, T, V]
            # logits), and only for the KL; its cross-entropy, constant here, is left to evaluation.
            inputs = window[:, :-1]
            h0 = None if self.teacher_cache is None else self.teacher_cache.hidden_states(self.model.main, inputs)
            teacher, head_logits = self.parallel.module(inputs, main_scores="draft" if self.beta else "none", h0=h0)
            ids = self.model.draft_ids  # read now: a resumed run loads its ids after the trainer is built
            draft_index = None if ids is None else draft_index_map(ids, self.model.cfg.vocab_size)
            return heads_loss(window, teacher, head_logits, self.objective, self.top_n, draft_index)

    def train_step(self) -> dict:
        lr = learning_rate(self.step, self.total_steps or 10**9, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = None
        for micro_batch in range(1, self.cfg.grad_accum + 1):
            window = self.batches.next_batch().to(self.device)
            with self.parallel.gradient_sync(micro_batch == self.cfg.grad_accum):
                terms = self.loss(window)
                (terms.total / self.cfg.grad_accum).backward()
            stats = {"loss": terms.total.item(), **({} if terms.main_ce is None else {"ce0": terms.main_ce.item()}),
                     **{f"ce{k}": ce.item() for k, ce in enumerate(terms.head_ce, 1)},
                     **{f"kl{k}": kl.item() for k, kl in enumerate(terms.head_kl, 1)}}
            totals = stats if totals is None else {k: totals[k] + v for k, v in stats.items()}
        stats = distributed.mean_over_ranks({k: v / self.cfg.grad_accum for k, v in totals.items()})
        # Checked on the global loss, before the optimizer step: every rank stops together, and the weights
        # (like the checkpoints on disk) stay as they were after the last good step.
        if not math.isfinite(stats["loss"]):
            self._stop_on_non_finite_loss(stats["loss"])
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return stats | {"lr": lr}

    def _stop_on_non_finite_loss(self, loss: float) -> None:
        last = list_checkpoints(self.out_dir)
        kept = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
        fix = f"a lower --lr (now {self.cfg.lr})" + (" or --dtype fp32" if self.autocast is not None else "")
        raise MtpdError(f"loss became {loss} at step {self.step + 1}; training stopped and {kept}: train again "
                        f"with {fix}" + (" into a new --out (--resume keeps a run's settings)" if last else ""))

    # --- evaluation, logging, checkpoints -------------------------------------------------------------------
    def run_eval(self) -> dict:
        metrics = evaluate(self.model, self.val_windows, batch_size=self.cfg.batch_size, autocast_dtype=self.autocast)
        self._refresh_top_n()
        self.last_eval, self.last_eval_step = metrics, self.step
        self.log({"event": "eval", "step": self.step, "tokens": self.tokens_seen, **metrics, "top_n": self.top_n})
        return metrics

    @torch.no_grad()
    def _refresh_top_n(self) -> None:
        """Re-pick N so the teacher's top-N covers `top_mass` of its probability on average (docs/design.md §2).

        Only when the user did not set --top-n. Past half the vocabulary, gathering N logits costs more than
        the full softmax and changes the result by < 1 - top_mass of the mass, so the full vocabulary is used.
        With a draft vocabulary, mass and N are those of the teacher restricted to it, as in the KL.
        """
        if self.loss_cfg.top_n is not None or not self.loss_cfg.resolved_beta(self.model.num_heads):
            return
        window = self.val_windows[: self.cfg.batch_size].to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            # the whole model: under FSDP2 only its root gathers weights
            logits, _ = self.model(window[:, :-1], main_scores="draft")
        n = top_n_for_mass(logits, self.loss_cfg.top_mass)
        self.top_n = distributed.from_main(n if n <= logits.shape[-1] // 2 else None)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _trim_log(self) -> None:
        """metrics.jsonl as of the step training starts from: empty for a new run; for a resumed one, without
        the records an interrupted segment logged after the checkpoint it resumes from."""
        path = self.out_dir / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if self.step and _logged_step(line) <= self.step]
        with atomic_file(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "total_steps": self.total_steps, "budget": self.cfg.budget,
                "top_n": self.top_n, "last_eval": self.last_eval, "last_eval_step": self.last_eval_step,
                "parallelism": self.parallel.name, "optimizer": self.parallel.optimizer_state(self.optimizer),
                "batches": self.batches.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        self.top_n = state["top_n"]
        self.last_eval, self.last_eval_step = state.get("last_eval", {}), state.get("last_eval_step", -1)
        saved_with = state.get("parallelism", "replicated")
        if saved_with != self.parallel.name:
            flag = "with --fsdp" if saved_with == "fsdp" else "without --fsdp"
            raise MtpdError(f"the run in {self.out_dir} was trained {flag} and its optimizer state is laid out "
                            f"for that: resume it {flag}")
        self.parallel.load_optimizer_state(self.optimizer, state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        # RNG states are CPU byte tensors, whatever device the trainer state was loaded onto.
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(state["rng"]["python"])
        if state["rng"].get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        if state.get("budget", self.cfg.budget) == self.cfg.budget:
            self.total_steps = state["total_steps"]
        else:
            self._replan()

    def _replan(self) -> None:
        """A resumed run given a new budget: the cosine schedule is stretched (or shrunk) to the new end."""
        self.total_steps = self._planned_steps()
        if self.total_steps is not None and self.total_steps < self.step:
            raise MtpdError(f"the run is already at step {self.step} ({self.tokens_seen:,} tokens), past the new "
                            f"budget of {self.total_steps} steps: pass a larger --max-steps / --max-tokens")

    def resume(self) -> bool:
        """Continue from the run's latest checkpoint (weights, optimizer, data position, schedule)."""
        checkpoints = list_checkpoints(self.out_dir)
        if not checkpoints:
            return False
        _, path = checkpoints[-1]
        if not (path / STATE_FILE).is_file():
            raise MtpdError(f"checkpoint {path} has no {STATE_FILE}, so its training cannot be resumed: "
                            f"start a new run with another --out")
        self.parallel.load_weights(path, self.device)
        self.load_state_dict(_read_trainer_state(path, self.device))
        self.last_save_step = self.step
        return True

    def save(self) -> Path:
        """Rank 0 writes the checkpoint while the other ranks wait (under FSDP2 they first help gather it)."""
        path = checkpoint_dir(self.out_dir, self.step)
        model, state = self.parallel.model_to_save(), self.state_dict()
        if self.is_main:
            meta = {**self.meta, "loss": dataclasses.asdict(self.loss_cfg), "train": dataclasses.asdict(self.cfg),
                    "state": {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": round(self.elapsed, 1),
                              "top_n": self.top_n, **{f"eval_{k}": v for k, v in self.last_eval.items()}}}
            save_checkpoint(path, model, self.tokenizer, meta, state)
            prune_checkpoints(self.out_dir, self.cfg.keep_checkpoints)
        distributed.barrier()
        self.last_save_step = self.step
        return path

    # --- the loop -----------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train until the budget is reached; evaluate and checkpoint at the end. Returns the last evaluation."""
        self._trim_log()
        if self.step == 0:  # a resumed run keeps the random state restored from its checkpoint
            torch.manual_seed(self.cfg.seed)
            self._refresh_top_n()
            self.log({"event": "start", "config": dataclasses.asdict(self.cfg), "loss": dataclasses.asdict(self.loss_cfg),
                      "trainable_params": sum(p.numel() for p in self.params)})
        self.model.train()
        with tqdm(total=self.total_steps, initial=self.step, disable=not self.show_progress, unit="step",
                  dynamic_ncols=True, desc="train") as bar:
            self._loop(bar)
        self.total_steps = self.step  # where the run ended (a time budget ends it wherever the time ran out)
        if self.last_eval_step != self.step:
            self.run_eval()
        if self.last_save_step != self.step:
            self.save()
        return self.last_eval

    def _loop(self, bar: tqdm) -> None:
        first_step, recent = self.step, collections.deque(maxlen=RECENT_STEPS)
        while not self._budget_reached():
            started = time.perf_counter()
            stats = self.train_step()
            # Rank 0's clock is the run's clock: with a time budget every rank must stop at the same step.
            seconds = distributed.from_main(time.perf_counter() - started)
            self.elapsed += seconds
            if self.cfg.time_budget is not None and self.step - first_step > 1:  # not this process's warm-up
                recent.append(seconds)
                refit = (self.step - first_step - 1) % PROBE_STEPS == 0 or self.step >= (self.total_steps or 0)
                if len(recent) >= PROBE_STEPS and refit:
                    self.total_steps = self._estimate_total_steps(sum(recent) / len(recent))
                    bar.total = self.total_steps
            bar.update(1)
            bar.set_postfix(self._postfix(stats, seconds), refresh=False)
            if self.step % 10 == 0:
                self.log({"event": "train", "step": self.step, "tokens": self.tokens_seen,
                          "tok_per_s": self.tokens_per_step / seconds, **stats})
            if self.step % self.cfg.eval_every == 0:
                self.run_eval()
            if self.step % self.cfg.save_every == 0:
                self.save()

    def _postfix(self, stats: dict, seconds: float) -> dict:
        shown = {"loss": f"{stats['loss']:.3f}", **({"ce0": f"{stats['ce0']:.2f}"} if "ce0" in stats else {})}
        for k in range(1, self.model.num_heads + 1):
            if f"ce{k}" in stats:
                shown[f"h{k}"] = f"{stats[f'ce{k}']:.2f}/{stats[f'kl{k}']:.2f}"
        shown["tok/s"] = f"{self.tokens_per_step / seconds:.0f}"
        return shown


def _read_trainer_state(checkpoint: Path, device: torch.device) -> dict:
    try:
        return torch.load(checkpoint / STATE_FILE, map_location=device, weights_only=False)
    except Exception as exc:  # a truncated or overwritten file: torch and pickle raise many different types
        raise MtpdError(f"cannot read {checkpoint / STATE_FILE} ({type(exc).__name__}): the checkpoint is corrupt; "
                        f"{USE_AN_EARLIER_ONE}") from None


def _logged_step(line: str) -> float:
    """The step a metrics.jsonl record was logged at (0: the run's start; infinity: a torn line)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")
