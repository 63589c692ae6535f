"""Checkpoints (DESIGN §7): a directory with config.json, model.safetensors, tokenizer.json and the trainer's
resume state, written to a temporary directory and renamed into place, so a crash never leaves a partial
checkpoint where a complete one is expected.

A run directory holds `checkpoints/step-NNNNNNNN/` entries; its latest complete one is what `--ckpt RUN_DIR`
and `--resume` use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from mtpd.config import ModelConfig
from mtpd.errors import MtpdError
from mtpd.model import MTPModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.pt"
FORMAT = "mtpd-checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
USE_AN_EARLIER_ONE = ("use an earlier checkpoint of the run (--resume takes the latest one: move the corrupt one out "
                      "of checkpoints/)")


@dataclass
class Checkpoint:
    path: Path
    model: MTPModel
    tokenizer: Tokenizer
    config: dict  # the whole config.json: "model", "loss", "train", "data", "history", ...


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(path: Path, model: MTPModel, tokenizer: Tokenizer, meta: dict,
                    trainer_state: dict | None = None) -> Path:
    """Write a checkpoint atomically: everything goes to `<path>.tmp`, which is then renamed to `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_files(tmp, model, tokenizer, meta, trainer_state)
    except BaseException:  # a full disk or Ctrl-C: leave no half-written directory behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():  # replacing a checkpoint of the same step (rare): swap, then delete the old one
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def _write_files(directory: Path, model: MTPModel, tokenizer: Tokenizer, meta: dict,
                 trainer_state: dict | None) -> None:
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.cfg.to_dict(), **meta}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_model(model, str(directory / WEIGHTS_FILE))
    tokenizer.save(str(directory / TOKENIZER_FILE))
    if trainer_state is not None:
        torch.save(trainer_state, directory / STATE_FILE)
    _fsync_dir(directory)


def _fsync_dir(path: Path) -> None:
    for file in [*path.iterdir(), path] if path.is_dir() else []:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary directories are never listed)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for entry in root.iterdir() if root.is_dir() else []:
        match = _STEP_DIR.match(entry.name)
        if match and (entry / CONFIG_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for _, path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise MtpdError(f"checkpoint '{path}' does not exist: pass a run directory (--out of mtpd train) "
                        f"or one of its checkpoints/step-N directories")
    if (path / CONFIG_FILE).is_file():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise MtpdError(f"'{path}' holds no checkpoint (no config.json, no checkpoints/step-N/): "
                        f"train one with `mtpd train --out {path}`")
    return checkpoints[-1][1]


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MtpdError(f"cannot read {path / CONFIG_FILE} ({exc}): the checkpoint is corrupt; {USE_AN_EARLIER_ONE}"
                        ) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise MtpdError(f"{path / CONFIG_FILE} is not an mtpd checkpoint config (no \"format\": \"{FORMAT}\"): "
                        f"pass a run directory or checkpoint written by `mtpd train`")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise MtpdError(f"checkpoint {path} has format version {config['format_version']}, newer than this "
                        f"mtpd understands ({FORMAT_VERSION}): upgrade mtpd")
    if not isinstance(config.get("model"), dict):
        raise MtpdError(f"{path / CONFIG_FILE} has no \"model\" section: the checkpoint is corrupt; {USE_AN_EARLIER_ONE}")
    return config


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate a checkpoint: config, tensor names and shapes, and vocabulary must agree."""
    path = resolve_checkpoint(path)
    config = read_config(path)
    for name in (WEIGHTS_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise MtpdError(f"checkpoint {path} has no {name}: it is incomplete; use an earlier checkpoint")
    model_cfg = ModelConfig.from_dict(config["model"])
    with torch.device(device):
        model = MTPModel(model_cfg)
    check_weights_match(model, path / WEIGHTS_FILE)
    load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(device))
    return Checkpoint(path, model.eval(), checkpoint_tokenizer(path, model_cfg), config)


def checkpoint_tokenizer(path: Path, model_cfg: ModelConfig) -> Tokenizer:
    """The checkpoint's tokenizer, checked against the model's vocabulary."""
    try:
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MtpdError(f"cannot read {path / TOKENIZER_FILE} ({reason}): the checkpoint is corrupt; "
                        f"{USE_AN_EARLIER_ONE}") from None
    if tokenizer.get_vocab_size() > model_cfg.vocab_size:
        raise MtpdError(f"vocabulary mismatch in {path}: tokenizer.json has {tokenizer.get_vocab_size()} tokens "
                        f"but the model's vocab_size is {model_cfg.vocab_size}; the files come from different runs")
    return tokenizer


def check_weights_match(model: torch.nn.Module, weights: Path) -> None:
    """Compare tensor names and shapes in a safetensors file with a model; name the first disagreement."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MtpdError(f"cannot read {weights} ({reason}): the checkpoint is corrupt; {USE_AN_EARLIER_ONE}") from None
    for name, shape in stored.items():
        if name not in expected:
            raise MtpdError(f"{weights} has tensor '{name}' that this model does not: the checkpoint belongs to "
                            f"another model (check --heads / preset)")
        if expected[name] != shape:
            raise MtpdError(f"shape mismatch for '{name}': checkpoint has {list(shape)}, the model expects "
                            f"{list(expected[name])}; config.json and the weights come from different models")
    state = model.state_dict()  # tied weights are stored once, under one of their names
    stored_ptrs = {state[name].data_ptr() for name in stored}
    missing = [name for name in state if name not in stored and state[name].data_ptr() not in stored_ptrs]
    if missing:
        raise MtpdError(f"{weights} lacks tensor '{missing[0]}': the checkpoint belongs to another model")
