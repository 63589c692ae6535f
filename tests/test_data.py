import json

import pytest
import torch
from tokenizers import Tokenizer, models

from mtpd import data
from mtpd.data import (
    EOS_TOKEN,
    TokenBatches,
    encode_documents,
    eos_id,
    load_corpus,
    load_or_train_tokenizer,
    token_cache_path,
    train_tokenizer,
    validation_windows,
)
from mtpd.errors import MtpdError

SAMPLE_TEXT = (
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n\t# tabs, trailing spaces   \n"
    "Ünïcödé tëxt, 日本語のテキスト, emoji 🙂🚀 and math ∑∫√.\r\nWindows line ending above.\n"
)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPD_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def small_tokenizer():
    return train_tokenizer([SAMPLE_TEXT * 3, "the quick brown fox jumps over the lazy dog\n" * 20], vocab_size=320)


def write_docs(root, count):
    root.mkdir()
    for i in range(count):
        (root / f"doc{i:03d}.txt").write_text(f"document number {i}\n" * (i + 1))
    return root


def assert_one_line(error):
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ corpus


def test_text_file_is_one_document_split_by_characters(tmp_path):
    text = "".join(f"line {i}\n" for i in range(500))
    (tmp_path / "book.txt").write_text(text)
    corpus = load_corpus(str(tmp_path / "book.txt"), val_fraction=0.1)
    assert corpus.name == str(tmp_path / "book.txt")
    assert len(corpus.train) == len(corpus.val) == 1
    assert corpus.train[0] + corpus.val[0] == text
    assert len(corpus.val[0]) == pytest.approx(0.1 * len(text), abs=1)


def test_directory_reads_text_files_recursively_and_skips_hidden_binary_and_unknown(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "sub" / "c.py").write_text("print('gamma')")
    (tmp_path / ".git" / "d.txt").write_text("hidden directory")
    (tmp_path / "e.txt").write_bytes(b"binary\x00\x01\x02")
    (tmp_path / "f.txt").write_bytes(b"latin-1 \xe9t\xe9")
    (tmp_path / "g.bin").write_text("unknown extension")
    (tmp_path / "h.txt").write_text("   \n\n")
    corpus = load_corpus(str(tmp_path))
    assert sorted(corpus.train + corpus.val) == ["# beta", "alpha text", "print('gamma')"]


def test_extensions_choose_the_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.py").write_text("beta = 1")
    (tmp_path / "c.PY").write_text("gamma = 2")
    corpus = load_corpus(str(tmp_path), extensions=(".py",))
    assert sorted(corpus.train + corpus.val) == ["beta = 1", "gamma = 2"]


def test_jsonl_reads_the_text_field_of_each_line(tmp_path):
    texts = ["first document", "second\nwith a newline", "third \u2028 with a line separator"]
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(texts)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    corpus = load_corpus(str(tmp_path / "docs.jsonl"))
    assert sorted(corpus.train + corpus.val) == sorted(texts)


@pytest.mark.parametrize("bad_line", ["{not json", '{"content": "no text field"}', '{"text": 42}', '["text"]'])
def test_bad_jsonl_line_names_its_line_number(tmp_path, bad_line):
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n' + bad_line + "\n")
    with pytest.raises(MtpdError, match="line 2") as error:
        load_corpus(str(tmp_path / "docs.jsonl"))
    assert_one_line(error)


def test_missing_path_is_a_one_line_error(tmp_path):
    with pytest.raises(MtpdError, match="does not exist") as error:
        load_corpus(str(tmp_path / "nope.txt"))
    assert_one_line(error)


def test_empty_directory_error_names_the_path_and_extensions(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "blank.txt").write_text("  \n \t\n")
    with pytest.raises(MtpdError) as error:
        load_corpus(str(tmp_path), extensions=(".txt", ".md"))
    assert str(tmp_path) in str(error.value) and ".txt .md" in str(error.value)
    assert_one_line(error)


def test_whitespace_file_is_an_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(MtpdError, match="no text") as error:
        load_corpus(str(tmp_path / "blank.txt"))
    assert_one_line(error)


