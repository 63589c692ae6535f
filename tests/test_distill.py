"""`mtpd distill-data` (distill.py): the model's own conversations, in its chat template, as training data."""

import json

import pytest
import torch

from hf_models import save_tiny_gguf, save_tiny_model
from conftest import run, assert_one_line_error
from mtpd.distill import is_fragment, load_chat_model
from mtpd.prompts import user_turn

USER_PREFIX = "<|im_start|>user\n"  # what hf_models.CHAT_TEMPLATE writes before a user message
SMALL = ["--batch-size", "4", "--max-new-tokens", "8", "--question-tokens", "96", "--quiet"]


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    path, _, _ = save_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf", seed=0)
    return path




def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_distill_data_writes_whole_conversations_in_the_chat_template(chat_gguf, tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    code, stdout, _ = run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 5, *SMALL)
    assert code == 0 and "wrote 5 conversations" in stdout
    lines = records(out)
    assert len(lines) == 5
    assert len({line["question"] for line in lines}) == 5  # no question twice
    for line in lines:
        text, question = line["text"], line["question"]
        assert text.startswith(USER_PREFIX + question + "<|im_end|>\n<|im_start|>assistant\n")
        assert 1 <= line["answer_tokens"] <= 8
        # an answer the model ended is closed as the template closes a turn; one cut at the budget stays open
        assert text.endswith("<|im_end|>\n") == line["finished"]


def test_answers_are_prompted_exactly_as_the_bench_prompts_a_question(chat_gguf):
    """The heads learn the contexts they draft in: an answer's prompt ids are `mtpd bench`'s for that question."""
    _, renderer = load_chat_model(str(chat_gguf), "cpu", torch.float32)
    assert renderer.user_prefix() == USER_PREFIX
    question = "What does a hash table do?"
    assert renderer.answer_prompt(question) == renderer.formatter.chat([user_turn(question)])


def test_resume_appends_and_keeps_what_was_written(chat_gguf, tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    assert run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 3, *SMALL)[0] == 0
    first = out.read_text()
    code, _, err = run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 5, *SMALL)
    assert_one_line_error(code, err, "exists: pass --resume")
    with open(out, "a") as file:  # an interrupted write: half a line, no newline
        file.write('{"text": "<|im_start|>user\\nHal')
    code, stdout, _ = run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 5, "--resume", *SMALL)
    assert code == 0 and "wrote 2 conversations" in stdout and "5 in all" in stdout
    assert out.read_text().startswith(first)
    lines = records(out)
    assert len(lines) == 5 and len({line["question"] for line in lines}) == 5  # resumed on a fresh seed
    code, stdout, _ = run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 5, "--resume", *SMALL)
    assert code == 0 and "wrote 0 conversations" in stdout and len(records(out)) == 5
    out.write_text(out.read_text().rstrip("\n"))  # cut just before the last line's newline
    assert run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 6, "--resume", *SMALL)[0] == 0
    assert len(records(out)) == 6


def test_resume_refuses_a_file_made_otherwise(chat_gguf, tmp_path, capsys):
    """A file never mixes two kinds of conversation: every line records what made it, and --resume with another
    model or another shaping flag is a one-line error that names it and leaves the file as it was."""
    out = tmp_path / "chat.jsonl"
    assert run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 2, *SMALL)[0] == 0
    made_with = records(out)[0]["made_with"]
    assert made_with["temperature"] == 0.0 and made_with["max_new_tokens"] == 8
    before = out.read_text()
    other_model, _, _ = save_tiny_gguf(tmp_path / "other.gguf", seed=1, intermediate_size=48)
    openings = tmp_path / "openings.txt"
    openings.write_text("Write a haiku\n")
    for flags, fragment in [
        (["--temperature", "0.7"], "was made with --temperature 0.0, not 0.7: pass --temperature 0.0"),
        (["--question-openings", "none"], "was made with other --question-openings"),
        (["--question-openings", openings], "was made with other --question-openings"),
    ]:
        code, _, err = run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 4, "--resume",
                           *SMALL, *flags)
        assert_one_line_error(code, err, fragment, "choose another --out")
    code, _, err = run(capsys, "distill-data", "--hf", other_model, "--out", out, "--samples", 4, "--resume", *SMALL)
    assert_one_line_error(code, err, "was made by another model", str(chat_gguf))
    assert out.read_text() == before
    legacy = tmp_path / "legacy.jsonl"  # written before lines recorded how they were made
    legacy.write_text(json.dumps({"text": "<|im_start|>user\nHi<|im_end|>\n", "question": "Hi"}) + "\n")
    code, _, err = run(capsys, "distill-data", "--hf", chat_gguf, "--out", legacy, "--samples", 2, "--resume", *SMALL)
    assert_one_line_error(code, err, "line 1 does not record how it was made")


