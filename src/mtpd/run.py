"""End-to-end recipes the CLI calls: train a model from scratch, evaluate a checkpoint, generate text.

They join the pieces (corpus -> tokenizer -> token tensors -> model -> trainer -> checkpoint) and hold the
decisions that need more than one piece, like resuming a run from its own saved configuration.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from mtpd import distributed
from mtpd.checkpoint import (Checkpoint, build_model, checkpoint_dir, checkpoint_tokenizer, list_checkpoints,
                             load_checkpoint, read_config)
from mtpd.config import DRAFT_THRESHOLD, LossConfig, ModelConfig
from mtpd.data import (Corpus, encode_documents, load_corpus, load_or_train_tokenizer, token_cache_path,
                       tokenizer_fingerprint, validation_windows)
from mtpd.decode import ChainDrafter, autoregressive_generate, make_rule, speculative_generate
from mtpd.decode.lookup import LookupDrafter
from mtpd.decode.passes import graphs_compiled
from mtpd.decode.stream import TextStream
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_draft import StaticTree
from mtpd.errors import MtpdError
from mtpd.evaluate import evaluate
from mtpd.metrics import mean_accepted_tokens
from mtpd.model import MTPModel
from mtpd.model.draft_vocab import most_frequent_tokens, resolve_draft_vocab
from mtpd.model.packed import pack_for_decoding
from mtpd.parallel import NO_FSDP_FOR_HF, require_torchrun_for_fsdp
from mtpd.precision import cast_for_decoding, dtype_reason, resolve_dtype, weights_dtype
from mtpd.prompts import PromptSet, PromptStyle, checkpoint_formatter, file_prompts, user_turn
from mtpd.teacher_cache import MIN_FREE_BYTES
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
    """Joint pretraining of the main model and its heads (docs/design.md §3.1). Returns final eval metrics and the
    checkpoint path. With resume and a run in out_dir, that run continues (see resume_run).

    Under torchrun every process calls this (and extend, resume_run): each prepares the same data, then they
    train together in _fit, data-parallel (or sharded, with fsdp); rank 0 alone logs and writes."""
    out_dir, log = Path(out_dir), distributed.on_main_process(log)
    require_torchrun_for_fsdp(fsdp)
    if train_cfg.head_init != "random" or train_cfg.teacher_cache:
        raise MtpdError("--head-init and --teacher-cache apply to heads on a frozen pretrained model (--hf): joint "
                        "pretraining starts every head at random and trains the main model, so it has no fixed "
                        "teacher")
    if _continues_a_run(out_dir, resume, log):
        return resume_run(out_dir, train_cfg.budget, device, show_progress, log, fsdp=fsdp, data_path=data_path)
    dev = resolve_device(device)
    _check_windows(model_cfg, train_cfg)
    _check_writable(out_dir)
    data = tokenized_corpus(data_path, model_cfg.vocab_size, tokenizer_path)
    # The tokenizer decides the vocabulary (a small corpus can yield fewer tokens than asked for).
    vocab_size = data.tokenizer.get_vocab_size()
    if model_cfg.draft_vocab >= vocab_size:
        log(f"the tokenizer has {vocab_size:,} tokens, no more than --draft-vocab {model_cfg.draft_vocab:,}: the "
            f"heads score the whole vocabulary")
        model_cfg = dataclasses.replace(model_cfg, draft_vocab=0)
    model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab_size).validate()
    torch.manual_seed(train_cfg.seed)
    model = MTPModel(model_cfg)
    history = [{"event": "pretrain", "heads": model_cfg.mtp_heads, **_choose_draft_vocab(model, data, log)}]
    return _fit(model, data, data_path, train_cfg, loss_cfg, out_dir, history, dev, show_progress, log, fsdp=fsdp)


def train_heads(hf_path: str | Path | None, num_heads: int, train_cfg: TrainConfig, loss_cfg: LossConfig,
                out_dir: str | Path, data_path: str | None = None, resume: bool = False, device: str = "auto",
                max_seq_len: int | None = None, show_progress: bool = True, log=print,
                fsdp: bool = False, draft_vocab: int | None = None,
                independent_heads: bool = False) -> tuple[dict, Path]:
    """Head-only MTP-D on a frozen Hugging Face causal LM (docs/design.md §3.2): the model is the teacher, its own
    tokenizer encodes the corpus, and checkpoints hold only the heads plus a reference to the model.
    With resume and a run in out_dir, that run continues (`hf_path`, if given, is where its model is now).
    `draft_vocab`: how many of the most frequent training tokens the heads score (None: the default for the
    model's vocabulary size, model/draft_vocab.py). `independent_heads`: the parallel-heads baseline
    (docs/design.md §1.2) instead of the cascade. `train_cfg.head_init` says how the heads start."""
    from mtpd.model.backbone import load_backbone
    from mtpd.model.source import load_hf_tokenizer, load_tokenizer, resolve_source

    if fsdp:  # refused before the model loads and the corpus is tokenized
        raise MtpdError(NO_FSDP_FOR_HF)
    out_dir, log = Path(out_dir), distributed.on_main_process(log)
    if _continues_a_run(out_dir, resume, log):
        return resume_run(out_dir, train_cfg.budget, device, show_progress, log, backbone_path=hf_path, fsdp=fsdp,
                          data_path=data_path)
    if hf_path is None:
        raise MtpdError("no model to train heads on: pass --hf PATH (a Hugging Face model directory, a .gguf file "
                        "or `smollm2`)")
    dev = resolve_device(device)
    source = resolve_source(hf_path)
    backbone = load_backbone(source, dev, max_seq_len=max_seq_len)
    model_cfg = backbone.head_config(num_heads)
    model_cfg = dataclasses.replace(model_cfg, draft_vocab=resolve_draft_vocab(draft_vocab, model_cfg.vocab_size),
                                    independent_heads=independent_heads)
    _check_writable(out_dir)
    torch.manual_seed(train_cfg.seed)
    model = MTPModel(model_cfg, backbone)
    if train_cfg.head_init == "last-block":  # before the corpus is read: a backbone it cannot copy is refused
        model.init_heads_from_last_block()
    data = tokenized_corpus(data_path, tokenizer=load_tokenizer(source))
    if data.tokenizer.get_vocab_size() > model_cfg.vocab_size:
        raise MtpdError(f"the tokenizer of {source} has {data.tokenizer.get_vocab_size()} tokens but the model "
                        f"only {model_cfg.vocab_size} outputs: the directory mixes files of different models")
    history = [{"event": "heads", "heads": num_heads, **_choose_draft_vocab(model, data, log)}]
    style = PromptStyle.from_hf_tokenizer(load_hf_tokenizer(source))  # its chat template, for generate and bench
    return _fit(model, data, data_path, dataclasses.replace(train_cfg, freeze_main=True), loss_cfg, out_dir, history,
                dev, show_progress, log, fsdp=fsdp, prompt_style=style)


def extend(ckpt: str | Path, num_heads: int, out_dir: str | Path, budget: dict | None = None,
           fraction: float = 0.2, data_path: str | None = None, resume: bool = False, device: str = "auto",
           show_progress: bool = True, log=print, fsdp: bool = False) -> tuple[dict, Path]:
    """Looped extension (docs/design.md §3.3): heads 1..m of `ckpt` are copied into m+1..num_heads; the main model and
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
        budget = fraction_budget(history, fraction)
        if budget is None:
            raise MtpdError(f"{checkpoint.path} does not record how many tokens its model was trained on: "
                            f"pass a budget (--max-tokens, --max-steps or --time-budget)")
    train_cfg = dataclasses.replace(TrainConfig(**saved["train"]), **{name: budget.get(name) for name in BUDGET_FIELDS},
                                    freeze_main=True, frozen_heads=old_heads).validate()
    _check_writable(out_dir)
    history.append({"event": "extend", "from_heads": old_heads, "to_heads": num_heads,
                    "from_checkpoint": str(checkpoint.path), "budget": {k: v for k, v in budget.items() if v}})
    data_path = corpus_of(saved, data_path)
    data = tokenized_corpus(data_path, tokenizer=checkpoint.tokenizer)
    log(f"looped extension: {old_heads} -> {num_heads} heads; main model and heads 1..{old_heads} frozen")
    return _fit(model, data, data_path, train_cfg, LossConfig(**saved["loss"]), out_dir, history, dev,
                show_progress, log, fsdp=fsdp, prompt_style=PromptStyle.from_dict(saved.get("prompt_style")))


def fraction_budget(history: list[dict], fraction: float) -> dict | None:
    """The budget of a looped extension given none: `fraction` of the tokens its main model was pretrained on
    (the first event of the run's history); None when the history does not record them."""
    tokens = history[0].get("tokens") if history else None
    return {"max_steps": None, "max_tokens": max(1, round(fraction * tokens)), "time_budget": None} if tokens else None


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
                log, resume=True, fsdp=fsdp, prompt_style=PromptStyle.from_dict(saved.get("prompt_style")))