def test_binary_file_given_as_text_is_an_error(tmp_path):
    (tmp_path / "model.txt").write_bytes(bytes(range(256)))
    with pytest.raises(MtpdError, match="not UTF-8") as error:
        load_corpus(str(tmp_path / "model.txt"))
    assert_one_line(error)


def test_split_is_deterministic_disjoint_and_by_name(tmp_path):
    root = write_docs(tmp_path / "docs", 60)
    first, second = load_corpus(str(root), val_fraction=0.2), load_corpus(str(root), val_fraction=0.2)
    assert (first.train, first.val, first.fingerprint) == (second.train, second.val, second.fingerprint)
    assert not set(first.train) & set(first.val)
    assert len(first.train) + len(first.val) == 60
    assert 3 <= len(first.val) <= 24  # about 20%
    # A new file must not move existing files between splits.
    (root / "new.txt").write_text("a brand new document")
    grown = load_corpus(str(root), val_fraction=0.2)
    assert set(first.val) <= set(grown.val) and set(first.train) <= set(grown.train)
    assert grown.fingerprint != first.fingerprint
    assert load_corpus(str(root), val_fraction=0.3).fingerprint != first.fingerprint


def test_two_documents_always_give_one_train_and_one_val(tmp_path):
    for val_fraction in (1e-9, 0.999999):
        corpus = load_corpus(str(write_docs(tmp_path / f"docs{val_fraction}", 2)), val_fraction=val_fraction)
        assert len(corpus.train) == len(corpus.val) == 1


def test_stdlib_corpus_excludes_site_packages(monkeypatch):
    seen = []
    read_stdlib = data._stdlib_documents

    def recording_stdlib_documents():
        documents = read_stdlib()
        seen.extend(documents)
        return documents

    monkeypatch.setattr(data, "_stdlib_documents", recording_stdlib_documents)
    corpus = load_corpus(None)
    paths = [path for path, _ in seen]
    assert corpus.name == "stdlib"
    assert len(corpus.train) + len(corpus.val) > 500 and len(corpus.val) > 0
    assert "os.py" in paths and "json/__init__.py" in paths
    assert not any("site-packages" in path or "dist-packages" in path for path in paths)


# --------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    [
        SAMPLE_TEXT, "", " ", "\n\n\n", "  leading and trailing  ", "\t\tx\r\n\r\n",
        "never seen in training: Ωμέγα ☃ 🦀 \u200b\x00\x7f",
    ],  # fmt: skip
)
def test_tokenizer_round_trips_any_text(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text).ids) == text


def test_trained_tokenizer_has_eos_and_respects_vocab_size(small_tokenizer):
    assert small_tokenizer.token_to_id(EOS_TOKEN) == eos_id(small_tokenizer) == 0
    assert 257 <= small_tokenizer.get_vocab_size() <= 320
    with pytest.raises(MtpdError, match="too small"):
        train_tokenizer(["abc"], vocab_size=100)


def test_tokenizer_is_cached_per_corpus_and_vocab_size(tmp_path, monkeypatch):
    corpus = load_corpus(str(write_docs(tmp_path / "docs", 10)))
    first = load_or_train_tokenizer(corpus, vocab_size=300)
    assert (tmp_path / "cache" / "tokenizers" / f"{corpus.fingerprint}-v300.json").is_file()

    def must_not_train(texts, vocab_size):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(data, "train_tokenizer", must_not_train)
    assert load_or_train_tokenizer(corpus, vocab_size=300).to_str() == first.to_str()
    with pytest.raises(AssertionError, match="cached"):
        load_or_train_tokenizer(corpus, vocab_size=310)


def test_tokenizer_trains_on_the_train_split_only(tmp_path):
    corpus = data.Corpus("made up", train=["aaaa bbbb " * 50], val=["zzzz yyyy " * 50], fingerprint="0" * 16)
    vocab = load_or_train_tokenizer(corpus, vocab_size=300, cache_dir=tmp_path).get_vocab()
    assert "aaaa" in vocab and "zzzz" not in vocab


