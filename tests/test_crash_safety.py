"""Crash safety: a training process killed with SIGKILL mid-run leaves only complete checkpoints, and
`--resume` continues from the latest one exactly (same step, optimizer state, data position, weights) as if
the run had never stopped. A loss that turns NaN stops training with one line and keeps the last good
checkpoint as the latest."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from mtpd.checkpoint import STATE_FILE, WEIGHTS_FILE, checkpoint_dir, list_checkpoints, load_checkpoint
from mtpd.cli import main
from test_cli import MICRO, assert_one_line_error, run

STEPS, SAVE_EVERY = 200, 20


def train_flags(corpus_dir) -> list[str]:
    return ["train", *MICRO, "--batch-size", "4", "--data", str(corpus_dir), "--max-steps", str(STEPS),
            "--save-every", str(SAVE_EVERY), "--eval-every", "50"]


def start_and_kill_after_first_checkpoint(out, corpus_dir) -> int:
    """Start `python -m mtpd train`, SIGKILL it as soon as its first checkpoint exists; return its last step."""
    process = subprocess.Popen([sys.executable, "-m", "mtpd", *train_flags(corpus_dir), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list_checkpoints(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {stderr[-2000:]}"
    return list_checkpoints(out)[-1][0]


def test_sigkill_mid_run_then_resume_continues_exactly(tmp_path, corpus_dir, capsys):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    last_step = start_and_kill_after_first_checkpoint(killed, corpus_dir)
    assert SAVE_EVERY <= last_step < STEPS

    # A kill during a checkpoint write leaves at most a temporary directory, which is never "latest".
    partial = killed / "checkpoints" / f"step-{STEPS:08d}.tmp"
    partial.mkdir()
    (partial / "config.json").write_text('{"format": "mtpd-checkpoint", "mod')
    latest_step, latest = list_checkpoints(killed)[-1]
    assert (latest_step, latest) == (last_step, checkpoint_dir(killed, last_step))
    assert load_checkpoint(latest).path == latest  # complete and valid
    assert torch.load(latest / STATE_FILE, weights_only=False)["step"] == last_step

    assert main(["train", "--out", str(killed), "--resume", "--quiet"]) == 0
    assert f"resuming {killed} at step {last_step}" in capsys.readouterr().out
    assert main([*train_flags(corpus_dir), "--out", str(straight), "--quiet"]) == 0

    assert list_checkpoints(killed)[-1][0] == STEPS
    resumed, expected = (torch.load(checkpoint_dir(d, STEPS) / STATE_FILE, weights_only=False) for d in (killed, straight))
    assert (resumed["step"], resumed["tokens_seen"]) == (expected["step"], expected["tokens_seen"])
    assert resumed["batches"] == expected["batches"]  # the data position
    assert resumed["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
    for index, state in expected["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][index][name], value), (index, name)
    weights, expected_weights = (load_file(checkpoint_dir(d, STEPS) / WEIGHTS_FILE) for d in (killed, straight))
    for name, value in expected_weights.items():
        assert torch.equal(weights[name], value), name
    # Training events continue after the checkpoint; steps logged by the killed process past it are repeated.
    logged = [e["step"] for e in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "train"]
    assert logged[-1] == STEPS and logged.count(last_step + 10) >= 1


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, corpus_dir):
    # An absurd learning rate: step 1 is finite, its update blows the weights up, step 2's loss is not.
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *MICRO, "--batch-size", "4", "--data", corpus_dir, "--max-steps", "10",
                       "--save-every", "1", "--lr", "1e30", "--warmup-steps", "0", "--grad-clip", "0", "--out", out)
    assert_one_line_error(code, err, "loss became", "training stopped and the last good checkpoint is",
                          "lower --lr (now 1e+30)", "--resume")
    step = int(err.split(" at step ")[1].split(";")[0])
    assert [s for s, _ in list_checkpoints(out)][-1] == step - 1  # the checkpoint before the bad step is latest
    assert str(checkpoint_dir(out, step - 1)) in err


def test_metrics_log_restarts_with_the_run_it_belongs_to(tmp_path, capsys, corpus_dir):
    """A resumed run drops what an interrupted segment logged after its checkpoint; a new run in a directory
    with no checkpoint (a run stopped before its first) starts a new log."""
    out = tmp_path / "run"
    flags = ["train", *MICRO, "--batch-size", "4", "--data", corpus_dir, "--save-every", "2", "--out", out]
    log = out / "metrics.jsonl"
    out.mkdir()
    log.write_text('{"event": "train", "step": 1, "stale": true}\n{"torn')  # a run killed before any checkpoint
    code, _, err = run(capsys, *flags, "--max-steps", "2")
    assert code == 0, err
    assert "stale" not in log.read_text()
    with open(log, "a") as f:  # what a segment killed after the step-2 checkpoint might have logged
        f.write(json.dumps({"event": "train", "step": 3, "stale": True}) + "\n")
    code, _, err = run(capsys, *flags, "--max-steps", "4", "--resume")
    assert code == 0, err
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert not any(r.get("stale") for r in records)
    steps = [r["step"] for r in records if "step" in r]
    assert steps == sorted(steps) and steps[-1] == 4


def test_an_interrupted_train_says_how_to_continue(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mtpd.run.pretrain", interrupted)
    assert main(["train", *MICRO, "--max-steps", "5", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "same command plus --resume" in err
    assert "before the first checkpoint nothing was saved: run the command again" in err
