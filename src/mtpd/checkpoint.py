"""Checkpoints (docs/design.md §7): a directory with config.json, model.safetensors, tokenizer.json and the trainer's
resume state, written to a temporary directory and renamed into place, so a crash never leaves a partial
checkpoint where a complete one is expected.

Heads trained on an external (Hugging Face) backbone are saved alone: heads.safetensors holds only the
`heads.*` tensors, and config.json's "backbone" section records where the backbone was and a fingerprint of
it (model/hf.py), checked when the checkpoint is loaded.

A run directory holds `checkpoints/step-NNNNNNNN/` entries; its latest complete one is what `--ckpt RUN_DIR`
and `--resume` use.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from tokenizers import Tokenizer

from mtpd.atomic import atomic_directory
from mtpd.config import ModelConfig
from mtpd.errors import MtpdError, first_line
from mtpd.model import MTPModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HEADS_FILE = "heads.safetensors"  # head-only checkpoints on an external backbone
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
    with atomic_directory(path) as tmp:
        _write_files(tmp, model, tokenizer, meta, trainer_state)
    return path


def _write_files(directory: Path, model: MTPModel, tokenizer: Tokenizer, meta: dict,
                 trainer_state: dict | None) -> None:
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.cfg.to_dict(), **meta}
    config.pop("backbone", None)  # only the model itself says whether its backbone is external
    reference = external_backbone(model)
    if reference is not None:
        config["backbone"] = reference
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if is_head_only(config):  # the backbone is the user's model, referenced in config.json, not copied
        save_file(head_tensors(model), str(directory / HEADS_FILE))
    else:
        save_model(model, str(directory / WEIGHTS_FILE))
    tokenizer.save(str(directory / TOKENIZER_FILE))
    if trainer_state is not None:
        torch.save(trainer_state, directory / STATE_FILE)


def is_head_only(config: dict) -> bool:
    """A checkpoint of heads on an external backbone (config.json has a "backbone" reference)."""
    return "backbone" in config


def external_backbone(model: MTPModel) -> dict | None:
    """The reference a checkpoint records for a main model mtpd does not own (loaded with --hf), else None.
    Derived from the model itself, so every training mode (head-only, looped extension) saves heads alone.
    `runtime` says what computed the main model (mtpd's decoder or the transformers adapter): their h0 differ
    (before or after the final norm), so heads load onto the runtime they were trained with."""
    from mtpd.model.source import backbone_reference

    source = model.main.source
    return None if source is None else backbone_reference(source) | {"runtime": model.main.runtime}


# What a head-only checkpoint holds: the heads and the ids of their draft vocabulary (model/draft_vocab.py).
_HEAD_MODULES = ("heads", "draft_vocab")
_HEAD_PREFIXES = tuple(f"{name}." for name in _HEAD_MODULES)


def head_tensors(model: MTPModel) -> dict[str, torch.Tensor]:
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name.startswith(_HEAD_PREFIXES)}


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


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", backbone_path: str | Path | None = None) -> Checkpoint:
    """Load and validate a checkpoint: config, tensor names and shapes, and vocabulary must agree.

    A head-only checkpoint loads its backbone from the recorded path, or from `backbone_path` (--hf) when
    given; either way the backbone must match the recorded fingerprint."""
    path = resolve_checkpoint(path)
    config = read_config(path)
    for name in (HEADS_FILE if is_head_only(config) else WEIGHTS_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise MtpdError(f"checkpoint {path} has no {name}: it is incomplete; use an earlier checkpoint")
    model = build_model(config, path, device, backbone_path)
    load_weights(model, path, device)
    return Checkpoint(path, model.eval(), checkpoint_tokenizer(path, model.cfg), config)


def checkpoint_tokenizer(path: Path, model_cfg: ModelConfig) -> Tokenizer:
    """The checkpoint's tokenizer, checked against the model's vocabulary."""
    try:
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER_FILE))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        reason = first_line(exc)
        raise MtpdError(f"cannot read {path / TOKENIZER_FILE} ({reason}): the checkpoint is corrupt; "
                        f"{USE_AN_EARLIER_ONE}") from None
    if tokenizer.get_vocab_size() > model_cfg.vocab_size:
        raise MtpdError(f"vocabulary mismatch in {path}: tokenizer.json has {tokenizer.get_vocab_size()} tokens "
                        f"but the model's vocab_size is {model_cfg.vocab_size}; the files come from different runs")
    return tokenizer


def build_model(config: dict, path: Path, device: str | torch.device = "cpu",
                backbone_path: str | Path | None = None) -> MTPModel:
    """The model a checkpoint's config.json describes, before its weights are loaded: a built-in one, or heads
    on the referenced Hugging Face model (found at `backbone_path` if given, and checked either way)."""
    model_cfg = ModelConfig.from_dict(config["model"])
    if is_head_only(config):
        return _model_on_backbone(model_cfg, config["backbone"], path, device, backbone_path)
    if backbone_path is not None:
        raise MtpdError(f"checkpoint {path} holds its own main model, so --hf does not apply: drop --hf")
    with torch.device(device):
        return MTPModel(model_cfg)


def _model_on_backbone(model_cfg: ModelConfig, reference: dict, path: Path, device: str | torch.device,
                       backbone_path: str | Path | None) -> MTPModel:
    from mtpd.model.backbone import load_backbone
    from mtpd.model.source import SMOLLM2, check_backbone, resolve_source

    if reference.get("type") != "huggingface":
        raise MtpdError(f"checkpoint {path} references a backbone of type {reference.get('type')!r}, which this "
                        f"mtpd cannot load: upgrade mtpd")
    location = backbone_path or reference["path"]
    if not Path(location).exists() and str(location) != SMOLLM2:
        raise MtpdError(f"the backbone of {path} is not at {location}: pass the model the heads were trained on "
                        f"with --hf PATH")
    source = resolve_source(location)
    check_backbone(reference, source, path)
    # Checkpoints written before mtpd had its own runtime for Llama models were trained on the adapter.
    backbone = load_backbone(source, device, max_seq_len=model_cfg.max_seq_len,
                             runtime=reference.get("runtime", "transformers"))
    return MTPModel(model_cfg, backbone).to(device)


def load_weights(model: MTPModel, path: Path, device: str | torch.device = "cpu") -> None:
    """Load a checkpoint's tensors into `model` after checking their names and shapes: the whole model, or
    only the heads for a head-only checkpoint."""
    if not is_head_only(read_config(path)):
        check_weights_match(model, path / WEIGHTS_FILE)
        load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(device))
        return
    check_weights_match(model, path / HEADS_FILE, prefix=_HEAD_PREFIXES)
    tensors = load_file(str(path / HEADS_FILE), device=str(device))
    for name in _HEAD_MODULES:
        prefix = f"{name}."
        model.get_submodule(name).load_state_dict(
            {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}, strict=True)


def check_weights_match(model: torch.nn.Module, weights: Path, prefix: str | tuple[str, ...] = "") -> None:
    """Compare tensor names and shapes in a safetensors file with a model (its tensors whose names start with
    `prefix`, or one of several); name the first disagreement."""
    state = {name: t for name, t in model.state_dict().items() if name.startswith(prefix)}
    expected = {name: tuple(t.shape) for name, t in state.items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:
        reason = first_line(exc)
        raise MtpdError(f"cannot read {weights} ({reason}): the checkpoint is corrupt; {USE_AN_EARLIER_ONE}") from None
    for name, shape in stored.items():
        if name not in expected:
            raise MtpdError(f"{weights} has tensor '{name}' that this model does not: the checkpoint belongs to "
                            f"another model (check --heads / preset)")
        if expected[name] != shape:
            raise MtpdError(f"shape mismatch for '{name}': checkpoint has {list(shape)}, the model expects "
                            f"{list(expected[name])}; config.json and the weights come from different models")
    # tied weights are stored once, under one of their names
    stored_ptrs = {state[name].data_ptr() for name in stored}
    missing = [name for name in state if name not in stored and state[name].data_ptr() not in stored_ptrs]
    if missing:
        raise MtpdError(f"{weights} lacks tensor '{missing[0]}': the checkpoint belongs to another model")
