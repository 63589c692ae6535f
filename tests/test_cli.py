"""The command line: user mistakes give one `error:` line and exit status 2; train -> eval -> resume works."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import run, assert_one_line_error, micro_model
from mtpd.checkpoint import checkpoint_dir, list_checkpoints, save_checkpoint
from mtpd.cli import main
from mtpd.config import PRESETS
from mtpd.data import load_corpus, train_tokenizer

MICRO = ["--preset", "micro", "--heads", "2", "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--quiet"]






def saved_run(run_dir, corpus_dir, step: int = 5):
    """A run directory holding one checkpoint of a micro model trained (not really) on corpus_dir."""
    tokenizer = train_tokenizer(load_corpus(str(corpus_dir)).train, 300)
    model = micro_model(2, vocab_size=tokenizer.get_vocab_size())
    meta = {"data": {"path": str(corpus_dir), "name": str(corpus_dir)}, "train": {"seq_len": 32}}
    return save_checkpoint(checkpoint_dir(run_dir, step), model, tokenizer, meta)


def test_python_m_mtpd_reports_a_missing_data_path_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mtpd", "train", *MICRO, "--data", "/nonexistent",
                             "--max-steps", "1", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_line_error(result.returncode, result.stderr, "/nonexistent", "does not exist")


def test_missing_data_path_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "train", *MICRO, "--data", "/nonexistent", "--max-steps", "1", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "data path '/nonexistent' does not exist", "--data")


def test_empty_corpus_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "train", *MICRO, "--data", tmp_path / "empty", "--max-steps", "1", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "no documents found under")


@pytest.mark.parametrize("flags, fragment", [
    (["--heads", "0"], "--heads must be >= 1 (got 0)"),
    (["--beta", "-1"], "--beta must be >= 0 (got -1.0)"),
    (["--top-n", "0"], "--top-n must be >= 1 (got 0)"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--preset", "huge"], "unknown preset 'huge': choose one of " + ", ".join(PRESETS)),
])
def test_bad_train_flags_are_one_line_errors(flags, fragment, tmp_path, capsys, corpus_dir):
    args = ["train", *MICRO, "--data", corpus_dir, "--max-steps", "1", "--out", tmp_path / "run", *flags]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()  # rejected before any work


def test_bad_flag_is_reported_before_a_missing_budget(tmp_path, capsys):
    code, _, err = run(capsys, "train", *MICRO, "--beta", "-1", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "--beta")


def test_missing_budget_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "train", *MICRO, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "no training budget", "--max-steps")


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_existing_run_without_resume_is_refused_and_left_untouched(tmp_path, capsys, corpus_dir):
    run_dir = tmp_path / "run"
    saved_run(run_dir, corpus_dir)
    (run_dir / "metrics.jsonl").write_text('{"event": "start"}\n')
    before = snapshot(run_dir)

    code, _, err = run(capsys, "train", *MICRO, "--data", corpus_dir, "--max-steps", "1", "--out", run_dir)

    assert_one_line_error(code, err, "already holds checkpoints (latest step 5)", "--resume")
    assert snapshot(run_dir) == before


def test_eval_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "eval", "--ckpt", tmp_path / "nothing")
    assert_one_line_error(code, err, "does not exist")


def test_eval_of_a_checkpoint_from_another_model_names_the_mismatch(tmp_path, capsys, corpus_dir):
    path = saved_run(tmp_path / "run", corpus_dir)
    config = json.loads((path / "config.json").read_text())
    config["model"]["d_model"] = 64
    (path / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "eval", "--ckpt", tmp_path / "run")
    assert_one_line_error(code, err, "shape mismatch for '", "different models")


def test_eval_rejects_zero_windows(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    code, _, err = run(capsys, "eval", "--ckpt", tmp_path / "run", "--windows", "0")
    assert_one_line_error(code, err, "--windows must be >= 1")


def test_train_eval_resume_end_to_end(tmp_path, capsys, corpus_dir):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", *MICRO, "--data", corpus_dir, "--max-steps", "20", "--out", out)
    assert code == 0, err
    assert [step for step, _ in list_checkpoints(out)] == [20]
    assert "offline accept" in stdout and f"checkpoint: {checkpoint_dir(out, 20)}" in stdout

    code, stdout, err = run(capsys, "eval", "--ckpt", out, "--json", out / "e.json")
    assert code == 0, err
    metrics = json.loads((out / "e.json").read_text())
    assert metrics["val_loss"] > 0 and metrics["val_ppl"] == pytest.approx(torch.tensor(metrics["val_loss"]).exp().item(),
                                                                          rel=1e-4)
    assert len(metrics["head_ce"]) == 2 and len(metrics["offline_acceptance"]) == 2
    assert all(0 <= a <= 1 for a in metrics["offline_acceptance"])
    assert metrics["checkpoint"] == str(checkpoint_dir(out, 20))

    # A resumed run keeps its saved settings, so a settings flag it would ignore is refused.
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--max-steps", "40", "--lr", "99", "--quiet")
    assert_one_line_error(code, err, "--lr 99.0 does not apply with --resume", "lr 99.0, saved 0.002")
    # The budget given with --resume replaces the saved one; everything else comes from the run.
    code, stdout, err = run(capsys, "train", "--out", out, "--resume", "--max-steps", "40", "--quiet")
    assert code == 0, err
    assert "resuming" in stdout and "step 20" in stdout
    assert list_checkpoints(out)[-1][0] == 40
    saved = json.loads((checkpoint_dir(out, 40) / "config.json").read_text())
    assert saved["train"]["max_steps"] == 40 and saved["train"]["lr"] == 2e-3 and saved["state"]["step"] == 40

    # Without a budget flag, a finished run stays finished.
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--quiet")
    assert code == 0, err
    assert list_checkpoints(out)[-1][0] == 40


@pytest.mark.parametrize("command", ["train", "eval", "generate", "bench", "demo"])
def test_help_exits_cleanly(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: mtpd {command}" in capsys.readouterr().out


def test_train_help_lists_the_contracted_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--preset", "--heads", "--data", "--out", "--max-steps", "--max-tokens", "--time-budget", "--beta",
                 "--alpha-lambda", "--top-n", "--kl", "--no-stop-grad", "--resume", "--device", "--seed"):
        assert flag in text, flag


def test_generate_speculative_and_plain_print_the_same_text(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    prompt = "def fib_3(n):\n"
    code, spec, err = run(capsys, "generate", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--prompt", prompt, "--max-new-tokens", 30)
    assert code == 0, err
    assert "tokens per main-model pass" in err
    code, plain, err = run(capsys, "generate", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--prompt", prompt, "--max-new-tokens", 30,
                           "--no-spec")
    assert code == 0, err
    assert spec == plain and spec  # an untrained model may well write only newlines
    code, tree, err = run(capsys, "generate", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--prompt", prompt, "--max-new-tokens", 30,
                          "--tree-shape", "0 1 0.0 1.0")
    assert code == 0, err
    assert tree == plain
    code, lookup, err = run(capsys, "generate", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--prompt", prompt,
                            "--max-new-tokens", 30, "--lookup", "--lookup-tokens", 5)
    assert code == 0, err
    assert lookup == plain
    code, chain, err = run(capsys, "generate", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--prompt", prompt,
                           "--max-new-tokens", 30, "--no-lookup")
    assert code == 0, err
    assert chain == plain


def test_generate_drafts_with_prompt_lookup_unless_told_otherwise():
    """The default drafter of `generate` is prompt lookup behind the heads, or the tree when one is given."""
    from mtpd.cli import _generate_looks_up, build_parser

    def looks_up(*flags):
        return _generate_looks_up(build_parser().parse_args(["generate", "--ckpt", "c", "--prompt", "p", *flags]))

    assert looks_up() and looks_up("--lookup") and not looks_up("--no-lookup")
    assert not looks_up("--tree-shape", "0 1") and looks_up("--lookup", "--tree-shape", "0 1")


def test_bench_lookup_reports_lookup_behind_the_heads_and_alone(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    code, out, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--num-prompts", 2,
                         "--prompt-tokens", 8, "--max-new-tokens", 24, "--rounds", 1, "--skip-no-cache", "--lookup",
                         "--json", tmp_path / "bench.json")
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["lookup"]["drafter"]["chain"]["kind"] == "chain" and report["lookup_only"]["drafter"]["chain"] is None
    for name in ("lookup", "lookup_only"):
        assert report[name]["identical_to_baseline"] is True, name
        assert report[name]["drafter"]["lookup_tokens"] == 10
    assert "prompt lookup + heads' chain" in out and "prompt lookup (mtpd, no heads)" in out


def test_bench_writes_the_design_report(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    code, out, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--num-prompts", 2, "--prompt-tokens", 8,
                         "--max-new-tokens", 12, "--rounds", 1, "--json", tmp_path / "bench.json")
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    for field in ("model", "heads", "device", "dtype", "batch_size", "max_new_tokens", "num_prompts", "temperature",
                  "baseline_tokens_per_s", "spec_tokens_per_s", "speedup", "mean_accepted_tokens", "acceptance_rate",
                  "cumulative_acceptance", "identical_to_baseline", "torch_version", "seconds"):
        assert field in report, field
    assert report["identical_to_baseline"] is True
    assert report["num_prompts"] == 2 and report["heads"] == 2 and len(report["cumulative_acceptance"]) == 2
    assert "identical to autoregressive: yes" in out


@pytest.mark.parametrize("flags", [["--tree"], ["--heads", "auto"]])
def test_calibrating_benches_generating_fewer_tokens_than_heads(tmp_path, capsys, corpus_dir, flags):
    """Calibration continues its prompts by enough tokens for every head, whatever --max-new-tokens says
    (regression: 2 new tokens and 2 heads gave no calibration positions)."""
    saved_run(tmp_path / "run", corpus_dir)
    code, out, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--num-prompts", 2, "--prompt-tokens", 8,
                         "--max-new-tokens", 2, "--rounds", 1, "--skip-no-cache", "--tree-nodes", 3, *flags)
    assert code == 0, err
    assert "greedy output identical to autoregressive: yes" in out


def test_bench_tree_runs_chain_and_trees_side_by_side(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    code, out, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--num-prompts", 2, "--prompt-tokens", 8,
                         "--max-new-tokens", 10, "--rounds", 1, "--skip-no-cache", "--tree-dynamic",
                         "--tree-nodes", 4, "--json", tmp_path / "bench.json")
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "tree calibration" in err and "tree vs chain" in out
    for name in ("tree", "tree_dynamic"):
        tree = report[name]
        for field in ("spec_tokens_per_s", "speedup", "mean_accepted_tokens", "acceptance_rate", "cumulative_acceptance",
                      "identical_to_baseline", "tokens_verified_per_step", "drafter"):
            assert field in tree, (name, field)
        assert tree["identical_to_baseline"] is True and len(tree["acceptance_rate"]) == 2
    calibration = report["tree"]["calibration"]
    assert report["tree"]["drafter"]["shape"] == calibration["shape"] and calibration["nodes"] <= 4
    assert report["tree_dynamic"]["drafter"]["nodes"] == calibration["nodes"]
    assert report["tree_dynamic"]["drafter"]["depth"] == calibration["depth"]
    assert report["tree_vs_chain"]["mean_accepted_tokens"] > 0


@pytest.mark.parametrize("flags, fragment", [
    (["--tree-shape", "0 a"], "cannot read tree shape"),
    (["--tree-shape", "0 1.0"], "has no parent"),
    (["--tree-shape", "0 0.0 0.0.0"], "the draft tree is 3 deep but 2 heads draft"),
    (["--tree", "--tree-nodes", "1"], "--tree-nodes must be >= 2"),
    (["--tree-shape", "0 500000"], "takes rank 500000 of a head's ranking but the vocabulary has"),
    (["--max-new-tokens", "1"], "--max-new-tokens must be >= 2 to benchmark speculative decoding"),
    (["--lookup", "--lookup-tokens", "0"], "--lookup-tokens must be >= 1"),
])
def test_bad_tree_flags_are_one_line_errors(flags, fragment, tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    code, _, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--num-prompts", 1, "--prompt-tokens", 8,
                       "--max-new-tokens", 4, "--rounds", 1, "--skip-no-cache", *flags)
    assert_one_line_error(code, err, fragment)


def test_bench_reads_prompts_from_a_file(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    (tmp_path / "prompts.txt").write_text("def fib(n):\\n    a, b = 0, 1\n\nclass Stack:\n")
    code, _, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--prompts", tmp_path / "prompts.txt",
                       "--max-new-tokens", 8, "--rounds", 1, "--skip-no-cache", "--batch-size", 2,
                       "--json", tmp_path / "b.json")
    assert code == 0, err
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["num_prompts"] == 2 and report["batch_size"] == 2 and report["no_cache_tokens_per_s"] is None


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "1", "--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--temperature", "1", "--top-k", "0"], "--top-k must be >= 1"),
    (["--heads", "3"], "--heads 3 is not available: the checkpoint has 2 heads"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--tree-shape", "0 x"], "cannot read tree shape '0 x'"),
    (["--tree-shape", "0 0.0 0.0.0"], "the draft tree is 3 deep but 2 heads draft"),
    (["--tree-shape", "0 999999"], "takes rank 999999 of a head's ranking but the vocabulary has"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--lookup", "--lookup-tokens", "0"], "--lookup-tokens must be >= 1"),
    (["--lookup", "--tree-shape", "0 1"], "--lookup drafts behind the heads' chain, not a tree"),
])
def test_bad_generate_flags_are_one_line_errors(flags, fragment, tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    code, _, err = run(capsys, "generate", "--ckpt", tmp_path / "run", "--prompt", "x = 1", *flags)
    assert_one_line_error(code, err, fragment)


def test_generate_with_a_prompt_longer_than_the_context_is_one_line(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    code, _, err = run(capsys, "generate", "--ckpt", tmp_path / "run", "--prompt", "x = 1\n" * 200)
    assert_one_line_error(code, err, "but the model's context is 128", "shorten the prompt")


def test_bench_with_a_missing_prompts_file_is_one_line(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    code, _, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--prompts", tmp_path / "nope.txt")
    assert_one_line_error(code, err, "prompts file", "does not exist")


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--bogus"], ["unrecognized arguments: --bogus: see `mtpd train --help`"]),
    (["train", "--lrr", "0.1"], ["unrecognized arguments: --lrr 0.1 (did you mean --lr?)"]),
    (["bench"], ["the following arguments are required: --ckpt: see `mtpd bench --help`"]),
    (["train", "--heads", "x"], ["argument --heads: invalid int value: 'x'", "see `mtpd train --help`"]),
    (["nosuchcommand"], ["invalid choice: 'nosuchcommand'", "see `mtpd --help`"]),
])
def test_usage_errors_are_one_line_with_a_pointer_to_help(argv, fragments, capsys):
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert "usage:" not in out + err


@pytest.mark.parametrize("flag, value, fragment", [
    ("--heads", "x", "expected a number of heads or 'auto', got 'x'"),
    ("--draft-threshold", "high", "expected a probability or 'auto', got 'high'"),
])
def test_bench_auto_flags_take_a_value_or_auto(flag, value, fragment, capsys):
    code, _, err = run(capsys, "bench", "--ckpt", "runs/none", flag, value)
    assert_one_line_error(code, err, fragment)
