import pytest
import torch

from mtpd.config import preset
from mtpd.model import MTPModel

# Tests use micro models, which gain nothing from a second thread; one thread also keeps a shared
# machine responsive.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Tokenizer and token caches go to a per-test directory."""
    monkeypatch.setenv("MTPD_CACHE", str(tmp_path / "cache"))


def micro_model(heads: int = 2, seed: int = 0, **overrides) -> MTPModel:
    torch.manual_seed(seed)
    return MTPModel(preset("micro", mtp_heads=heads, **overrides)).eval()


SAMPLE_TEXT = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
'''


@pytest.fixture
def corpus_dir(tmp_path):
    """A small code corpus: a few dozen files, enough for a tokenizer and train/val windows."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        (root / f"module_{i}.py").write_text(SAMPLE_TEXT.replace("fibonacci", f"fib_{i}") * 3)
    return root