@pytest.mark.parametrize("flags, fragment", [
    (["--samples", "0"], "--samples must be >= 1"),
    ([], "no budget: pass --samples N"),
    (["--samples", "2", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--samples", "2", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--samples", "2", "--question-top-p", "0"], "--question-top-p must be in (0, 1]"),
    (["--samples", "2", "--time-budget", "0"], "--time-budget must be > 0"),
    (["--samples", "2", "--question-openings", "nowhere.txt"], "cannot read --question-openings nowhere.txt"),
])
def test_bad_flags_are_one_line_errors(flags, fragment, chat_gguf, tmp_path, capsys):
    code, _, err = run(capsys, "distill-data", "--hf", chat_gguf, "--out", tmp_path / "x.jsonl", *flags, "--quiet")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "x.jsonl").exists()


def test_bad_out_and_models_are_one_line_errors(chat_gguf, tmp_path, capsys):
    code, _, err = run(capsys, "distill-data", "--hf", chat_gguf, "--out", tmp_path / "x.txt", "--samples", 2)
    assert_one_line_error(code, err, "must end in .jsonl")
    base = save_tiny_model(tmp_path / "base", "llama")  # its tokenizer has no chat template
    capsys.readouterr()  # transformers' progress bar while saving it
    code, _, err = run(capsys, "distill-data", "--hf", base, "--out", tmp_path / "x.jsonl", "--samples", 2)
    assert_one_line_error(code, err, "no chat template", "mtpd train --hf MODEL --data TEXT")
    code, _, err = run(capsys, "distill-data", "--hf", tmp_path / "nowhere", "--out", tmp_path / "x.jsonl",
                       "--samples", 2)
    assert_one_line_error(code, err, "nowhere")
    assert not (tmp_path / "x.jsonl").exists()


def test_questions_start_with_the_openings_in_turn(chat_gguf, tmp_path, capsys):
    openings = tmp_path / "openings.txt"
    openings.write_text("Write a poem\n\nExplain\n")
    out = tmp_path / "chat.jsonl"
    code, _, _ = run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 6,
                     "--question-openings", openings, *SMALL)
    assert code == 0
    questions = [line["question"] for line in records(out)]
    assert len(questions) == 6 and all(q.startswith(("Write a poem", "Explain")) for q in questions)
    assert {q.split()[0] for q in questions} == {"Write", "Explain"}  # both taken, in turn
    for line in records(out):  # the question as written, the opening included, in the template
        assert line["text"].startswith(USER_PREFIX + line["question"] + "<|im_end|>")
    openings.write_text("\n  \n")
    code, _, err = run(capsys, "distill-data", "--hf", chat_gguf, "--out", tmp_path / "x.jsonl", "--samples", 2,
                       "--question-openings", openings, "--quiet")
    assert_one_line_error(code, err, "holds no opening")


def test_a_question_must_hold_words_of_the_models_own():
    assert is_fragment("Hi there", "Hi there")  # too short for an instruction
    assert is_fragment("What is the difference between?", "?")  # the opening alone
    assert not is_fragment("Explain photosynthesis.", " photosynthesis.")
    assert not is_fragment("How do I sort a list in Python?", "How do I sort a list in Python?")