def test_tokenizer_path_is_loaded_not_trained(tmp_path, small_tokenizer, monkeypatch):
    small_tokenizer.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(data, "train_tokenizer", None)  # would fail if called
    corpus = data.Corpus("unused", ["x"], ["y"], "0" * 16)
    for path in (tmp_path / "tokenizer.json", tmp_path):  # a file, or a model directory holding one
        assert load_or_train_tokenizer(corpus, 999, tokenizer_path=str(path)).to_str() == small_tokenizer.to_str()


def test_tokenizer_path_errors(tmp_path):
    corpus = data.Corpus("unused", ["x"], ["y"], "0" * 16)
    with pytest.raises(MtpdError, match="does not exist") as error:
        load_or_train_tokenizer(corpus, 300, tokenizer_path=str(tmp_path / "missing.json"))
    assert_one_line(error)
    (tmp_path / "garbage.json").write_text("{ not a tokenizer")
    with pytest.raises(MtpdError, match="cannot read") as error:
        load_or_train_tokenizer(corpus, 300, tokenizer_path=str(tmp_path / "garbage.json"))
    assert_one_line(error)
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "no_eos.json"))
    with pytest.raises(MtpdError, match="no end-of-text token") as error:
        load_or_train_tokenizer(corpus, 300, tokenizer_path=str(tmp_path / "no_eos.json"))
    assert_one_line(error)


def test_eos_falls_back_to_other_tokenizer_families():
    tokenizer = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tokenizer.add_special_tokens(["<s>", "</s>"])
    assert eos_id(tokenizer) == tokenizer.token_to_id("</s>")


# ---------------------------------------------------------------------------------------------- encoding


def test_encode_documents_puts_eos_after_each_document(small_tokenizer):
    texts = ["def f(x):\n    return x\n", "hello 🙂", ""]
    tokens = encode_documents(small_tokenizer, texts)
    eos = eos_id(small_tokenizer)
    expected = []
    for text in texts:
        expected += small_tokenizer.encode(text).ids + [eos]
    assert tokens.dtype == torch.int32 and tokens.dim() == 1
    assert tokens.tolist() == expected


def test_long_documents_encode_in_pieces_without_changing_tokens(small_tokenizer, monkeypatch):
    text = SAMPLE_TEXT * 40 + "  indented\n\n   \nword\nlast line without newline"
    monkeypatch.setattr(data, "_ENCODE_PIECE_CHARS", 37)
    monkeypatch.setattr(data, "_ENCODE_BATCH_CHARS", 500)
    assert len(data._encoding_pieces(text, 37)) > 40
    tokens = encode_documents(small_tokenizer, [text, "short"])
    expected = small_tokenizer.encode(text).ids + [0] + small_tokenizer.encode("short").ids + [0]
    assert tokens.tolist() == expected


def test_encoded_tokens_are_cached(tmp_path, small_tokenizer):
    corpus = load_corpus(str(write_docs(tmp_path / "docs", 5)))
    path = token_cache_path(corpus, small_tokenizer, "train")
    assert path != token_cache_path(corpus, small_tokenizer, "val")
    assert path.parent == tmp_path / "cache" / "tokens"
    tokens = encode_documents(small_tokenizer, corpus.train, cache_path=path)
    assert path.is_file()
    # The path is the whole key: given other texts, the cached tokens still come back.
    cached = encode_documents(small_tokenizer, ["something else"], cache_path=path)
    assert cached.dtype == torch.int32 and torch.equal(cached, tokens)
    other_tokenizer = train_tokenizer(["other text entirely"], vocab_size=300)
    assert token_cache_path(corpus, other_tokenizer, "train") != path


# ---------------------------------------------------------------------------------------------- batching