def _continues_a_run(out_dir: Path, resume: bool, log) -> bool:
    existing = list_checkpoints(out_dir)
    if existing and not resume:
        raise MtpdError(f"{out_dir} already holds checkpoints (latest step {existing[-1][0]}): pass --resume to "
                        f"continue that run, or choose another --out")
    if resume and not existing:
        log(f"nothing to resume in {out_dir} (no checkpoint yet): a new run starts there")
    return bool(existing)


def _choose_draft_vocab(model: MTPModel, data: TokenizedCorpus, log) -> dict:
    """A new run's draft vocabulary: the most frequent tokens of its training split (extension and resume keep
    the one in their checkpoint). Returns what the run's history records about it."""
    if model.draft_ids is None:
        return {}
    ids, coverage = most_frequent_tokens(data.train, model.cfg.vocab_size, model.cfg.draft_vocab)
    model.draft_vocab.assign(ids.to(model.draft_ids.device))
    log(f"draft vocabulary: the heads score the {len(ids):,} most frequent of {model.cfg.vocab_size:,} tokens, "
        f"{coverage:.1%} of the training tokens (the heads learn no other targets)")
    return {"draft_vocab": len(ids), "draft_coverage": round(coverage, 4)}


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
         resume: bool = False, fsdp: bool = False, prompt_style: PromptStyle = PromptStyle()) -> tuple[dict, Path]:
    """Train `model` with the one Trainer until the budget; returns the final evaluation and checkpoint path.
    Under torchrun this is where the processes join: they check that they prepared the same data, then train.
    `prompt_style`: how the model is prompted (prompts.py), recorded in every checkpoint."""
    _check_windows(model.cfg, train_cfg)
    with distributed.process_group(device):
        _check_same_data_on_every_process(data)
        # The trainer lives in a function of its own so that it, and the DDP wrapper holding the process
        # group, are gone before the group is torn down (see distributed.process_group).
        metrics, step = _train(model, data, data_path, train_cfg, loss_cfg, out_dir, history, device, show_progress,
                               log, resume, fsdp, prompt_style)
    return metrics, checkpoint_dir(out_dir, step)


