"""The prompt layer (prompts.py): question files, chat templates rendered exactly as transformers renders them,
the plain-text fallback, stop tokens, and the bench's per-category and second-turn figures."""

import json

import pytest
import torch

from conftest import run, assert_one_line_error, micro_model
from mtpd.bench import Timed, _batches
from mtpd.checkpoint import checkpoint_dir, load_checkpoint, save_checkpoint
from mtpd.data import load_corpus, train_tokenizer
from mtpd.decode import autoregressive_generate, speculative_generate
from mtpd.decode.generation import Generation
from mtpd.errors import MtpdError
from mtpd.prompts import (UNCATEGORIZED, PromptFormatter, PromptSet, PromptStyle, Question, checkpoint_formatter,
                          read_questions, user_turn)
from mtpd.run import generate_text

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A short one for the micro models, whose 128-token context must hold two turns and an answer.
SHORT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a poem.", "Shorter, please."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
    {"question_id": 3, "category": "writing", "turns": ["Write a haiku."]},
    {"question_id": 4, "category": "math", "turns": ["What is 5*5?", "Explain."]},
]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)




def saved_run(run_dir, corpus_dir, style: PromptStyle | None = None):
    """A run directory with one checkpoint of an untrained micro model, recording `style` if given."""
    tokenizer = train_tokenizer(load_corpus(str(corpus_dir)).train, 300)
    model = micro_model(2, vocab_size=tokenizer.get_vocab_size())
    meta = {"data": {"path": str(corpus_dir), "name": str(corpus_dir)}, "train": {"seq_len": 32}}
    if style is not None:
        meta["prompt_style"] = style.to_dict()
    return save_checkpoint(checkpoint_dir(run_dir, 1), model, tokenizer, meta)


# ------------------------------------------------------------------------------------------- question files


def test_question_files_give_ids_categories_and_turns(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [QUESTIONS[0], {"turns": ["No id, no category."]}])
    with open(path, "a") as f:
        f.write("\n")  # a blank line is skipped
    first, second = read_questions(path)
    assert (first.id, first.category, first.turns) == (1, "writing", ("Write a poem.", "Shorter, please."))
    assert (second.id, second.category, second.turns) == (2, UNCATEGORIZED, ("No id, no category.",))


