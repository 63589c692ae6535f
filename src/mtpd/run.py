"""End-to-end recipes the CLI calls: train a model from scratch, evaluate a checkpoint, generate text.

They join the pieces (corpus -> tokenizer -> token tensors -> model -> trainer -> checkpoint) and hold the
decisions that need more than one piece, like resuming a run from its own saved configuration.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

import time
from collections.abc import Callable

from mtpd import distributed
from mtpd.checkpoint import (Checkpoint, build_model, checkpoint_dir, checkpoint_tokenizer, list_checkpoints,
                             load_checkpoint, read_config)
from mtpd.config import DRAFT_THRESHOLD, LossConfig, ModelConfig
from mtpd.data import (Corpus, encode_documents, eos_id, load_corpus, load_or_train_tokenizer, token_cache_path,
                       tokenizer_fingerprint, validation_windows)
from mtpd.decode import autoregressive_generate, make_rule, speculative_generate
from mtpd.decode.stream import TextStream
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_draft import StaticTree
from mtpd.errors import MtpdError
from mtpd.evaluate import evaluate
from mtpd.metrics import mean_accepted_tokens
from mtpd.model import MTPModel
from mtpd.parallel import NO_FSDP_FOR_HF, require_torchrun_for_fsdp
from mtpd.train import BUDGET_FIELDS, Trainer, TrainConfig


@dataclass
class TokenizedCorpus:
    corpus: Corpus
    tokenizer: Tokenizer
    train: torch.Tensor
    val: torch.Tensor

    def reference(self, data_path: str | None) -> dict:
        """What config.json records so eval and resume can find the same data again."""
        return {"path": None if data_path is None else str(Path(data_path).resolve()), "name": self.corpus.name,
                "fingerprint": self.corpus.fingerprint, "train_tokens": int(self.train.numel()),
                "val_tokens": int(self.val.numel())}


def tokenized_corpus(data_path: str | None, vocab_size: int | None = None, tokenizer_path: str | None = None,
                     tokenizer: Tokenizer | None = None, splits: tuple[str, ...] = ("train", "val")) -> TokenizedCorpus:
    corpus = load_corpus(data_path)
    if tokenizer is None:
        tokenizer = load_or_train_tokenizer(corpus, vocab_size, tokenizer_path)
    tensors = {split: encode_documents(tokenizer, getattr(corpus, split), token_cache_path(corpus, tokenizer, split))
               if split in splits else torch.empty(0, dtype=torch.int32) for split in ("train", "val")}
    return TokenizedCorpus(corpus, tokenizer, tensors["train"], tensors["val"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MtpdError("--device cuda was requested but no CUDA device is available: use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise MtpdError(f"unknown device '{name}': use cpu, cuda or auto")
    return distributed.this_process_device(torch.device(name))


def pretrain(model_cfg: ModelConfig, train_cfg: TrainConfig, loss_cfg: LossConfig, out_dir: str | Path,
             data_path: str | None = None, tokenizer_path: str | None = None, resume: bool = False,
             device: str = "auto", show_progress: bool = True, log=print, fsdp: bool = False) -> tuple[dict, Path]:
    """Joint pretraining of the main model and its heads (DESIGN §3.1). Returns final eval metrics and the
    checkpoint path. With resume and a run in out_dir, that run continues (see resume_run).

    Under torchrun every process calls this (and extend, resume_run): each prepares the same data, then they
    train together in _fit, data-parallel (or sharded, with fsdp); rank 0 alone logs and writes."""
    out_dir, log = Path(out_dir), distributed.on_main_process(log)
    require_torchrun_for_fsdp(fsdp)
    if _continues_a_run(out_dir, resume, log):
        return resume_run(out_dir, train_cfg.budget, device, show_progress, log, fsdp=fsdp, data_path=data_path)
    dev = resolve_device(device)
    _check_windows(model_cfg, train_cfg)
    _check_writable(out_dir)
    data = tokenized_corpus(data_path, model_cfg.vocab_size, tokenizer_path)
    # The tokenizer decides the vocabulary (a small corpus can yield fewer tokens than asked for).
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data.tokenizer.get_vocab_size()).validate()
    torch.manual_seed(train_cfg.seed)
    model = MTPModel(model_cfg)
    history = [{"event": "pretrain", "heads": model_cfg.mtp_heads}]
    return _fit(model, data, data_path, train_cfg, loss_cfg, out_dir, history, dev, show_progress, log, fsdp=fsdp)


def train_heads(hf_path: str | Path | None, num_heads: int, train_cfg: TrainConfig, loss_cfg: LossConfig,
                out_dir: str | Path, data_path: str | None = None, resume: bool = False, device: str = "auto",
                max_seq_len: int | None = None, show_progress: bool = True, log=print,
                fsdp: bool = False) -> tuple[dict, Path]:
    """Head-only MTP-D on a frozen Hugging Face causal LM (DESIGN §3.2): the model is the teacher, its own
    tokenizer encodes the corpus, and checkpoints hold only the heads plus a reference to the model.
    With resume and a run in out_dir, that run continues (`hf_path`, if given, is where its model is now)."""
    from mtpd.model.hf import head_config, load_hf_backbone

    if fsdp:  # refused before the model loads and the corpus is tokenized
        raise MtpdError(NO_FSDP_FOR_HF)
    out_dir, log = Path(out_dir), distributed.on_main_process(log)
    if _continues_a_run(out_dir, resume, log):
        return resume_run(out_dir, train_cfg.budget, device, show_progress, log, backbone_path=hf_path, fsdp=fsdp,
                          data_path=data_path)
    if hf_path is None:
        raise MtpdError("no model to train heads on: pass --hf PATH (a local Hugging Face model directory)")
    dev = resolve_device(device)
    backbone = load_hf_backbone(hf_path, dev, max_seq_len=max_seq_len)
    model_cfg = head_config(backbone, num_heads)
    _check_writable(out_dir)
    data = tokenized_corpus(data_path, tokenizer_path=str(hf_path))
    if data.tokenizer.get_vocab_size() > model_cfg.vocab_size:
        raise MtpdError(f"the tokenizer of {hf_path} has {data.tokenizer.get_vocab_size()} tokens but the model "
                        f"only {model_cfg.vocab_size} outputs: the directory mixes files of different models")
    torch.manual_seed(train_cfg.seed)
    model = MTPModel(model_cfg, backbone)
    history = [{"event": "heads", "heads": num_heads}]
    return _fit(model, data, data_path, dataclasses.replace(train_cfg, freeze_main=True), loss_cfg, out_dir, history,
                dev, show_progress, log, fsdp=fsdp)


def extend(ckpt: str | Path, num_heads: int, out_dir: str | Path, budget: dict | None = None,
           fraction: float = 0.2, data_path: str | None = None, resume: bool = False, device: str = "auto",
           show_progress: bool = True, log=print, fsdp: bool = False) -> tuple[dict, Path]:
    """Looped extension (DESIGN §3.3): heads 1..m of `ckpt` are copied into m+1..num_heads; the main model and
    heads 1..m are frozen and only the new heads train, with the checkpoint's objective and optimiser settings.

    The budget defaults to `fraction` of the tokens the main model was pretrained on (the paper used 70B of
    350B). With resume and a run in out_dir, that run continues.
    """
    out_dir, log = Path(out_dir), distributed.on_main_process(log)
    require_torchrun_for_fsdp(fsdp)
    if _continues_a_run(out_dir, resume, log):
        heads = read_config(list_checkpoints(out_dir)[-1][1]).get("model", {}).get("mtp_heads")
        if heads != num_heads:
            raise MtpdError(f"the extension in {out_dir} grows to {heads} heads, not --to {num_heads}: resume it with "
                            f"--to {heads}, or choose another --out")
        return resume_run(out_dir, budget or {}, device, show_progress, log, fsdp=fsdp, data_path=data_path)
    if not 0 < fraction <= 1:
        raise MtpdError(f"--fraction must be in (0, 1] (got {fraction})")
    dev = resolve_device(device)
    checkpoint = load_checkpoint(ckpt, dev)
    model, saved = checkpoint.model, checkpoint.config
    old_heads = model.num_heads
    model.extend_heads(num_heads)
    history = [dict(event) for event in saved.get("history", [{"event": "pretrain", "heads": old_heads}])]
    history[-1].setdefault("tokens", saved.get("state", {}).get("tokens_seen"))  # the extended stage's own tokens
    if not any(v is not None for v in (budget or {}).values()):
        if not history[0]["tokens"]:
            raise MtpdError(f"{checkpoint.path} does not record how many tokens its model was trained on: "
                            f"pass a budget (--max-tokens, --max-steps or --time-budget)")
        budget = {"max_tokens": max(1, round(fraction * history[0]["tokens"]))}
    train_cfg = dataclasses.replace(TrainConfig(**saved["train"]), **{name: budget.get(name) for name in BUDGET_FIELDS},
                                    freeze_main=True, frozen_heads=old_heads).validate()
    _check_writable(out_dir)
    history.append({"event": "extend", "from_heads": old_heads, "to_heads": num_heads,
                    "from_checkpoint": str(checkpoint.path), "budget": {k: v for k, v in budget.items() if v}})
    data_path = corpus_of(saved, data_path)
    data = tokenized_corpus(data_path, tokenizer=checkpoint.tokenizer)
    log(f"looped extension: {old_heads} -> {num_heads} heads; main model and heads 1..{old_heads} frozen")
    return _fit(model, data, data_path, train_cfg, LossConfig(**saved["loss"]), out_dir, history, dev,
                show_progress, log, fsdp=fsdp)


def resume_run(out_dir: Path, budget: dict, device: str = "auto", show_progress: bool = True,
               log=print, backbone_path: str | Path | None = None, fsdp: bool = False,
               data_path: str | None = None) -> tuple[dict, Path]:
    """Continue the run in out_dir from its latest checkpoint with the run's saved configuration (model, data,
    objective, frozen parts); a budget given now replaces the saved one (see resumed_train_config). Heads on a
    Hugging Face model find it at its recorded path, or at `backbone_path`; the corpus, at its recorded path
    or at `data_path`, where it must hold the same documents."""
    log = distributed.on_main_process(log)
    path = list_checkpoints(out_dir)[-1][1]
    saved = read_config(path)
    try:
        train_cfg = resumed_train_config(saved["train"], budget)
        data_path, fingerprint = corpus_of(saved, data_path), saved["data"].get("fingerprint")
        model_cfg, loss_cfg = ModelConfig.from_dict(saved["model"]), LossConfig(**saved["loss"]).validate()
    except (KeyError, TypeError) as exc:
        raise MtpdError(f"{path / 'config.json'} lacks or garbles {exc}: it was not written by mtpd's trainer, so "
                        f"the run cannot be resumed; start a new run with another --out") from None
    data = tokenized_corpus(data_path, tokenizer=checkpoint_tokenizer(path, model_cfg))
    if fingerprint and data.corpus.fingerprint != fingerprint:  # the data order and position would not be this run's
        raise MtpdError(f"the corpus at {data_path or 'the standard library'} is not the one this run trained on "
                        f"(fingerprint {data.corpus.fingerprint}, the run's {fingerprint}): pass --data with that corpus")
    dev = resolve_device(device)
    model = build_model(saved, path, dev, backbone_path)
    return _fit(model, data, data_path, train_cfg, loss_cfg, out_dir, saved.get("history", []), dev, show_progress,
                log, resume=True, fsdp=fsdp)


def _continues_a_run(out_dir: Path, resume: bool, log) -> bool:
    existing = list_checkpoints(out_dir)
    if existing and not resume:
        raise MtpdError(f"{out_dir} already holds checkpoints (latest step {existing[-1][0]}): pass --resume to "
                        f"continue that run, or choose another --out")
    if resume and not existing:
        log(f"nothing to resume in {out_dir} (no checkpoint yet): a new run starts there")
    return bool(existing)


def _check_windows(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """Training windows must fit the context and give every head a target."""
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise MtpdError(f"--seq-len {train_cfg.seq_len} exceeds the model's context {model_cfg.max_seq_len}: "
                        f"lower --seq-len or raise --max-seq-len")
    if model_cfg.mtp_heads >= train_cfg.seq_len:  # head K predicts t_{i+K+1}: K <= seq_len - 1
        raise MtpdError(f"{model_cfg.mtp_heads} heads need windows longer than --seq-len {train_cfg.seq_len} (head K "
                        f"predicts the token K+1 ahead): use fewer heads or a longer --seq-len")


def _fit(model: MTPModel, data: TokenizedCorpus, data_path: str | None, train_cfg: TrainConfig, loss_cfg: LossConfig,
         out_dir: Path, history: list[dict], device: torch.device, show_progress: bool, log,
         resume: bool = False, fsdp: bool = False) -> tuple[dict, Path]:
    """Train `model` with the one Trainer until the budget; returns the final evaluation and checkpoint path.
    Under torchrun this is where the processes join: they check that they prepared the same data, then train."""
    _check_windows(model.cfg, train_cfg)
    with distributed.process_group(device):
        _check_same_data_on_every_process(data)
        # The trainer lives in a function of its own so that it, and the DDP wrapper holding the process
        # group, are gone before the group is torn down (see distributed.process_group).
        metrics, step = _train(model, data, data_path, train_cfg, loss_cfg, out_dir, history, device, show_progress,
                               log, resume, fsdp)
    return metrics, checkpoint_dir(out_dir, step)


def _train(model: MTPModel, data: TokenizedCorpus, data_path: str | None, train_cfg: TrainConfig, loss_cfg: LossConfig,
           out_dir: Path, history: list[dict], device: torch.device, show_progress: bool, log, resume: bool,
           fsdp: bool) -> tuple[dict, int]:
    meta = {"data": data.reference(data_path), "history": history}
    trainer = Trainer(model, data.tokenizer, data.train, data.val, train_cfg, loss_cfg, out_dir, meta, device,
                      show_progress, fsdp)
    if resume and trainer.resume():
        budget = ", ".join(f"{k} {v}" for k, v in train_cfg.budget.items() if v is not None)
        log(f"resuming {out_dir} at step {trainer.step} ({trainer.tokens_seen:,} tokens seen) with its saved "
            f"configuration; budget: {budget}")
    trainable = sum(p.numel() for p in trainer.params)
    frozen = " (frozen)" if train_cfg.freeze_main else ""
    log(f"model: {sum(p.numel() for p in model.main.parameters()) / 1e6:.2f}M main{frozen} + "
        f"{sum(p.numel() for p in model.heads.parameters()) / 1e6:.2f}M in {model.num_heads} heads "
        f"({trainable / 1e6:.2f}M trained); data: {data.corpus.name}, {data.train.numel():,} train / "
        f"{data.val.numel():,} val tokens; device {device}{_launch_note(train_cfg, fsdp)}")
    return trainer.fit(), trainer.step


def _check_same_data_on_every_process(data: TokenizedCorpus) -> None:
    """Each process read and tokenized the data itself; training on different data (another --data path on
    one node, a different tokenizer cache) would silently mix runs, so compare with rank 0 first."""
    mine = (data.corpus.fingerprint, tokenizer_fingerprint(data.tokenizer),
            data.train.numel(), data.val.numel())
    main = distributed.from_main(mine)
    if mine != main:
        raise MtpdError(f"process {distributed.rank()} prepared other data than process 0 (corpus fingerprint, "
                        f"tokenizer hash, train and val tokens: {mine} vs {main}): give every node the same --data "
                        f"and tokenizer")


def _launch_note(train_cfg: TrainConfig, fsdp: bool) -> str:
    world = distributed.world_size()
    if world == 1:
        return ""
    return (f"; {world} processes ({'FSDP2' if fsdp else 'DDP'}), global batch {world} x {train_cfg.batch_size} = "
            f"{world * train_cfg.batch_size} sequences")


def resumed_train_config(saved: dict, budget: dict) -> TrainConfig:
    """The saved run's training configuration, with the budget replaced when `budget` sets one.

    Budgets are totals for the run, so `mtpd train --out X --resume --max-steps 40` continues to step 40.
    A new budget replaces the whole saved one: a saved --max-tokens must not stop a run extended by steps.
    Everything else (shapes, data, optimizer, objective) must stay as the checkpoint has it.
    """
    cfg = TrainConfig(**saved)
    if any(v is not None for v in budget.values()):
        cfg = dataclasses.replace(cfg, **{name: budget.get(name) for name in BUDGET_FIELDS})
    return cfg.validate()


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"  # one per process: ranks probe the same directory
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise MtpdError(f"cannot write to output directory {out_dir} ({exc.strerror}): choose another --out") from None


def corpus_of(config: dict, data_path: str | None = None) -> str | None:
    """The corpus to read for a checkpoint: `data_path` (--data) when given, else the one it was trained on
    (None: the standard library), which must still be where it was."""
    if data_path is not None:
        return data_path
    recorded = config.get("data", {}).get("path")
    if recorded is not None and not Path(recorded).exists():
        raise MtpdError(f"the corpus this checkpoint was trained on, {recorded}, is not there any more: pass --data "
                        f"with where it is now")
    return recorded


def evaluate_checkpoint(ckpt: str | Path, data_path: str | None = None, seq_len: int | None = None,
                        windows: int = 64, device: str = "auto", hf: str | None = None) -> tuple[dict, Checkpoint]:
    """Validation metrics of a checkpoint on its own corpus's validation split (or on --data). `hf`: where
    the backbone of a head-only checkpoint is now, if it moved."""
    if windows < 1:
        raise MtpdError(f"--windows must be >= 1 (got {windows})")
    if seq_len is not None and seq_len < 2:
        raise MtpdError(f"--seq-len must be >= 2 (got {seq_len})")
    checkpoint = load_checkpoint(ckpt, resolve_device(device), hf)
    context = checkpoint.model.cfg.max_seq_len
    if seq_len is not None and seq_len > context:
        raise MtpdError(f"--seq-len {seq_len} exceeds the model's context {context}: pass --seq-len <= {context}")
    data = tokenized_corpus(corpus_of(checkpoint.config, data_path), tokenizer=checkpoint.tokenizer, splits=("val",))
    seq_len = min(seq_len or checkpoint.config.get("train", {}).get("seq_len") or context, context)
    metrics = evaluate(checkpoint.model, validation_windows(data.val, seq_len, windows))
    metrics |= {"checkpoint": str(checkpoint.path), "data": data.corpus.name, "seq_len": seq_len,
                "heads": checkpoint.model.num_heads}
    return metrics, checkpoint


def benchmark_prompts(checkpoint: Checkpoint, prompts_file: str | None = None, num_prompts: int = 8,
                      prompt_tokens: int = 64, offset: float = 0.0, data_path: str | None = None) -> list[list[int]]:
    """Prompts from a file (one per line), or evenly spaced slices of the checkpoint's validation split
    (`offset` 0.5: the slices midway between those, held out for calibration)."""
    from mtpd.bench import file_prompts, validation_prompts

    if prompts_file is not None:
        return file_prompts(prompts_file, checkpoint.tokenizer)
    data = tokenized_corpus(corpus_of(checkpoint.config, data_path), tokenizer=checkpoint.tokenizer, splits=("val",))
    return validation_prompts(data.val, num_prompts, prompt_tokens, offset)


def generate_text(checkpoint: Checkpoint, prompt: str, max_new_tokens: int = 200, heads: int | None = None,
                  speculative: bool = True, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, draft_threshold: float = DRAFT_THRESHOLD,
                  tree_shape: str | None = None, emit: Callable[[str], None] = print) -> dict:
    """Continue `prompt`, streaming text through `emit` as tokens are accepted; stops at EOS. `tree_shape`:
    draft this static tree (rank paths, decode/tree.py) instead of one chain.

    Returns statistics: new tokens, seconds, tokens/s and, when speculative, the mean accepted tokens.
    """
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not prompt_ids:
        raise MtpdError("the prompt is empty: pass some text with --prompt")
    if heads is not None and not 1 <= heads <= model.num_heads:
        raise MtpdError(f"--heads {heads} is not available: the checkpoint has {model.num_heads} heads")
    if not 0 <= draft_threshold < 1:
        raise MtpdError(f"--draft-threshold must be in [0, 1) (got {draft_threshold})")
    rule = make_rule(temperature, top_k, top_p)
    tree = None
    if tree_shape is not None and speculative:
        tree = StaticTree(TreeShape.parse(tree_shape))  # speculative_generate refuses one it cannot draft
    stream = TextStream(tokenizer)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    on_tokens = lambda rows: emit(stream.push(rows[0]))  # noqa: E731 (one row)
    started = time.perf_counter()
    if speculative:
        result = speculative_generate(model, [prompt_ids], max_new_tokens, rule, heads, eos_id(tokenizer),
                                      generator, on_tokens, draft_threshold, tree)
    else:
        result = autoregressive_generate(model.main, [prompt_ids], max_new_tokens, rule, eos_id(tokenizer),
                                         generator=generator, on_tokens=on_tokens)
    seconds = time.perf_counter() - started
    emit(stream.flush())
    stats = {"prompt_tokens": len(prompt_ids), "new_tokens": result.num_tokens, "seconds": seconds,
             "tokens_per_s": result.num_tokens / seconds}
    if speculative:
        stats["mean_accepted_tokens"] = mean_accepted_tokens(result.accepted)
    return stats