def _train(model: MTPModel, data: TokenizedCorpus, data_path: str | None, train_cfg: TrainConfig, loss_cfg: LossConfig,
           out_dir: Path, history: list[dict], device: torch.device, show_progress: bool, log, resume: bool,
           fsdp: bool, prompt_style: PromptStyle) -> tuple[dict, int]:
    meta = {"data": data.reference(data_path), "history": history, "prompt_style": prompt_style.to_dict()}
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
    if trainer.autocast is not None:
        log(f"precision: {str(trainer.autocast).removeprefix('torch.')} autocast, trained weights in fp32"
            + (", the frozen main model held in bf16" if next(model.main.parameters()).dtype == torch.bfloat16 else ""))
    cache = trainer.teacher_cache
    if cache is not None:
        log(f"teacher cache: {cache.directory} (the frozen model's hidden states of each window, read when it comes "
            f"again; --no-teacher-cache: off)")
    metrics = trainer.fit()
    if cache is not None:
        full = (f" ({cache.unstored:,} not stored: less than {MIN_FREE_BYTES >> 30} GiB free on its disk; $MTPD_CACHE "
                f"moves it)") if cache.unstored else ""
        log(f"teacher cache: {cache.hits:,} windows read, {cache.misses:,} computed{full}")
    return metrics, trainer.step


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
    """Refuse an --out that cannot be written before any work, without creating it: the trainer makes the
    directory when it first writes there, so a run that fails before (a bad corpus or tokenizer, Ctrl-C while
    loading) leaves no empty directory behind. The probe goes to the deepest directory that exists already."""
    existing = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path("."))
    try:
        probe = existing / f".write-test-{os.getpid()}"  # one per process: ranks probe the same directory
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


