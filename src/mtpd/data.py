"""Corpora, tokenizer and batching: everything between files on disk and [batch, seq_len + 1] token windows.

    load_corpus -> load_or_train_tokenizer -> encode_documents -> TokenBatches (train) / validation_windows (eval)

Everything is deterministic without global random state: the train/val split hashes document names, and
batch order comes from a generator seeded with (seed, epoch). The two slow steps, tokenizer training and
encoding, are cached on disk under names derived from content hashes, so a second run skips both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mtpd.atomic import atomic_file
from mtpd.errors import MtpdError, first_line

DEFAULT_EXTENSIONS = (
    ".txt", ".md", ".rst", ".tex",
    ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs", ".sh",
    ".html", ".css", ".toml", ".yaml", ".yml",
)  # fmt: skip
EOS_TOKEN = "<|endoftext|>"
# End-of-text names used by other tokenizer families, tried in order when a loaded tokenizer lacks EOS_TOKEN.
_EOS_NAMES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
_BYTE_LEVEL_MIN_VOCAB = 256 + 1  # every byte is a base token, plus EOS

# BPE training time grows with the text it sees; 8 MB gives a representative vocabulary in seconds on 2 cores.
_TOKENIZER_SAMPLE_CHARS = 8_000_000
# Documents longer than this are encoded as several pieces, so that encode_batch uses every core and the
# per-token bookkeeping of the `tokenizers` library (~100 bytes a token) stays bounded for a huge file.
_ENCODE_PIECE_CHARS = 1_000_000
_ENCODE_BATCH_CHARS = 4_000_000
_BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Corpus:
    name: str  # "stdlib" or the path given
    train: list[str] = field(repr=False)  # documents; repr=False so printing a corpus doesn't print 30 MB
    val: list[str] = field(repr=False)
    fingerprint: str  # hex digest of the content and the split, stable across runs and machines


# ---------------------------------------------------------------------------------------------- corpus


def load_corpus(
    path: str | None = None, val_fraction: float = 0.02, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
) -> Corpus:
    """Read documents from a text file, a directory, a .jsonl file, or (path=None) the Python standard library.

    A document goes to validation when the hash of its name (relative path, or line number for .jsonl)
    falls below val_fraction, so adding a file never moves the others between splits.
    """
    if not 0 < val_fraction < 1:
        raise MtpdError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    documents = _stdlib_documents() if path is None else _read_path(Path(path), extensions)
    documents = [(key, text) for key, text in documents if text.strip()]
    if not documents:
        raise MtpdError(_empty_corpus_message(path, extensions))
    train, val = _split(documents, val_fraction)
    return Corpus("stdlib" if path is None else str(path), train, val, _fingerprint(train, val, val_fraction))


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents() -> list[tuple[str, str]]:
    # site-packages / dist-packages hold installed third-party code that differs per machine: not the stdlib.
    return _read_tree(_stdlib_root(), (".py",), skip_dirs={"site-packages", "dist-packages"})


def _read_path(path: Path, extensions: tuple[str, ...]) -> list[tuple[str, str]]:
    if not path.exists():
        raise MtpdError(
            f"data path '{path}' does not exist: pass --data FILE|DIR|JSONL, "
            "or omit --data to use the Python standard library"
        )
    if path.is_dir():
        return _read_tree(path, extensions)
    text = _read_text(path)
    if text is None:
        raise MtpdError(
            f"'{path}' is not UTF-8 text (binary, or another encoding): "
            "pass a UTF-8 text file, a directory of text files, or a .jsonl file"
        )
    if path.suffix.lower() == ".jsonl":
        return _parse_jsonl(path, text)
    return [(path.name, text)]


def _read_tree(root: Path, extensions: Iterable[str], skip_dirs: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(relative path, text) of every text file under root with a wanted suffix, in sorted order."""
    suffixes, skip_dirs = {ext.lower() for ext in extensions}, set(skip_dirs)
    documents = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning dirnames in place stops os.walk from descending; sorting it makes the walk order stable.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip_dirs)
        for filename in sorted(filenames):
            file = Path(dirpath, filename)
            if filename.startswith(".") or file.suffix.lower() not in suffixes:
                continue
            try:
                text = _read_text(file)
            except OSError:  # unreadable or a dangling link: one bad file shouldn't stop a directory scan
                continue
            if text is not None:
                documents.append((file.relative_to(root).as_posix(), text))
    return documents


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is binary (NUL bytes near the start) or not valid UTF-8."""
    data = path.read_bytes()
    if b"\0" in data[:_BINARY_SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_jsonl(path: Path, text: str) -> list[tuple[str, str]]:
    documents = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends, which splitlines breaks on.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MtpdError(
                f"{path} line {line_number} is not valid JSON ({error.msg}): "
                'each line must be an object like {"text": "..."}'
            ) from None
        document = record.get("text") if isinstance(record, dict) else None
        if not isinstance(document, str):
            raise MtpdError(
                f'{path} line {line_number} has no string "text" field: '
                'each line must be an object like {"text": "..."}'
            )
        documents.append((f"line {line_number}", document))
    return documents


def _empty_corpus_message(path: str | None, extensions: tuple[str, ...]) -> str:
    if path is None:
        return f"found no Python files in the standard library at '{_stdlib_root()}': pass --data FILE|DIR|JSONL"
    if Path(path).is_dir():
        return (
            f"no documents found under '{path}': searched for non-empty UTF-8 files ending in "
            f"{' '.join(extensions)} (hidden directories skipped); pass other --data, or a .jsonl file"
        )
    return f"'{path}' contains no text (empty or only whitespace): pass --data FILE|DIR|JSONL with some text"


def _split(documents: list[tuple[str, str]], val_fraction: float) -> tuple[list[str], list[str]]:
    if len(documents) == 1:
        # One document can't be split by name: hold out its last val_fraction of characters instead.
        text = documents[0][1]
        cut = min(len(text) - 1, max(1, round(len(text) * (1 - val_fraction))))
        return [text[:cut]], [text[cut:]]
    scores = [_unit_hash(key) for key, _ in documents]
    in_val = [score < val_fraction for score in scores]
    # Small corpora may hash every document to one side; move the nearest-to-threshold one across.
    if not any(in_val):
        in_val[scores.index(min(scores))] = True
    if all(in_val):
        in_val[scores.index(max(scores))] = False
    train = [text for (_, text), held_out in zip(documents, in_val) if not held_out]
    val = [text for (_, text), held_out in zip(documents, in_val) if held_out]
    return train, val


def _unit_hash(key: str) -> float:
    """A number in [0, 1) from key."""
    return _stable_hash(key) / 2**64


def _stable_hash(key: str) -> int:
    """A 64-bit number from key; unlike hash(), the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def _fingerprint(train: list[str], val: list[str], val_fraction: float) -> str:
    digest = hashlib.sha256(f"val_fraction={val_fraction}".encode())
    for split, texts in (("train", train), ("val", val)):
        digest.update(f"{split}:{len(texts)}".encode())
        for text in texts:
            data = text.encode()
            digest.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab", "c"] != ["a", "bc"]
            digest.update(data)
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: any string encodes (no unknown tokens) and decode(encode(text)) == text exactly."""
    if vocab_size < _BYTE_LEVEL_MIN_VOCAB:
        raise MtpdError(
            f"vocab size {vocab_size} is too small: byte-level BPE needs at least {_BYTE_LEVEL_MIN_VOCAB} "
            f"(256 bytes + {EOS_TOKEN})"
        )
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would be added on encode but kept on decode, breaking round trips.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those absent from texts
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_or_train_tokenizer(
    corpus: Corpus, vocab_size: int, tokenizer_path: str | None = None, cache_dir: Path | None = None
) -> Tokenizer:
    """The tokenizer at tokenizer_path, else the one cached for (corpus, vocab_size), else a freshly trained one.

    Training sees only the train split. The result may have fewer than vocab_size tokens when the corpus is
    tiny: read tokenizer.get_vocab_size().
    """
    if tokenizer_path is not None:
        tokenizer = _load_tokenizer_file(Path(tokenizer_path))
    else:
        cached = _cache_root(cache_dir) / "tokenizers" / f"{corpus.fingerprint}-v{vocab_size}.json"
        if cached.exists():
            tokenizer = Tokenizer.from_file(str(cached))
        else:
            tokenizer = train_tokenizer(_training_sample(corpus.train, _TOKENIZER_SAMPLE_CHARS), vocab_size)
            with atomic_file(cached) as tmp:
                tokenizer.save(str(tmp))
    eos_id(tokenizer)  # fail here, before any training, when there is no end-of-text token
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    """Id of the end-of-text token that separates documents."""
    for name in _EOS_NAMES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    raise MtpdError(
        f"tokenizer has no end-of-text token (looked for {' '.join(_EOS_NAMES)}): "
        "add one of them as a special token, or omit the tokenizer to train one"
    )


def _load_tokenizer_file(path: Path) -> Tokenizer:
    if path.is_dir():  # a Hugging Face model directory
        path = path / "tokenizer.json"
    if not path.is_file():
        raise MtpdError(
            f"tokenizer file '{path}' does not exist: pass a Hugging Face tokenizer.json, "
            "or omit it to train a tokenizer on the corpus"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises plain Exception for unparsable files
        reason = first_line(error)
        raise MtpdError(f"cannot read tokenizer '{path}' ({reason}): pass a Hugging Face tokenizer.json") from None


def _training_sample(texts: list[str], max_chars: int) -> list[str]:
    """About max_chars of text, taken as every k-th document so it spans the whole corpus, not its first files."""
    stride = max(1, -(-sum(map(len, texts)) // max_chars))
    sample, room = [], max_chars
    for text in texts[::stride]:
        if room <= 0:
            break
        sample.append(text[:room])
        room -= len(sample[-1])
    return sample


# -------------------------------------------------------------------------------------------- encoding


def encode_documents(tokenizer: Tokenizer, texts: list[str], cache_path: Path | None = None) -> torch.Tensor:
    """All documents' token ids in one 1-D int32 tensor, each document followed by the EOS token.

    With cache_path, the tokens are loaded from it when it exists and saved to it otherwise; the path
    alone is the key, so build it with token_cache_path.
    """
    if cache_path is not None and cache_path.exists():
        return torch.from_numpy(np.load(cache_path).astype(np.int32))
    eos = eos_id(tokenizer)
    pieces, ends_document = [], []
    for text in texts:
        text_pieces = _encoding_pieces(text, _ENCODE_PIECE_CHARS)
        pieces += text_pieces
        ends_document += [False] * (len(text_pieces) - 1) + [True]
    ids = []
    for start, stop in _batch_bounds(pieces, _ENCODE_BATCH_CHARS):
        # add_special_tokens=False: a loaded tokenizer's post-processor (e.g. one adding BOS) must not
        # insert tokens; documents are delimited by EOS alone.
        encodings = tokenizer.encode_batch(pieces[start:stop], add_special_tokens=False)
        for encoding, ends in zip(encodings, ends_document[start:stop]):
            ids.append(np.asarray(encoding.ids + [eos] if ends else encoding.ids, dtype=np.int32))
    tokens = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    if cache_path is not None:
        # uint16 halves the file for the usual vocabularies; ids are always < get_vocab_size().
        stored = tokens.astype(np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.int32)
        with atomic_file(cache_path) as tmp, open(tmp, "wb") as file:
            np.save(file, stored)
    return torch.from_numpy(tokens)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hex digest of the exact tokenizer (vocabulary, merges, normalisation)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def token_cache_path(corpus: Corpus, tokenizer: Tokenizer, split: str, cache_dir: Path | None = None) -> Path:
    """Where encode_documents caches one split: keyed by the corpus content and the exact tokenizer."""
    return _cache_root(cache_dir) / "tokens" / f"{corpus.fingerprint}-{tokenizer_fingerprint(tokenizer)}-{split}.npy"


# A line break with non-space on both sides. Byte-level BPE pre-tokens never span it, so cutting a document
# just after it gives exactly the tokens of the uncut document. (For other tokenizer families a cut may
# change a token or two at the seam, which is harmless for training.)
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def _encoding_pieces(text: str, max_chars: int) -> list[str]:
    """text cut after safe line breaks into pieces of about max_chars (longer where no safe break exists)."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = _SAFE_CUT.search(text, start + max_chars)
        if cut is None:
            break
        pieces.append(text[start : cut.end()])
        start = cut.end()
    pieces.append(text[start:])
    return pieces