def test_the_output_trains_heads(chat_gguf, tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    assert run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 8, *SMALL)[0] == 0
    code, stdout, err = run(capsys, "train", "--hf", chat_gguf, "--heads", 2, "--data", out, "--max-steps", 1,
                            "--batch-size", 2, "--seq-len", 32, "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert "checkpoint:" in stdout


def test_a_time_budget_starts_no_conversation_that_would_overrun(chat_gguf, tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    code, stdout, _ = run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--time-budget", 0.01,
                          "--batch-size", 2, "--max-new-tokens", 4, "--quiet")
    assert code == 0 and "wrote 2 conversations" in stdout  # the first --batch-size always run, a third would overrun
    assert len(records(out)) == 2


def test_questions_leave_room_in_the_context_for_the_answer(chat_gguf, tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    answer_tokens = 128  # of the tiny model's 256 positions: some sampled questions are too long for it
    assert run(capsys, "distill-data", "--hf", chat_gguf, "--out", out, "--samples", 3, "--batch-size", 4,
               "--max-new-tokens", answer_tokens, "--quiet")[0] == 0
    backbone, renderer = load_chat_model(str(chat_gguf), "cpu", torch.float32)
    for line in records(out):
        assert len(renderer.answer_prompt(line["question"])) + answer_tokens <= backbone.max_seq_len


def test_train_without_data_on_a_chat_model_makes_its_own_conversations_first(tmp_path, capsys):
    """`train --hf CHAT_MODEL --time-budget T` without --data: OWN_DATA_SHARE of T goes to distill-data into
    OUT/chat.jsonl, the rest to training on it; a resumed run keeps that data and does not generate again."""
    from mtpd.checkpoint import list_checkpoints, read_config
    from mtpd.config import OWN_DATA_SHARE

    # distill-data's answers are 256 tokens long, after a question: a context of 512
    model, _, _ = save_tiny_gguf(tmp_path / "tiny-chat.gguf", seed=0, max_position_embeddings=512)
    run_dir = tmp_path / "run"
    train = ["train", "--hf", model, "--heads", 2, "--batch-size", 2, "--seq-len", 32, "--eval-windows", 1,
             "--out", run_dir, "--quiet"]
    code, stdout, err = run(capsys, *train, "--time-budget", 5)
    assert code == 0, err
    assert f"{OWN_DATA_SHARE * 5:.0f} s of the 5 s budget go to the model's own conversations" in stdout
    data = run_dir / "chat.jsonl"
    lines = data.read_text()
    assert (run_dir / "chat.jsonl.done").exists() and len(records(data)) >= 1
    config = read_config(list_checkpoints(run_dir)[-1][1])
    assert config["data"]["path"] == str(data)
    assert config["train"]["time_budget"] == pytest.approx(5 * (1 - OWN_DATA_SHARE))
    code, stdout, err = run(capsys, *train, "--time-budget", 6, "--resume")
    assert code == 0, err
    assert "own conversations" not in stdout and data.read_text() == lines
    assert read_config(list_checkpoints(run_dir)[-1][1])["train"]["time_budget"] == pytest.approx(6 * (1 - OWN_DATA_SHARE))
    # resumed without --hf (the checkpoint knows its model): the same share of the budget trains
    code, stdout, err = run(capsys, "train", "--out", run_dir, "--resume", "--time-budget", 7, "--quiet")
    assert code == 0, err
    assert read_config(list_checkpoints(run_dir)[-1][1])["train"]["time_budget"] == pytest.approx(7 * (1 - OWN_DATA_SHARE))
    (run_dir / "chat.jsonl.done").unlink()  # a marker deleted by hand: without --hf the data cannot be made
    code, _, err = run(capsys, "train", "--out", run_dir, "--resume", "--time-budget", 8)
    assert_one_line_error(code, err, "chat.jsonl.done is missing", "--hf MODEL")