@pytest.mark.parametrize("line, fragment", [
    ('{"question_id": 1, "category": "x"}', 'line 1 has no "turns"'),
    ('{"turns": []}', '"turns" must be a non-empty list'),
    ('{"turns": "a string"}', '"turns" must be a non-empty list'),
    ("not json", "line 1 is not JSON"),
])
def test_bad_question_files_are_one_line_errors(line, fragment, tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    (tmp_path / "q.jsonl").write_text(line + "\n")
    code, _, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--prompts", tmp_path / "q.jsonl")
    assert_one_line_error(code, err, fragment)


# ----------------------------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny Hugging Face model whose tokenizer has a chat template naming bos_token."""
    pytest.importorskip("transformers")
    from hf_models import save_tiny_model
    from transformers import AutoTokenizer

    directory = save_tiny_model(tmp_path_factory.mktemp("chat"), "llama")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def test_chat_rendering_is_transformers_apply_chat_template(chat_model_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chat_model_dir)
    style = PromptStyle.from_hf_tokenizer(hf)
    assert style.chat_template == CHAT_TEMPLATE and style.stop_tokens == ("<|endoftext|>",) and not style.add_bos
    formatter = PromptFormatter(PromptStyle.from_dict(style.to_dict()),  # as a checkpoint records it
                                Tokenizer.from_file(str(chat_model_dir / "tokenizer.json")))
    for conversation in ([user_turn("def fib(n):")],
                         [user_turn("Hi"), {"role": "assistant", "content": "return a"}, user_turn("class Stack")]):
        expected = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert formatter.chat(conversation) == list(expected["input_ids"])


def test_prompt_styles_round_trip_and_default_to_plain_text():
    style = PromptStyle(CHAT_TEMPLATE, "<s>", "</s>", True, ("<|im_end|>", "</s>"))
    assert PromptStyle.from_dict(json.loads(json.dumps(style.to_dict()))) == style
    assert PromptStyle.from_dict(None) == PromptStyle() and PromptStyle().chat_template is None
    with pytest.raises(MtpdError, match="prompt_style"):
        PromptStyle.from_dict({"chat_template": 3})


def test_the_bos_policy_applies_to_plain_prompts(tmp_path, corpus_dir):
    tokenizer = load_checkpoint(saved_run(tmp_path / "run", corpus_dir)).tokenizer
    text_ids = tokenizer.encode("x = 1", add_special_tokens=False).ids
    bos = PromptFormatter(PromptStyle(bos_token="<|endoftext|>", add_bos=True), tokenizer)
    assert bos.plain("x = 1") == [tokenizer.token_to_id("<|endoftext|>")] + text_ids
    assert PromptFormatter(PromptStyle(), tokenizer).plain("x = 1") == text_ids


# ---------------------------------------------------------------------------------------------- stop tokens


def test_decoders_stop_at_any_stop_token(trained_model):
    prompts = [[1, 2, 3], [7, 8, 9, 10]]
    free = autoregressive_generate(trained_model.main, prompts, 20).tokens
    stop = {free[0][4], free[1][6]}  # each row's output holds one of them early
    cut = [row[:next(i for i, t in enumerate(row) if t in stop) + 1] for row in free]
    assert autoregressive_generate(trained_model.main, prompts, 20, stop_ids=stop).tokens == cut
    assert speculative_generate(trained_model, prompts, 20, stop_ids=stop).tokens == cut


def test_generate_stops_at_the_styles_stop_tokens_and_does_not_show_them(tmp_path, corpus_dir):
    path = saved_run(tmp_path / "plain", corpus_dir)
    shown = []
    free = generate_text(load_checkpoint(path), "def fib(n):", 12, emit=shown.append)
    tokenizer = load_checkpoint(path).tokenizer
    continuation = autoregressive_generate(load_checkpoint(path).model.main,
                                           [tokenizer.encode("def fib(n):", add_special_tokens=False).ids], 12).tokens[0]
    assert free["new_tokens"] == 12 and tokenizer.token_to_id("<|endoftext|>") not in continuation
    stop = tokenizer.id_to_token(continuation[3])
    index = continuation.index(continuation[3])  # its first occurrence ends the answer
    path = saved_run(tmp_path / "stop", corpus_dir, PromptStyle(stop_tokens=(stop,)))
    shown = []
    stats = generate_text(load_checkpoint(path), "def fib(n):", 12, emit=shown.append)
    assert stats["new_tokens"] == index + 1
    assert "".join(shown) == tokenizer.decode(continuation[:index], skip_special_tokens=False)


def test_generate_chat_without_a_template_is_one_line(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    code, _, err = run(capsys, "generate", "--ckpt", tmp_path / "run", "--prompt", "hi", "--chat")
    assert_one_line_error(code, err, "no chat template", "drop --chat")


def test_generate_chat_wraps_the_prompt_in_the_template(tmp_path, corpus_dir):
    checkpoint = load_checkpoint(saved_run(tmp_path / "run", corpus_dir, PromptStyle(CHAT_TEMPLATE, "<|endoftext|>")))
    rendered = checkpoint_formatter(checkpoint).chat([user_turn("def fib(n):")])
    text = checkpoint.tokenizer.decode(rendered, skip_special_tokens=False)
    assert text == "<|endoftext|><|im_start|>user\ndef fib(n):<|im_end|>\n<|im_start|>assistant\n"
    stats = generate_text(checkpoint, "def fib(n):", 4, emit=lambda _: None, chat=True)
    assert stats["prompt_tokens"] == len(rendered)


# ----------------------------------------------------------------------------------------------- the bench


def test_batches_never_span_categories_and_keep_the_prompts_order():
    prompts = [[i] for i in range(7)]
    batches, labels = _batches(prompts, 2, ["a", "a", "a", "b", "b", "c", "a"])
    assert batches == [[[0], [1]], [[2]], [[3], [4]], [[5]], [[6]]] and labels == ["a", "a", "b", "c", "a"]
    assert _batches(prompts, 3) == ([[[0], [1], [2]], [[3], [4], [5]], [[6]]], [None, None, None])


def test_a_spread_of_prompts_keeps_their_categories_and_questions():
    questions = [Question(i, category, (f"q{i}",)) for i, category in enumerate("aaabbbccd")]
    prompt_set = PromptSet([[i] for i in range(9)], [q.category for q in questions], True, None, questions)
    three = prompt_set.spread(3)
    assert three.prompts == [[0], [3], [6]] and three.categories == ["a", "b", "c"]
    assert [q.id for q in three.questions] == [0, 3, 6] and three.chat_template
    assert prompt_set.spread(100).prompts == prompt_set.prompts
    plain = PromptSet([[i] for i in range(5)]).spread(2)
    assert plain.prompts == [[0], [2]] and plain.categories is None and plain.questions == []


def test_category_rates_come_from_the_same_batches_and_rounds():
    results = lambda n: [Generation([[0] * n], accepted=[1, 0]), Generation([[0] * n])]  # noqa: E731
    timed = Timed({"autoregressive": [8, 4], "speculative": [8, 4]}, {"autoregressive": [4.0, 1.0],
                  "speculative": [2.0, 2.0]}, {"autoregressive": [1.0, 1.0], "speculative": [1.0, 1.0]},
                  {"autoregressive": results(4), "speculative": results(4)})
    assert timed.rate == {"autoregressive": 12 / 5, "speculative": 12 / 4}
    first = timed.subset([0])
    assert first.rate == {"autoregressive": 2.0, "speculative": 4.0} and first.records["speculative"].accepted == [1, 0]


def test_bench_reports_question_files_per_category_with_second_turns(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir, PromptStyle(SHORT_TEMPLATE))
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    code, out, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--prompts", questions, "--max-new-tokens", 6,
                         "--rounds", 1, "--skip-no-cache", "--batch-size", 2, "--json", tmp_path / "b.json")
    assert code == 0, err
    report = json.loads((tmp_path / "b.json").read_text())
    checkpoint = load_checkpoint(tmp_path / "run")
    formatter = checkpoint_formatter(checkpoint)
    in_category_order = [QUESTIONS[0], QUESTIONS[2], QUESTIONS[1], QUESTIONS[3]]
    assert report["prompt_format"] == "chat template" and report["prompt_note"] is None
    assert report["prompt_tokens"] == [len(formatter.chat([user_turn(q["turns"][0])])) for q in in_category_order]
    assert report["identical_to_baseline"] is True
    per_category = report["per_category"]
    assert list(per_category) == ["writing", "math"]
    assert [c["num_prompts"] for c in per_category.values()] == [2, 2]
    for category in per_category.values():
        assert category["speedup"] == pytest.approx(category["spec_tokens_per_s"] / category["baseline_tokens_per_s"])
        assert category["mean_accepted_tokens"] >= 1
    second = report["second_turn"]
    assert second["num_prompts"] == 3 and list(second["per_category"]) == ["writing", "math"]
    assert second["identical_to_baseline"] is True and second["speedup"] > 0
    assert min(second["prompt_tokens"]) > max(report["prompt_tokens"][:1])  # turn 1, its answer, turn 2
    assert "first turns (chat template), chain, by category" in out and "second turns (chat template)" in out

    code, _, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--prompts", questions, "--max-new-tokens", 6,
                       "--rounds", 1, "--skip-no-cache", "--no-chat-template", "--first-turn-only",
                       "--json", tmp_path / "plain.json")
    assert code == 0, err
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["prompt_format"] == "plain text" and "--no-chat-template" in plain["prompt_note"]
    assert "second_turn" not in plain and set(plain["per_category"]) == {"writing", "math"}