def _batch_bounds(pieces: list[str], max_chars: int) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges of consecutive pieces holding about max_chars each."""
    start, chars = 0, 0
    for index, piece in enumerate(pieces):
        chars += len(piece)
        if chars >= max_chars:
            yield start, index + 1
            start, chars = index + 1, 0
    if start < len(pieces):
        yield start, len(pieces)


# -------------------------------------------------------------------------------------------- batching


class TokenBatches:
    """Deterministic, resumable stream of training windows [batch_size, seq_len + 1] from a 1-D token tensor.

    Window i is tokens[i * seq_len : i * seq_len + seq_len + 1]: neighbours share one token, which is a
    target at the end of one window and an input at the start of the next, so no token is wasted. Each
    epoch visits the windows in a fresh order (a permutation seeded by (seed, epoch)) in global batches of
    batch_size * world_size, dropping the incomplete last one. Rank r takes rows r, r + world_size, ... of
    each global batch, so world_size ranks together see exactly what one process with the global batch
    size would see.
    """

    def __init__(
        self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if tokens.numel() < seq_len + 1:
            raise MtpdError(
                f"corpus has {tokens.numel()} tokens, fewer than one training window of seq_len+1={seq_len + 1}; "
                "use more data or a smaller --seq-len"
            )
        self.windows = tokens.unfold(0, seq_len + 1, seq_len)  # a view: [num_windows, seq_len + 1]
        self.global_batch_size = batch_size * world_size
        if len(self.windows) < self.global_batch_size:
            raise MtpdError(
                f"corpus has {tokens.numel()} tokens = {len(self.windows)} windows of seq_len+1={seq_len + 1}, "
                f"fewer than one batch of {self.global_batch_size}; use more data, a smaller --batch-size "
                "or a smaller --seq-len"
            )
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0  # position: windows of this epoch's order already handed out
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def next_batch(self) -> torch.Tensor:
        if self.position + self.global_batch_size > len(self.windows):
            self.epoch, self.position = self.epoch + 1, 0
        global_batch = self._epoch_order()[self.position : self.position + self.global_batch_size]
        self.position += self.global_batch_size
        return self.windows[global_batch[self.rank :: self.world_size]].long()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_windows"] != len(self.windows):
            raise MtpdError(
                f"the checkpoint's data stream had {state['num_windows']} windows but this one has "
                f"{len(self.windows)}: resume with the same data, tokenizer and --seq-len"
            )
        self.epoch, self.position = state["epoch"], state["position"]

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            # Hash (seed, epoch) into one seed: torch's CPU generator keeps only its low 32 bits, so
            # packing them as (seed << 32) + epoch would give every seed the same order.
            generator = torch.Generator().manual_seed(_stable_hash(f"seed={self.seed} epoch={self.epoch}"))
            self._order = torch.randperm(len(self.windows), generator=generator)
            self._order_epoch = self.epoch
        return self._order


def validation_windows(tokens: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Up to max_windows windows [n, seq_len + 1] evenly spaced over tokens: the same every call."""
    if tokens.numel() < seq_len + 1:
        raise MtpdError(
            f"validation split has {tokens.numel()} tokens, fewer than one window of seq_len+1={seq_len + 1}; "
            "use more data or a smaller --seq-len"
        )
    windows = tokens.unfold(0, seq_len + 1, seq_len)
    count = min(max_windows, len(windows))
    return windows[torch.arange(count) * len(windows) // max(count, 1)].long()


# ---------------------------------------------------------------------------------------------- caching


def cache_root() -> Path:
    """Where mtpd keeps what it derives between runs: $MTPD_CACHE, else ~/.cache/mtpd (or XDG_CACHE_HOME's)."""
    return _cache_root(None)


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("MTPD_CACHE"):
        return Path(os.environ["MTPD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtpd"
