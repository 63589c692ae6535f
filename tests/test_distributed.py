"""Distributed training under torchrun, 2 CPU processes on gloo: every mode and both strategies (DDP, FSDP2)
train the same function of the global batch as one process does, ranks stay identical, and the CLI trains,
reports once and resumes under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_worker import MODES, STEPS, train_modes
from mtpd.checkpoint import WEIGHTS_FILE, checkpoint_dir, list_checkpoints
from mtpd.cli import main

TESTS = Path(__file__).parent
# CPU processes on gloo even where a GPU is present (two processes cannot share one GPU under NCCL).
MICRO = ["--preset", "micro", "--heads", "2", "--vocab-size", "300", "--seq-len", "32", "--quiet", "--device", "cpu"]


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    """--standalone: a free local port, so concurrent test runs do not meet at 29500."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=TESTS,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_ranks_train_like_one_process_with_the_same_global_batch(tmp_path):
    per_rank_batch = 2
    torchrun(str(TESTS / "ddp_worker.py"), str(tmp_path / "ranks"), str(per_rank_batch))
    train_modes(tmp_path / "single", 2 * per_rank_batch)

    for strategy in ("ddp", "fsdp"):
        for mode, overrides in MODES.items():
            run, reference = tmp_path / "ranks" / f"{strategy}-{mode}", tmp_path / "single" / f"ddp-{mode}"
            ranks = [torch.load(run / f"rank{r}.pt") for r in (0, 1)]
            expected = torch.load(reference / "rank0.pt")
            for rank in ranks:
                assert (rank["step"], rank["tokens_seen"]) == (expected["step"], expected["tokens_seen"])
                assert rank["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5), (strategy, mode)
            if strategy == "ddp":  # replicas: bit-identical to each other, and close to one process
                for name, value in ranks[0]["params"].items():
                    assert torch.equal(value, ranks[1]["params"][name]), (mode, name)
                assert_close_weights(ranks[0]["params"], expected["params"])
                frozen = [n for n in expected["params"] if n.startswith("main.")] if overrides else []
                assert all(torch.equal(ranks[0]["params"][n], expected["params"][n]) for n in frozen), mode
            # Rank 0's checkpoint holds the whole model (gathered from the shards under FSDP2).
            saved, expected_saved = (load_file(checkpoint_dir(d, STEPS) / WEIGHTS_FILE) for d in (run, reference))
            assert_close_weights(saved, expected_saved)
            # The logged training loss is the global one; only rank 0 logs.
            logged, expected_logged = (next(e for e in train_events(d) if e["event"] == "train") for d in (run, reference))
            assert logged["loss"] == pytest.approx(expected_logged["loss"], rel=1e-5), (strategy, mode)
            assert logged["tokens"] == expected_logged["tokens"]
            assert [e["event"] for e in train_events(run)].count("start") == 1


def test_torchrun_cli_trains_reports_once_and_resumes(tmp_path, corpus_dir, capsys):
    out, single = tmp_path / "run", tmp_path / "single"
    first = torchrun("-m", "mtpd", "train", *MICRO, "--batch-size", "2", "--data", corpus_dir, "--max-steps", "4",
                     "--save-every", "2", "--out", out)
    assert first.stdout.count("checkpoint: ") == 1 and first.stdout.count("model: ") == 1, first.stdout
    assert "2 processes (DDP), global batch 2 x 2 = 4 sequences" in first.stdout
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]

    resumed = torchrun("-m", "mtpd", "train", "--out", out, "--resume", "--max-steps", "6", "--quiet", "--device", "cpu")
    assert resumed.stdout.count("resuming") == 1 and "at step 4" in resumed.stdout, resumed.stdout
    assert [step for step, _ in list_checkpoints(out)] == [4, 6]
    state = json.loads((checkpoint_dir(out, 6) / "config.json").read_text())["state"]
    assert state["step"] == 6 and state["tokens_seen"] == 6 * 4 * 32  # global tokens: 2 ranks x 2 rows
    assert [e["event"] for e in train_events(out)].count("start") == 1

    # The same two segments in one process with the global batch.
    assert main(["train", *MICRO, "--batch-size", "4", "--data", str(corpus_dir), "--max-steps", "4",
                 "--save-every", "2", "--out", str(single)]) == 0
    assert main(["train", "--out", str(single), "--resume", "--max-steps", "6", "--quiet"]) == 0
    assert_close_weights(*(load_file(checkpoint_dir(d, 6) / WEIGHTS_FILE) for d in (out, single)))