def test_question_files_without_a_template_fall_back_to_plain_text(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:2])
    code, _, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--prompts", questions, "--max-new-tokens", 4,
                       "--rounds", 1, "--skip-no-cache", "--json", tmp_path / "b.json")
    assert code == 0, err
    report = json.loads((tmp_path / "b.json").read_text())
    tokenizer = load_checkpoint(tmp_path / "run").tokenizer
    assert report["prompt_format"] == "plain text" and "no chat template" in report["prompt_note"]
    assert report["prompt_tokens"] == [len(tokenizer.encode(q["turns"][0], add_special_tokens=False).ids)
                                       for q in QUESTIONS[:2]]
    assert report["second_turn"]["num_prompts"] == 2


def test_second_turns_beyond_the_context_are_refused_before_any_work(tmp_path, capsys, corpus_dir):
    saved_run(tmp_path / "run", corpus_dir)  # micro: 128 tokens of context
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:1])
    code, _, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--prompts", questions, "--max-new-tokens", 60)
    assert_one_line_error(code, err, "second-turn prompts", "--first-turn-only")
    assert "round" not in err  # nothing was timed


def test_heads_trained_with_hf_record_the_models_prompt_style(chat_model_dir, tmp_path, capsys, corpus_dir):
    train = ["train", "--hf", chat_model_dir, "--heads", "1", "--data", corpus_dir, "--max-steps", "1",
             "--batch-size", "2", "--seq-len", "16", "--eval-windows", "1", "--out", tmp_path / "run", "--quiet"]
    code, _, err = run(capsys, *train)
    assert code == 0, err
    checkpoint = load_checkpoint(tmp_path / "run")
    style = PromptStyle.from_dict(checkpoint.config["prompt_style"])
    assert style.chat_template == CHAT_TEMPLATE, (style.chat_template, CHAT_TEMPLATE)
    assert style.bos_token is None and style.eos_token == "<|endoftext|>"
    code, _, err = run(capsys, "generate", "--ckpt", tmp_path / "run", "--prompt", "def fib", "--chat",
                       "--max-new-tokens", 3)
    assert code == 0, err
