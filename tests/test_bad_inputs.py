"""Bad inputs to `mtpd train` and `mtpd eval`: each gives one `error:` line naming the problem and the fix,
exit status 2, no traceback, and leaves every existing file as it was."""

import json
import shutil

import pytest
import torch

from conftest import SAMPLE_TEXT
from mtpd.atomic import discarded_on_failure
from mtpd.checkpoint import STATE_FILE, TOKENIZER_FILE, WEIGHTS_FILE, list_checkpoints
from mtpd.cli import main
from mtpd.data import train_tokenizer
from test_cli import MICRO, assert_one_line_error, run, snapshot


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory):
    """A real 2-step training run (with resume state), trained once for the module and copied per test."""
    root = tmp_path_factory.mktemp("pristine")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"module_{i}.py").write_text(SAMPLE_TEXT.replace("fibonacci", f"fib_{i}") * 3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTPD_CACHE", str(root / "cache"))
        assert main([*["train", *MICRO], "--batch-size", "4", "--data", str(corpus), "--max-steps", "2",
                     "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def run_dir(pristine_run, tmp_path, capsys):
    capsys.readouterr()  # the fixture's training output
    return shutil.copytree(pristine_run, tmp_path / "run")


def latest(run_dir):
    return list_checkpoints(run_dir)[-1][1]


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _edit_model_config(checkpoint, **changes):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model"].update(changes)
    (checkpoint / "config.json").write_text(json.dumps(config))


def _bigger_tokenizer(checkpoint):
    train_tokenizer([SAMPLE_TEXT * 20], 400).save(str(checkpoint / TOKENIZER_FILE))


# (how the latest checkpoint is damaged, what `eval` says, what `train --resume` says)
CORRUPTIONS = {
    "truncated weights": (lambda c: _truncate(c / WEIGHTS_FILE), "model.safetensors", "the checkpoint is corrupt;"),
    "missing weights": (lambda c: (c / WEIGHTS_FILE).unlink(), "has no model.safetensors", "cannot read"),
    "garbage config.json": (lambda c: (c / "config.json").write_text("{not json"), "cannot read", "cannot read"),
    "foreign config.json": (lambda c: (c / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}'),
                            "not an mtpd checkpoint config", "not an mtpd checkpoint config"),
    "config of another shape": (lambda c: _edit_model_config(c, d_model=64), "shape mismatch for '",
                                "shape mismatch for '"),
    "mistyped config": (lambda c: _edit_model_config(c, n_layers="two"), "model config field 'n_layers' is 'two'",
                        "model config field 'n_layers' is 'two'"),
    "vocabulary mismatch": (_bigger_tokenizer, "vocabulary mismatch", "vocabulary mismatch"),
    "garbage tokenizer.json": (lambda c: (c / TOKENIZER_FILE).write_text("{"), "tokenizer.json (", "tokenizer.json ("),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_eval_of_a_damaged_checkpoint_is_one_line(corruption, run_dir, capsys):
    damage, fragment, _ = CORRUPTIONS[corruption]
    damage(latest(run_dir))
    before = snapshot(run_dir)
    code, _, err = run(capsys, "eval", "--ckpt", run_dir, "--json", run_dir / "eval.json")
    assert_one_line_error(code, err, fragment)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("corruption", [*CORRUPTIONS, "truncated trainer state"])
def test_resume_from_a_damaged_checkpoint_is_one_line_and_touches_nothing(corruption, run_dir, capsys):
    if corruption == "truncated trainer state":
        damage, fragment = (lambda c: _truncate(c / STATE_FILE)), "trainer_state.pt ("
    else:
        damage, _, fragment = CORRUPTIONS[corruption]
    damage(latest(run_dir))
    before = snapshot(run_dir)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--max-steps", "4", "--quiet")
    assert_one_line_error(code, err, fragment)
    assert snapshot(run_dir) == before


def test_corrupt_checkpoint_messages_say_what_to_do(run_dir, capsys):
    _truncate(latest(run_dir) / WEIGHTS_FILE)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--max-steps", "4", "--quiet")
    assert_one_line_error(code, err, "use an earlier checkpoint", "move the corrupt one out of checkpoints/")


def test_binary_corpus_is_one_line(tmp_path, capsys):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 64)
    code, _, err = run(capsys, "train", *MICRO, "--data", tmp_path / "blob.bin", "--max-steps", "1",
                       "--out", tmp_path / "run")
    assert_one_line_error(code, err, "is not UTF-8 text (binary", "pass a UTF-8 text file")


def test_empty_corpus_file_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = run(capsys, "train", *MICRO, "--data", tmp_path / "empty.txt", "--max-steps", "1",
                       "--out", tmp_path / "run")
    assert_one_line_error(code, err, "contains no text", "--data")


def test_output_directory_under_a_regular_file_is_one_line(tmp_path, capsys, corpus_dir):
    # chmod does not stop root from writing, a path through a regular file stops everyone.
    (tmp_path / "file").write_text("keep me")
    code, _, err = run(capsys, "train", *MICRO, "--data", corpus_dir, "--max-steps", "1",
                       "--out", tmp_path / "file" / "run")
    assert_one_line_error(code, err, "cannot write to output directory", "Not a directory", "choose another --out")
    assert (tmp_path / "file").read_text() == "keep me"


def test_eval_json_under_a_regular_file_is_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    before = snapshot(run_dir)
    code, _, err = run(capsys, "eval", "--ckpt", run_dir, "--json", tmp_path / "file" / "eval.json")
    assert_one_line_error(code, err, "cannot write", "choose another --json path")
    assert (tmp_path / "file").read_text() == "keep me" and snapshot(run_dir) == before


def test_eval_on_a_binary_corpus_is_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 1000)
    code, _, err = run(capsys, "eval", "--ckpt", run_dir, "--data", tmp_path / "blob.bin")
    assert_one_line_error(code, err, "is not UTF-8 text (binary")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "eval"])