def test_windows_are_strided_by_seq_len_and_share_one_token():
    tokens = torch.arange(101, dtype=torch.int32)  # 101 tokens = exactly 10 windows of 11
    batch = TokenBatches(tokens, batch_size=10, seq_len=10).next_batch()
    assert batch.dtype == torch.long and batch.shape == (10, 11)
    starts = sorted(batch[:, 0].tolist())
    assert starts == list(range(0, 100, 10))
    for row in batch:
        assert torch.equal(row, torch.arange(row[0], row[0] + 11))


def test_batches_are_deterministic_and_cover_each_epoch_once():
    tokens = torch.arange(1000, dtype=torch.int32)
    stream, same, other = (TokenBatches(tokens, 4, 9, seed=s) for s in (0, 0, 1))  # 111 windows, 27 batches/epoch
    first = [stream.next_batch() for _ in range(27)]
    assert all(torch.equal(a, same.next_batch()) for a in first)
    assert not torch.equal(torch.stack(first), torch.stack([other.next_batch() for _ in range(27)]))
    seen = torch.cat([b[:, 0] for b in first]).tolist()
    assert len(set(seen)) == len(seen) == 108  # no repeats; the 3 left over are dropped
    assert stream.state_dict()["epoch"] == 0
    next_epoch = stream.next_batch()
    assert stream.state_dict()["epoch"] == 1
    assert not torch.equal(next_epoch, first[0])  # a new order


def test_resume_gives_exactly_the_same_batches():
    tokens = torch.randint(0, 300, (5000,), dtype=torch.int32)
    original = TokenBatches(tokens, batch_size=8, seq_len=16, seed=3)
    for _ in range(50):  # past an epoch boundary (294 windows = 36 batches)
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))
    resumed = TokenBatches(tokens, batch_size=8, seq_len=16, seed=3)
    resumed.load_state_dict(state)
    for _ in range(40):
        assert torch.equal(original.next_batch(), resumed.next_batch())


def test_resume_with_other_data_is_an_error():
    state = TokenBatches(torch.arange(500), 2, 10).state_dict()
    with pytest.raises(MtpdError, match="same data"):
        TokenBatches(torch.arange(600), 2, 10).load_state_dict(state)


def test_ranks_split_the_global_batch_of_a_single_process():
    tokens = torch.randint(0, 300, (4000,), dtype=torch.int32)
    single = TokenBatches(tokens, batch_size=6, seq_len=12, seed=7)
    ranks = [TokenBatches(tokens, batch_size=3, seq_len=12, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):  # 333 windows = 27 global batches: crosses an epoch
        global_batch = single.next_batch()
        shards = [rank.next_batch() for rank in ranks]
        assert torch.equal(shards[0], global_batch[0::2]) and torch.equal(shards[1], global_batch[1::2])


def test_too_few_tokens_is_a_one_line_error():
    with pytest.raises(MtpdError, match="fewer than one training window of seq_len\\+1=65") as error:
        TokenBatches(torch.arange(64), batch_size=1, seq_len=64)
    assert_one_line(error)
    with pytest.raises(MtpdError, match="fewer than one batch of 8") as error:
        TokenBatches(torch.arange(65 * 4), batch_size=4, seq_len=64, world_size=2)
    assert_one_line(error)


def test_validation_windows_are_evenly_spaced_and_fixed():
    tokens = torch.arange(1001, dtype=torch.int32)  # 100 windows of 11
    windows = validation_windows(tokens, seq_len=10, max_windows=4)
    assert windows.dtype == torch.long and windows.shape == (4, 11)
    assert windows[:, 0].tolist() == [0, 250, 500, 750]
    assert torch.equal(windows, validation_windows(tokens, seq_len=10, max_windows=4))
    assert validation_windows(tokens, seq_len=10, max_windows=1000).shape == (100, 11)
    with pytest.raises(MtpdError, match="validation split has 5 tokens"):
        validation_windows(tokens[:5], seq_len=10, max_windows=4)


@pytest.mark.parametrize("val_fraction", [0, 1, -0.1, 1.5])
def test_val_fraction_must_be_a_fraction(tmp_path, val_fraction):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(MtpdError, match="val_fraction"):
        load_corpus(str(tmp_path / "a.txt"), val_fraction=val_fraction)
