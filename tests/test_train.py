"""The trainer: it learns, resumes exactly, keeps frozen parts frozen, and stops cleanly (budget, NaN)."""

import dataclasses
import functools
import json
import math
import time

import pytest
import torch

from conftest import SAMPLE_TEXT, micro_model
from mtpd.checkpoint import STATE_FILE, checkpoint_dir, list_checkpoints, load_checkpoint
from mtpd.config import LossConfig
from mtpd.data import train_tokenizer
from mtpd.errors import MtpdError
from mtpd.evaluate import evaluate
from mtpd.train import PROBE_STEPS, Trainer, TrainConfig, learning_rate




@functools.cache
def _snippet_tokenizer():
    return train_tokenizer([SAMPLE_TEXT], 300)


def snippet_stream(repeats: int = 20) -> torch.Tensor:
    """A token stream that repeats one short snippet: every next token is predictable from 32 tokens of context."""
    ids = torch.tensor(_snippet_tokenizer().encode(SAMPLE_TEXT).ids, dtype=torch.int32)
    return ids.repeat(repeats)


def make_trainer(out_dir, heads: int = 2, seed: int = 0, loss_cfg: LossConfig = LossConfig(), **overrides) -> Trainer:
    tokenizer = _snippet_tokenizer()
    cfg = TrainConfig(**{"batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 5, "eval_every": 10**6,
                         "save_every": 10**6, "eval_windows": 8, **overrides})
    model = micro_model(heads, seed=seed, vocab_size=tokenizer.get_vocab_size())
    stream = snippet_stream()
    return Trainer(model, tokenizer, stream, stream, cfg, loss_cfg, out_dir, show_progress=False)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_micro_model_overfits_a_repeated_snippet(tmp_path):
    trainer = make_trainer(tmp_path / "run", max_steps=200, lr=5e-3, warmup_steps=10)
    before = evaluate(trainer.model, trainer.val_windows)
    assert before["val_loss"] > 0.8 * math.log(trainer.model.cfg.vocab_size)  # starts near uniform

    after = trainer.fit()

    assert trainer.step == 200
    assert after["val_loss"] < 0.5, after
    for k, (ce_before, ce_after) in enumerate(zip(before["head_ce"], after["head_ce"]), start=1):
        assert ce_after < 0.8 and ce_after < ce_before / 5, f"head {k}: {ce_before:.2f} -> {ce_after:.2f}"
    # Each head predicts a deterministic continuation, so it should mostly agree with the main head.
    assert min(after["offline_acceptance"]) > 0.8, after


def _interrupt_after_save_at(monkeypatch, stop_step: int) -> None:
    """Make Trainer.save raise KeyboardInterrupt (Ctrl-C) right after writing the checkpoint of stop_step."""
    real_save = Trainer.save

    def save_then_interrupt(self):
        path = real_save(self)
        if self.step == stop_step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Trainer, "save", save_then_interrupt)


def test_resume_continues_bit_exactly(tmp_path, monkeypatch):
    n = 8
    budget = dict(max_steps=n, save_every=n // 2, eval_every=n // 2)  # the eval refreshes top-N mid-run too
    straight = make_trainer(tmp_path / "straight", **budget)
    straight.fit()

    interrupted = make_trainer(tmp_path / "split", **budget)
    with monkeypatch.context() as patch:
        _interrupt_after_save_at(patch, n // 2)
        with pytest.raises(KeyboardInterrupt):
            interrupted.fit()
    assert [step for step, _ in list_checkpoints(tmp_path / "split")] == [n // 2]

    # Another initialisation (seed) shows the weights come from the checkpoint, not from the same seed.
    resumed = make_trainer(tmp_path / "split", seed=1, **budget)
    assert resumed.resume()
    assert resumed.step == n // 2
    resumed.fit()

    assert (resumed.step, resumed.tokens_seen) == (straight.step, straight.tokens_seen) == (n, n * 4 * 32)
    final, expected = params(resumed.model), params(straight.model)
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    assert resumed.last_eval == straight.last_eval


def test_resume_with_a_larger_budget_extends_the_run(tmp_path):
    make_trainer(tmp_path, max_steps=4).fit()
    extended = make_trainer(tmp_path, max_steps=7)
    assert extended.resume() and extended.step == 4
    assert extended.total_steps == 7  # the schedule is re-planned to the new end
    extended.fit()
    assert extended.step == 7
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 7]


def test_resume_with_a_budget_the_run_has_passed_is_an_error(tmp_path):
    make_trainer(tmp_path, max_steps=6).fit()
    with pytest.raises(MtpdError, match="already at step 6.*larger --max-steps"):
        make_trainer(tmp_path, max_steps=3).resume()


def test_resuming_a_finished_run_neither_trains_nor_rewrites_it(tmp_path):
    make_trainer(tmp_path, max_steps=3).fit()
    (_, path), = list_checkpoints(tmp_path)
    written = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    again = make_trainer(tmp_path, max_steps=3)
    assert again.resume()
    metrics = again.fit()
    assert again.step == 3
    assert metrics["val_loss"] > 0  # the saved evaluation is returned
    assert list_checkpoints(tmp_path) == [(3, path)]
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == written


def test_head_only_training_leaves_the_main_model_bit_identical(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5, freeze_main=True)
    main_before, heads_before = params(trainer.model.main), params(trainer.model.heads)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in trainer.model.main.parameters()}
    assert optimized == {id(p) for p in trainer.model.heads.parameters()}

    trainer.fit()

    for name, value in params(trainer.model.main).items():
        assert torch.equal(value, main_before[name]), name
    changed = [name for name, value in params(trainer.model.heads).items() if not torch.equal(value, heads_before[name])]
    assert changed, "the heads did not train"


def test_looped_extension_trains_only_the_new_head(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=5, freeze_main=True, frozen_heads=1)
    main_before = params(trainer.model.main)
    head1_before, head2_before = params(trainer.model.heads[0]), params(trainer.model.heads[1])
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.model.heads[1].parameters()}

    trainer.fit()

    for before, module in ((main_before, trainer.model.main), (head1_before, trainer.model.heads[0])):
        for name, value in params(module).items():
            assert torch.equal(value, before[name]), name
    head2_after = params(trainer.model.heads[1])
    assert all(not torch.equal(head2_after[name], head2_before[name]) for name in ("proj.weight", "norm.weight"))