def load_for_decoding(ckpt: str | Path, device: str = "auto", hf: str | None = None,
                      dtype: str = "fp32") -> tuple[Checkpoint, str]:
    """Load a checkpoint with its model cast to the dtype `--dtype` names (precision.py); returns it and why
    that dtype (for reports). The dtype is resolved first, so a bad name is refused before the load."""
    dev = resolve_device(device)
    chosen, reason = resolve_dtype(dtype, dev), dtype_reason(dtype, dev)
    checkpoint = load_checkpoint(ckpt, dev, hf)
    cast_for_decoding(checkpoint.model, chosen)
    pack_for_decoding(checkpoint.model)
    return checkpoint, reason


def evaluate_checkpoint(ckpt: str | Path, data_path: str | None = None, seq_len: int | None = None,
                        windows: int = 64, device: str = "auto", hf: str | None = None,
                        dtype: str = "fp32") -> tuple[dict, Checkpoint]:
    """Validation metrics of a checkpoint on its own corpus's validation split (or on --data), with the model
    in `dtype` (`load_for_decoding`). `hf`: where the backbone of a head-only checkpoint is now, if it moved."""
    if windows < 1:
        raise MtpdError(f"--windows must be >= 1 (got {windows})")
    if seq_len is not None and seq_len < 2:
        raise MtpdError(f"--seq-len must be >= 2 (got {seq_len})")
    checkpoint, reason = load_for_decoding(ckpt, device, hf, dtype)
    context = checkpoint.model.cfg.max_seq_len
    if seq_len is not None and seq_len > context:
        raise MtpdError(f"--seq-len {seq_len} exceeds the model's context {context}: pass --seq-len <= {context}")
    data = tokenized_corpus(corpus_of(checkpoint.config, data_path), tokenizer=checkpoint.tokenizer, splits=("val",))
    seq_len = min(seq_len or checkpoint.config.get("train", {}).get("seq_len") or context, context)
    metrics = evaluate(checkpoint.model, validation_windows(data.val, seq_len, windows))
    metrics |= {"checkpoint": str(checkpoint.path), "data": data.corpus.name, "seq_len": seq_len,
                "heads": checkpoint.model.num_heads,
                "dtype": weights_dtype(checkpoint.model), "dtype_reason": reason}
    return metrics, checkpoint


def benchmark_prompts(checkpoint: Checkpoint, prompts_file: str | None = None, num_prompts: int = 8,
                      prompt_tokens: int = 64, offset: float = 0.0, data_path: str | None = None,
                      chat_template: bool = True) -> PromptSet:
    """Prompts from a file (prompts.file_prompts: one per line, or a question file's questions, through the
    checkpoint's chat template unless `chat_template` is False), or evenly spaced slices of the checkpoint's
    validation split (`offset` 0.5: the slices midway between those, held out for calibration)."""
    from mtpd.bench import validation_prompts

    if prompts_file is not None:
        return file_prompts(prompts_file, checkpoint_formatter(checkpoint), chat_template)
    data = tokenized_corpus(corpus_of(checkpoint.config, data_path), tokenizer=checkpoint.tokenizer, splits=("val",))
    return PromptSet(validation_prompts(data.val, num_prompts, prompt_tokens, offset))


# A warm-up decode this long typically runs every kind of pass a decode of one prompt makes (prefill, steps
# of one token and of more); any the decode still compiles is counted in its statistics.
COMPILE_WARM_UP_TOKENS = 8


