"""Checkpoints: exact round trips, atomic writes, run-directory resolution, and mismatches named clearly."""

import functools
import json

import pytest
import torch

import mtpd.checkpoint
from conftest import SAMPLE_TEXT, micro_model
from mtpd.checkpoint import (checkpoint_dir, list_checkpoints, load_checkpoint, prune_checkpoints, read_config,
                             resolve_checkpoint, save_checkpoint)
from mtpd.config import ModelConfig
from mtpd.data import train_tokenizer
from mtpd.errors import MtpdError

META = {"data": {"path": None, "name": "snippet"}, "history": [{"event": "pretrain", "heads": 2}]}


@functools.cache
def _tokenizer():
    return train_tokenizer([SAMPLE_TEXT], 300)


def _model(heads: int = 2, seed: int = 0, **overrides):
    return micro_model(heads, seed=seed, vocab_size=_tokenizer().get_vocab_size(), **overrides)


def _save(path, model=None, state=None):
    return save_checkpoint(path, model or _model(), _tokenizer(), META, state)


def _edit_config(path, **model_changes):
    config = json.loads((path / "config.json").read_text())
    config["model"].update(model_changes)
    (path / "config.json").write_text(json.dumps(config))


def test_round_trip_is_bit_identical(tmp_path):
    model = _model(seed=3)
    path = _save(tmp_path / "ckpt", model)
    checkpoint = load_checkpoint(path)

    expected, loaded = model.state_dict(), checkpoint.model.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    assert checkpoint.tokenizer.to_str() == _tokenizer().to_str()
    assert ModelConfig.from_dict(checkpoint.config["model"]) == model.cfg
    assert checkpoint.config["data"] == META["data"] and checkpoint.config["history"] == META["history"]
    assert checkpoint.path == path
    assert not checkpoint.model.training  # ready for inference


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    checkpoint = load_checkpoint(_save(tmp_path / "ckpt"))
    main = checkpoint.model.main
    assert main.lm_head.weight is main.embed.weight


def test_crash_during_save_leaves_the_previous_checkpoint_the_latest(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = _save(checkpoint_dir(run, 1))

    def save_half_then_fail(model, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a partial weights file, as a full disk would leave
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mtpd.checkpoint, "save_model", save_half_then_fail)
    with pytest.raises(OSError):
        _save(checkpoint_dir(run, 2))

    assert not checkpoint_dir(run, 2).exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [first.name]  # the temp dir is removed too
    assert list_checkpoints(run) == [(1, first)]
    assert resolve_checkpoint(run) == first
    load_checkpoint(run)  # and it still loads


def test_a_temp_dir_left_by_a_killed_process_is_never_listed(tmp_path):
    run = tmp_path / "run"
    first = _save(checkpoint_dir(run, 1))
    leftover = checkpoint_dir(run, 2).with_name(checkpoint_dir(run, 2).name + ".tmp")
    leftover.mkdir()
    (leftover / "config.json").write_text((first / "config.json").read_text())
    assert list_checkpoints(run) == [(1, first)]
    assert resolve_checkpoint(run) == first


def test_resolve_checkpoint_picks_the_latest_step_of_a_run(tmp_path):
    run = tmp_path / "run"
    for step in (9, 10, 2):  # numeric order, not the order written
        _save(checkpoint_dir(run, step))
    assert resolve_checkpoint(run) == checkpoint_dir(run, 10)
    assert resolve_checkpoint(checkpoint_dir(run, 2)) == checkpoint_dir(run, 2)  # a checkpoint dir itself
    prune_checkpoints(run, keep=2)
    assert [step for step, _ in list_checkpoints(run)] == [9, 10]


def test_resolve_checkpoint_on_an_empty_or_missing_dir_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MtpdError, match="holds no checkpoint.*mtpd train --out"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(MtpdError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")


def test_config_with_more_heads_than_the_weights_names_the_missing_tensor(tmp_path):
    path = _save(tmp_path / "ckpt")
    _edit_config(path, mtp_heads=3)
    with pytest.raises(MtpdError, match=r"lacks tensor 'heads\.2\."):
        load_checkpoint(path)


def test_config_with_fewer_heads_than_the_weights_names_the_extra_tensor(tmp_path):
    path = _save(tmp_path / "ckpt")
    _edit_config(path, mtp_heads=1)
    with pytest.raises(MtpdError, match=r"has tensor 'heads\.1\..*another model"):
        load_checkpoint(path)


def test_config_with_another_width_names_the_mismatched_tensor(tmp_path):
    path = _save(tmp_path / "ckpt")
    _edit_config(path, d_model=64)
    with pytest.raises(MtpdError, match=r"shape mismatch for '[\w.]+': checkpoint has \[.*\], the model expects"):
        load_checkpoint(path)


def test_tokenizer_larger_than_the_model_vocabulary_is_a_vocabulary_mismatch(tmp_path):
    model = micro_model(2, vocab_size=_tokenizer().get_vocab_size() - 10)
    path = save_checkpoint(tmp_path / "ckpt", model, _tokenizer(), META)
    with pytest.raises(MtpdError, match="vocabulary mismatch"):
        load_checkpoint(path)


def test_corrupt_or_foreign_config_is_a_one_line_error(tmp_path):
    path = _save(tmp_path / "ckpt")
    (path / "config.json").write_text("{not json")
    with pytest.raises(MtpdError, match="corrupt"):
        read_config(path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MtpdError, match="not an mtpd checkpoint"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({"format": "mtpd-checkpoint", "format_version": 1}))
    with pytest.raises(MtpdError, match='no "model" section'):
        load_checkpoint(path)


def test_missing_weights_file_is_reported_as_incomplete(tmp_path):
    path = _save(tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    with pytest.raises(MtpdError, match="no model.safetensors: it is incomplete"):
        load_checkpoint(path)


def test_trainer_state_is_saved_beside_the_weights(tmp_path):
    path = _save(tmp_path / "ckpt", state={"step": 7, "tensor": torch.arange(3)})
    state = torch.load(path / mtpd.checkpoint.STATE_FILE, weights_only=False)
    assert state["step"] == 7 and torch.equal(state["tensor"], torch.arange(3))
