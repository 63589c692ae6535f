"""Looped extension: heads m+1..2m start as copies of 1..m; the main model and old heads stay bit-identical."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run, micro_model
from mtpd.checkpoint import list_checkpoints
from mtpd.errors import MtpdError
from mtpd.losses import mtp_d_loss
from mtpd.config import LossConfig
from mtpd.train import TrainConfig, trainable_parameters

MICRO = ["--preset", "micro", "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--quiet"]




def test_new_heads_start_as_exact_copies_of_the_old_ones():
    model = micro_model(heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.extend_heads(6)
    assert model.num_heads == 6 and model.cfg.mtp_heads == 6
    state = model.state_dict()
    for name, value in before.items():
        assert torch.equal(state[name], value), name
    for new in range(2, 6):
        for name, value in model.heads[new].state_dict().items():
            assert torch.equal(value, model.heads[new % 2].state_dict()[name]), (new, name)
    assert model.heads[2].proj.weight.data_ptr() != model.heads[0].proj.weight.data_ptr()  # copies, not shared


@pytest.mark.parametrize("to", [2, 3, 1])
def test_extending_to_a_non_multiple_or_fewer_heads_is_an_error(to):
    model = micro_model(heads=2)
    with pytest.raises(MtpdError, match=f"cannot extend 2 heads to {to}: --to must be a multiple of 2 larger than 2"):
        model.extend_heads(to)


def test_only_the_new_heads_receive_gradients():
    model = micro_model(heads=1).train()
    model.extend_heads(2)
    params = trainable_parameters(model, TrainConfig(freeze_main=True, frozen_heads=1))
    assert {id(p) for p in params} == {id(p) for p in model.heads[1].parameters()}
    window = torch.randint(0, model.cfg.vocab_size, (2, 17))
    main_logits, head_logits = model(window[:, :-1])
    mtp_d_loss(window, main_logits, head_logits, LossConfig()).total.backward()
    assert all(p.grad is None for p in model.main.parameters())
    assert all(p.grad is None for p in model.heads[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads[1].parameters())



def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1][1] / "model.safetensors"))


def test_extend_twice_keeps_frozen_parts_bit_identical_and_records_history(tmp_path, capsys, corpus_dir):
    base, two, four = tmp_path / "k1", tmp_path / "k2", tmp_path / "k4"
    code, _, err = run(capsys, "train", *MICRO, "--heads", "1", "--data", corpus_dir, "--max-steps", 6, "--out", base)
    assert code == 0, err
    code, out, err = run(capsys, "extend", "--ckpt", base, "--to", 2, "--out", two, "--max-steps", 4, "--quiet")
    assert code == 0, err
    assert "looped extension: 1 -> 2 heads" in out
    code, _, err = run(capsys, "extend", "--ckpt", two, "--to", 4, "--out", four, "--fraction", 0.1, "--quiet")
    assert code == 0, err

    w1, w2, w4 = weights(base), weights(two), weights(four)
    for name, value in w1.items():  # main model and head 1: untouched by both extensions
        assert torch.equal(w2[name], value) and torch.equal(w4[name], value), name
    for name, value in w2.items():  # head 2 trained in the first extension, frozen in the second
        assert torch.equal(w4[name], value), name
    assert any(not torch.equal(w2[n], w1[n.replace("heads.1.", "heads.0.")]) for n in w2 if n.startswith("heads.1."))
    assert any(not torch.equal(w4[n], w2[n.replace("heads.3.", "heads.1.")]) for n in w4 if n.startswith("heads.3."))

    config = json.loads((list_checkpoints(four)[-1][1] / "config.json").read_text())
    assert config["model"]["mtp_heads"] == 4 and config["train"]["frozen_heads"] == 2
    history = config["history"]
    assert [e["event"] for e in history] == ["pretrain", "extend", "extend"]
    assert history[0]["tokens"] == 6 * 4 * 32
    assert (history[1]["from_heads"], history[1]["to_heads"]) == (1, 2) and history[1]["budget"] == {"max_steps": 4}
    assert (history[2]["from_heads"], history[2]["to_heads"]) == (2, 4)
    assert history[2]["budget"] == {"max_tokens": round(0.1 * 6 * 4 * 32)}  # a fraction of the base run's tokens


@pytest.mark.parametrize("to, fragment", [(3, "must be a multiple of 2 larger than 2"),
                                          (2, "must be a multiple of 2 larger than 2"),
                                          (1, "--to must be >= 2")])
def test_extend_with_a_wrong_target_is_one_line(to, fragment, tmp_path, capsys, corpus_dir):
    base = tmp_path / "k2"
    code, _, err = run(capsys, "train", *MICRO, "--heads", "2", "--data", corpus_dir, "--max-steps", 2, "--out", base)
    assert code == 0, err
    code, _, err = run(capsys, "extend", "--ckpt", base, "--to", to, "--out", tmp_path / "bad", "--max-steps", 1)
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_an_interrupted_extension_resumes(tmp_path, capsys, corpus_dir):
    base, ext = tmp_path / "k1", tmp_path / "k2"
    run(capsys, "train", *MICRO, "--heads", "1", "--data", corpus_dir, "--max-steps", 3, "--out", base)
    code, _, err = run(capsys, "extend", "--ckpt", base, "--to", 2, "--out", ext, "--max-steps", 2, "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "extend", "--ckpt", base, "--to", 2, "--out", ext, "--max-steps", 4, "--quiet")
    assert code == 2 and "--resume" in err
    code, out, err = run(capsys, "extend", "--ckpt", base, "--to", 2, "--out", ext, "--max-steps", 4, "--resume",
                         "--quiet")
    assert code == 0, err
    assert "resuming" in out and list_checkpoints(ext)[-1][0] == 4
    assert torch.equal(weights(ext)["heads.0.proj.weight"], weights(base)["heads.0.proj.weight"])


@pytest.mark.parametrize("flag, value, fragment", [("--max-steps", 0, "--max-steps must be >= 1"),
                                                   ("--max-tokens", -5, "--max-tokens must be >= 1"),
                                                   ("--time-budget", 0, "--time-budget must be > 0")])
def test_extend_with_a_bad_budget_is_one_line_and_writes_nothing(flag, value, fragment, tmp_path, capsys,
                                                                 corpus_dir):
    base = tmp_path / "k1"
    code, _, err = run(capsys, "train", *MICRO, "--heads", "1", "--data", corpus_dir, "--max-steps", 2, "--out", base)
    assert code == 0, err
    code, _, err = run(capsys, "extend", "--ckpt", base, "--to", 2, "--out", tmp_path / "bad", flag, value)
    assert code == 2 and err.startswith("error: ") and fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_resuming_an_extension_with_another_target_is_one_line(tmp_path, capsys, corpus_dir):
    base, ext = tmp_path / "k1", tmp_path / "k2"
    code, _, err = run(capsys, "train", *MICRO, "--heads", "1", "--data", corpus_dir, "--max-steps", 2, "--out", base)
    assert code == 0, err
    code, _, err = run(capsys, "extend", "--ckpt", base, "--to", 2, "--out", ext, "--max-steps", 1, "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "extend", "--ckpt", base, "--to", 4, "--out", ext, "--max-steps", 2, "--resume")
    assert code == 2 and "the extension in" in err and "grows to 2 heads, not --to 4" in err