def test_cuda_requested_without_cuda_is_one_line(command, run_dir, tmp_path, capsys, corpus_dir):
    before = snapshot(run_dir)
    args = (["train", *MICRO, "--data", corpus_dir, "--max-steps", "1", "--out", tmp_path / "new"]
            if command == "train" else ["eval", "--ckpt", run_dir])
    code, _, err = run(capsys, *args, "--device", "cuda")
    assert_one_line_error(code, err, "no CUDA device is available", "use --device cpu")
    assert snapshot(run_dir) == before and not (tmp_path / "new").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
    (["--seq-len", "1"], "--seq-len must be >= 2 (got 1)"),
    (["--lr", "0"], "--lr must be > 0 (got 0.0)"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1 (got 0)"),
    (["--time-budget", "-5"], "--time-budget must be > 0 (got -5.0)"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1 (got 0)"),
    (["--kl-temperature", "0"], "--kl-temperature must be > 0 (got 0.0)"),
    (["--top-mass", "1.5"], "--top-mass must be in (0, 1] (got 1.5)"),
    (["--alpha-lambda", "-1"], "--alpha-lambda must be >= 0 (got -1.0)"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1 (got 0)"),
    (["--d-model", "30"], "d_model 30 must be divisible by n_heads 4"),
    (["--attn-heads", "0"], "n_heads (--attn-heads) must be >= 1 (got 0)"),
    (["--d-model", "-8"], "d_model (--d-model) must be >= 1 (got -8)"),
    (["--kv-heads", "0"], "n_kv_heads (--kv-heads) must be >= 1 (got 0)"),
    (["--heads", "8", "--seq-len", "8"], "8 heads need windows longer than --seq-len 8"),
    (["--fsdp"], "--fsdp shards the model over the processes of a torchrun launch"),
])
def test_more_bad_train_numbers_are_one_line_errors(flags, fragment, tmp_path, capsys, corpus_dir):
    code, _, err = run(capsys, "train", *MICRO, "--data", corpus_dir, "--max-steps", "1", "--out", tmp_path / "run",
                       *flags)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()  # rejected before any work


@pytest.mark.parametrize("flags, fragment", [
    (["--seq-len", "1"], "--seq-len must be >= 2 (got 1)"),
    (["--windows", "-3"], "--windows must be >= 1 (got -3)"),
    (["--seq-len", "1000"], "--seq-len 1000 exceeds the model's context"),
])
def test_bad_eval_numbers_are_one_line_errors(flags, fragment, run_dir, capsys):
    before = snapshot(run_dir)
    code, _, err = run(capsys, "eval", "--ckpt", run_dir, *flags)
    assert_one_line_error(code, err, fragment)
    assert snapshot(run_dir) == before


def test_seq_len_beyond_the_context_is_one_line(tmp_path, capsys, corpus_dir):
    code, _, err = run(capsys, "train", *MICRO, "--data", corpus_dir, "--max-steps", "1", "--out", tmp_path / "run",
                       "--seq-len", "512")
    assert_one_line_error(code, err, "--seq-len 512 exceeds the model's context 128: lower --seq-len or raise "
                                     "--max-seq-len")
    assert not list_checkpoints(tmp_path / "run")


def test_a_moved_corpus_is_named_and_found_again_with_data(tmp_path, capsys, corpus_dir):
    """eval, bench and --resume read the corpus a run trained on from its checkpoint; once it moved, they say
    so and take --data (a resumed run only with the same documents)."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *MICRO, "--data", corpus_dir, "--max-steps", 2, "--save-every", 2,
                       "--out", out)
    assert code == 0, err
    moved = tmp_path / "moved"
    shutil.move(corpus_dir, moved)
    bench = ["bench", "--ckpt", out, "--num-prompts", 1, "--prompt-tokens", 8, "--max-new-tokens", 4, "--rounds", 1,
             "--skip-no-cache"]
    for command in (["eval", "--ckpt", out], bench, ["train", "--out", out, "--resume", "--max-steps", 3]):
        code, _, err = run(capsys, *command)
        assert_one_line_error(code, err, f"the corpus this checkpoint was trained on, {corpus_dir}, is not there any "
                                         f"more: pass --data")
    for command in (["eval", "--ckpt", out], bench, ["train", "--out", out, "--resume", "--max-steps", 3]):
        code, _, err = run(capsys, *command, "--data", moved)
        assert code == 0, err
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.py").write_text(SAMPLE_TEXT * 20)
    code, _, err = run(capsys, "train", "--out", out, "--resume", "--max-steps", 4, "--data", other)
    assert_one_line_error(code, err, "is not the one this run trained on")


def test_bench_refuses_more_tokens_than_the_context_holds(tmp_path, capsys, corpus_dir):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", *MICRO, "--data", corpus_dir, "--max-steps", 1, "--out", out)
    assert code == 0, err
    code, _, err = run(capsys, "bench", "--ckpt", out, "--num-prompts", 1, "--prompt-tokens", 64,
                       "--max-new-tokens", 100, "--rounds", 1, "--skip-no-cache")
    assert_one_line_error(code, err, "plus --max-new-tokens 100 exceed the model's context of 128 tokens")


def test_bench_json_into_a_directory_is_refused_before_the_benchmark(run_dir, tmp_path, capsys):
    code, out, err = run(capsys, "bench", "--ckpt", run_dir, "--json", tmp_path, "--rounds", 1, "--skip-no-cache")
    assert_one_line_error(code, err, "cannot write --json", "choose another --json path")
    assert "method" not in out  # no table: nothing was benchmarked


@pytest.mark.parametrize("flags, fragment", [
    (["--lr", "0.001"], "lr 0.001, saved 0.002"),
    (["--heads", "4"], "mtp_heads 4, saved 2"),  # typed, though equal to the default: still not the run's
    (["--no-stop-grad"], "stop_grad False, saved True"),
])
def test_resume_refuses_a_setting_it_would_ignore(flags, fragment, run_dir, capsys):
    before = snapshot(run_dir)
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--max-steps", "4", "--quiet", *flags)
    assert_one_line_error(code, err, f"{' '.join(flags)} does not apply with --resume", fragment,
                          "only budget flags (--max-steps, --max-tokens, --time-budget)", "another --out")
    assert snapshot(run_dir) == before


def test_resume_with_the_same_command_continues(run_dir, pristine_run, capsys):
    corpus = pristine_run.parent / "corpus"
    code, _, err = run(capsys, "train", *MICRO, "--batch-size", "4", "--data", corpus, "--max-steps", "3",
                       "--out", run_dir, "--resume")
    assert code == 0, err
    assert list_checkpoints(run_dir)[-1][0] == 3


def test_extend_resume_refuses_another_fraction(run_dir, tmp_path, capsys):
    extension = ["extend", "--ckpt", run_dir, "--to", "4", "--out", tmp_path / "ext", "--quiet"]
    code, _, err = run(capsys, *extension, "--max-steps", "1")
    assert code == 0, err
    code, _, err = run(capsys, *extension, "--resume", "--fraction", "0.5")
    assert_one_line_error(code, err, "--fraction 0.5 does not apply with --resume", "max_steps None, saved 1")


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("failure", ["missing corpus", "empty corpus", "Ctrl-C while loading"])
def test_a_run_that_fails_before_saving_leaves_no_directory(failure, tmp_path, capsys, monkeypatch, corpus_dir):
    (tmp_path / "empty.txt").write_text("\n")
    data = {"missing corpus": "/nonexistent", "empty corpus": tmp_path / "empty.txt"}.get(failure, corpus_dir)
    if failure == "Ctrl-C while loading":
        monkeypatch.setattr("mtpd.run.tokenized_corpus", _interrupted)
    (tmp_path / "mine").mkdir()  # made by the user: kept, even empty
    for out in (tmp_path / "new" / "run", tmp_path / "mine"):
        code = main([str(a) for a in ("train", *MICRO, "--data", data, "--max-steps", "1", "--out", out)])
        assert code == (130 if failure == "Ctrl-C while loading" else 2)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_extend_experiment_and_export_that_fail_leave_no_directory(run_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "mine").mkdir()
    for command in (["extend", "--ckpt", run_dir, "--to", "4", "--data", "/nonexistent", "--quiet"],
                    ["experiment", "--data", "/nonexistent", "--quiet"]):
        for out in (tmp_path / "new" / "out", tmp_path / "mine"):
            code, _, err = run(capsys, *command, "--out", out)
            assert code == 2 and "does not exist" in err
    monkeypatch.setattr("mtpd.export.to_llama", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left")))
    code, _, err = run(capsys, "export-hf", "--ckpt", run_dir, "--out", tmp_path / "new" / "hf")
    assert_one_line_error(code, err, "cannot write", "No space left")
    assert not (tmp_path / "new").exists()
    assert not any((tmp_path / "mine").iterdir())  # the experiment's settings.json went with its failure


def test_discarded_on_failure_never_removes_what_holds_a_file(tmp_path):
    kept, discarded = tmp_path / "a" / "b", tmp_path / "c" / "d"
    for target, name in ((kept, "result"), (discarded, "log")):
        with pytest.raises(RuntimeError), discarded_on_failure(target, disposable=("log",)):
            target.mkdir(parents=True)
            (target / name).write_text("x")
            raise RuntimeError
    assert (kept / "result").read_text() == "x"
    assert not (tmp_path / "c").exists()


def test_a_hf_model_refused_after_loading_prints_no_transformers_progress_bars(tmp_path, capfd, corpus_dir):
    transformers = pytest.importorskip("transformers")
    config = transformers.GraniteConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "granite")
    capfd.readouterr()
    code = main([str(a) for a in ("train", "--hf", tmp_path / "granite", "--heads", "2", "--max-steps", "1",
                                  "--data", corpus_dir, "--out", tmp_path / "run", "--quiet")])
    err = capfd.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "transforms its logits" in err
    assert "Loading weights" not in err and "it/s" not in err
    assert transformers.utils.logging.is_progress_bar_enabled()  # restored after the load