def test_freezing_everything_is_an_error(tmp_path):
    with pytest.raises(MtpdError, match="nothing to train"):
        make_trainer(tmp_path, max_steps=1, freeze_main=True, frozen_heads=2)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    assert [learning_rate(s, total, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert learning_rate(10, total, cfg) == pytest.approx(1.0)
    assert learning_rate(60, total, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert learning_rate(total, total, cfg) == pytest.approx(0.1)
    assert learning_rate(total + 50, total, cfg) == pytest.approx(0.1)  # stays at min_lr past the end
    decay = [learning_rate(s, total, cfg) for s in range(10, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    no_warmup = TrainConfig(lr=1.0, warmup_steps=0)
    assert learning_rate(0, total, no_warmup) == pytest.approx(1.0)


def test_nan_loss_stops_with_an_error_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    import mtpd.train

    real_loss, calls = mtpd.train.mtp_d_loss, []

    def loss_that_explodes_at_step_6(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        calls.append(1)
        return dataclasses.replace(terms, total=terms.total * math.nan) if len(calls) == 6 else terms

    monkeypatch.setattr(mtpd.train, "mtp_d_loss", loss_that_explodes_at_step_6)
    trainer = make_trainer(tmp_path, max_steps=10, save_every=2)
    with pytest.raises(MtpdError) as error:
        trainer.fit()

    last_good = checkpoint_dir(tmp_path, 4)
    message = str(error.value)
    assert "loss became nan at step 6" in message and str(last_good) in message and "--resume" in message
    assert "\n" not in message
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]
    checkpoint = load_checkpoint(last_good)
    assert all(torch.isfinite(p).all() for p in checkpoint.model.parameters())
    assert torch.load(last_good / STATE_FILE, weights_only=False)["step"] == 4


def test_time_budget_stops_training_and_writes_a_final_checkpoint(tmp_path):
    budget = 1.5
    trainer = make_trainer(tmp_path, time_budget=budget)
    assert trainer.total_steps is None  # no step budget: the horizon is estimated from measured speed
    trainer.fit()

    assert trainer.step >= 2
    assert trainer.elapsed < budget + 1.0  # the budget is checked before every step
    assert trainer.total_steps == trainer.step  # a resumed run with the same budget is finished
    assert list_checkpoints(tmp_path) == [(trainer.step, checkpoint_dir(tmp_path, trainer.step))]
    state = json.loads((checkpoint_dir(tmp_path, trainer.step) / "config.json").read_text())["state"]
    assert state["step"] == trainer.step and "eval_val_loss" in state


def test_time_budget_horizon_is_refitted_when_the_first_steps_were_slow(tmp_path, monkeypatch):
    """A machine busy during the speed probe must not end the run long before its time is up."""
    budget, slow_steps = 2.0, 1 + PROBE_STEPS + 2
    trainer = make_trainer(tmp_path, time_budget=budget)
    step = trainer.train_step

    def slow_at_first():
        if trainer.step < slow_steps:
            time.sleep(0.15)
        return step()

    monkeypatch.setattr(trainer, "train_step", slow_at_first)
    trainer.fit()
    assert trainer.elapsed > 0.8 * budget  # fixed from the probe alone, the run stopped near 1.2 s
    assert trainer.step > slow_steps + PROBE_STEPS


def test_invalid_train_config_values_are_one_line_errors():
    for bad, flag in ((dict(batch_size=0), "--batch-size"), (dict(warmup_steps=-1), "--warmup-steps"),
                      (dict(keep_checkpoints=0), "--keep-checkpoints"), (dict(max_steps=0), "--max-steps"),
                      (dict(eval_windows=0), "--eval-windows"), (dict(grad_clip=-1.0), "--grad-clip")):
        with pytest.raises(MtpdError, match=flag):
            TrainConfig(**bad).validate()


def test_evaluation_does_not_depend_on_its_batch_size():
    model = micro_model(2, vocab_size=_snippet_tokenizer().get_vocab_size())
    windows = snippet_stream(3).unfold(0, 33, 32)[:5].long()  # 5 windows: batches of 2 leave a smaller last one
    whole, batched = evaluate(model, windows, batch_size=5), evaluate(model, windows, batch_size=2)
    assert batched["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
    assert batched["head_ce"] == pytest.approx(whole["head_ce"], rel=1e-5)
    assert batched["offline_acceptance"] == pytest.approx(whole["offline_acceptance"])