def generate_text(checkpoint: Checkpoint, prompt: str, max_new_tokens: int = 200, heads: int | None = None,
                  speculative: bool = True, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, draft_threshold: float = DRAFT_THRESHOLD,
                  tree_shape: str | None = None, emit: Callable[[str], None] = print, chat: bool = False,
                  compile: bool = False, lookup_tokens: int | None = None) -> dict:
    """Continue `prompt`, streaming text through `emit` as tokens are accepted; stops at the checkpoint's stop
    tokens (prompts.PromptStyle: end-of-text, and an instruct model's end of turn). `chat`: ask `prompt` as one
    user turn through the chat template. `tree_shape`: draft this static tree (rank paths, decode/tree.py)
    instead of one chain. `lookup_tokens`: draft up to this many tokens from the context where its last tokens
    occurred before, the chain elsewhere (decode/lookup.py). `compile`: with the model's blocks compiled (decode/passes.py), after a short
    warm-up decode of the same prompt that compiles what the decode needs, timed apart.

    Returns statistics: new tokens, seconds, tokens/s and, when speculative, the mean accepted tokens; with
    `compile`, the warm-up's seconds and graphs (`compile_seconds`, `compiled_graphs`) and the graphs the
    decode itself still compiled (`graphs_compiled_while_timed`).
    """
    model, tokenizer, formatter = checkpoint.model, checkpoint.tokenizer, checkpoint_formatter(checkpoint)
    if not prompt:
        raise MtpdError("the prompt is empty: pass some text with --prompt")
    prompt_ids = formatter.chat([user_turn(prompt)]) if chat else formatter.plain(prompt)
    if heads is not None and not 1 <= heads <= model.num_heads:
        raise MtpdError(f"--heads {heads} is not available: the checkpoint has {model.num_heads} heads")
    if not 0 <= draft_threshold < 1:
        raise MtpdError(f"--draft-threshold must be in [0, 1) (got {draft_threshold})")
    rule = make_rule(temperature, top_k, top_p)
    drafter = ChainDrafter(draft_threshold)
    if tree_shape is not None and lookup_tokens is not None:
        raise MtpdError("--lookup drafts behind the heads' chain, not a tree: leave out --tree-shape or --lookup")
    if tree_shape is not None and speculative:
        drafter = StaticTree(TreeShape.parse(tree_shape))  # speculative_generate refuses one it cannot draft
    if lookup_tokens is not None:
        drafter = LookupDrafter(drafter, lookup_tokens)
    device = next(model.parameters()).device

    def decode(new_tokens: int, on_tokens=None):
        generator = torch.Generator(device=device).manual_seed(seed)  # the warm-up leaves the decode's draws alone
        if speculative:
            return speculative_generate(model, [prompt_ids], new_tokens, rule, heads, generator=generator,
                                        on_tokens=on_tokens, drafter=drafter, stop_ids=formatter.stop_ids,
                                        compile=compile)
        return autoregressive_generate(model.main, [prompt_ids], new_tokens, rule, generator=generator,
                                       on_tokens=on_tokens, stop_ids=formatter.stop_ids, compile=compile)

    stats = {}
    if compile:
        started, graphs = time.perf_counter(), graphs_compiled()
        decode(min(max_new_tokens, COMPILE_WARM_UP_TOKENS))
        stats = {"compile_seconds": time.perf_counter() - started, "compiled_graphs": graphs_compiled() - graphs}
    on_tokens = _AnswerStream(TextStream(tokenizer), formatter.stop_ids, emit)
    started, graphs = time.perf_counter(), graphs_compiled() if compile else 0
    result = decode(max_new_tokens, on_tokens)
    seconds = time.perf_counter() - started
    on_tokens.flush()
    if compile:
        stats["graphs_compiled_while_timed"] = graphs_compiled() - graphs
    stats |= {"prompt_tokens": len(prompt_ids), "new_tokens": result.num_tokens, "seconds": seconds,
              "tokens_per_s": result.num_tokens / seconds,
              "dtype": weights_dtype(model)}
    if speculative:
        stats["mean_accepted_tokens"] = mean_accepted_tokens(result.accepted)
    return stats


class _AnswerStream:
    """`on_tokens` for one row: emits the text of its tokens up to its first stop token. The stop token, and
    whatever a speculative step accepted after it, are not part of the answer and are not shown."""

    def __init__(self, stream: TextStream, stop_ids: frozenset[int], emit: Callable[[str], None]):
        self.stream, self.stop_ids, self.emit, self.stopped = stream, stop_ids, emit, False

    def __call__(self, rows: list[list[int]]) -> None:
        if self.stopped:
            return
        tokens = rows[0]
        cut = next((i for i, token in enumerate(tokens) if token in self.stop_ids), None)
        if cut is not None:
            tokens, self.stopped = tokens[:cut], True
        self.emit(self.stream.push(tokens))

    def flush(self) -> None:
        self.emit(self.stream.flush())
