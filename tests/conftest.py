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


def markov_tokens(n: int, seed: int, p_first: float = 0.8) -> torch.Tensor:
    """A low-entropy order-1 chain: each token has 2 likely successors, so heads can learn to draft."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, 40, (40, 2), generator=g)
    tokens = [0]
    for _ in range(n - 1):
        options = successors[tokens[-1]]
        tokens.append(int(options[0] if torch.rand((), generator=g) < p_first else options[1]))
    return torch.tensor(tokens)


def train_micro(stream: torch.Tensor, steps: int) -> MTPModel:
    """A micro model with 4 heads trained with plain CE on windows of `stream`."""
    torch.manual_seed(0)
    model = micro_model(heads=4).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        starts = torch.randint(0, len(stream) - 65, (16,))
        window = torch.stack([stream[s:s + 65] for s in starts.tolist()])
        main_logits, head_logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(main_logits.flatten(0, 1), window[:, 1:].flatten())
        for k, logits in enumerate(head_logits, start=1):
            loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, k + 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def trained_model():
    """A micro model with 4 heads trained for a few seconds: drafts are accepted often, not always."""
    return train_micro(markov_tokens(20000, seed=1), 150)


@pytest.fixture(scope="session")
def uncertain_model():
    """Trained briefly on a 55/45 chain: main model and heads often disagree on the top token and agree on
    the second, so tree branches other than the top-1 chain get accepted too."""
    return train_micro(markov_tokens(20000, seed=1, p_first=0.55), 80)


def assert_greedy_lossless(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                           **speculative) -> list[int]:
    """Greedy speculative decoding equals greedy autoregressive decoding token for token, one prompt at a time
    and `batch_size` prompts at a time; returns the drafts accepted per step of the one-at-a-time runs."""
    from mtpd.decode import autoregressive_generate, speculative_generate

    reference = autoregressive_generate(model.main, prompts, max_new_tokens).tokens
    accepted = []
    for prompt, expected in zip(prompts, reference):
        result = speculative_generate(model, [prompt], max_new_tokens, **speculative)
        assert result.tokens[0] == expected
        accepted += result.accepted
    for start in range(0, len(prompts), batch_size):  # rows of different lengths
        result = speculative_generate(model, prompts[start:start + batch_size], max_new_tokens, **speculative)
        assert result.tokens == reference[start:start + batch_size]
    return accepted


# Chi-squared quantiles at p = 0.001 by degrees of freedom (30.0 beyond 9: the quantile at 10 is 29.59).
CHI2_CRITICAL_P001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


def assert_samples_like_the_main_model(model: MTPModel, prompt: list[int], new_tokens: int, positions: tuple[int, ...],
                                       device: str | torch.device = "cpu", **speculative) -> None:
    """400 speculative samples (temperature 1.5) and 400 of the main model alone, from one prompt: the tokens at
    each of `positions` (after drafting) are alike by a two-sample chi-squared test over the tokens seen >= 10
    times, at p = 0.001. Fixed seeds, so the test is deterministic."""
    from mtpd.decode import SpeculativeSampling, autoregressive_generate, speculative_generate

    prompts, rule = [prompt] * 400, SpeculativeSampling(temperature=1.5)  # rows sample independently
    spec = speculative_generate(model, prompts, new_tokens, rule, generator=torch.Generator(device).manual_seed(1),
                                **speculative).tokens
    ar = autoregressive_generate(model.main, prompts, new_tokens, rule,
                                 generator=torch.Generator(device).manual_seed(2)).tokens
    for i in positions:
        a, b = [t[i] for t in spec], [t[i] for t in ar]
        tokens = sorted({t for t in a + b if a.count(t) + b.count(t) >= 10})
        stat = sum((a.count(t) - b.count(t)) ** 2 / (a.count(t) + b.count(t)) for t in tokens)
        assert stat < CHI2_CRITICAL_P001.get(len(tokens) - 1, 30.0), f"token {i}: chi-squared {stat:.1f}"


def prompts_from(stream: torch.Tensor, lengths: list[int]) -> list[list[int]]:
    out, at = [], 0
    for n in lengths:
        out.append(stream[at:at + n].tolist())
        at += n + 7
    return out


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


def run(capsys, *argv) -> tuple[int, str, str]:
    """The CLI in-process: (exit status, stdout, stderr)."""
    from mtpd.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit status 2, no traceback, and one `error: ...` line holding every fragment."""
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
