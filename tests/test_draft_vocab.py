"""The draft vocabulary (model/draft_vocab.py): heads that score only the N most frequent training tokens keep
decoding lossless (greedy: token for token, chain and tree; sampling: in distribution), train on the loss
defined over V', and keep their id map through checkpoints, extension, casts and training of W_out."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import assert_greedy_lossless, assert_samples_like_the_main_model, micro_model
from mtpd.checkpoint import (CONFIG_FILE, FORMAT, FORMAT_VERSION, HEADS_FILE, head_tensors, load_checkpoint,
                             load_weights, save_checkpoint)
from mtpd.config import LossConfig
from mtpd.data import train_tokenizer
from mtpd.decode import SpeculativeSampling, autoregressive_generate, speculative_generate
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_draft import DynamicTree, StaticTree
from mtpd.errors import MtpdError
from mtpd.evaluate import evaluate
from mtpd.losses import mtp_d_loss
from mtpd.model import MTPModel
from mtpd.model.draft_vocab import DraftVocab, most_frequent_tokens, resolve_draft_vocab
from mtpd.train import Trainer, TrainConfig
from test_cli import MICRO, assert_one_line_error, run


def with_draft_vocab(model: MTPModel, ids: torch.Tensor) -> MTPModel:
    """The same weights, with heads that score only `ids`."""
    reduced = MTPModel(dataclasses.replace(model.cfg, draft_vocab=len(ids)))
    missing, unexpected = reduced.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["draft_vocab.ids"] and not unexpected
    reduced.draft_vocab.assign(ids)
    return reduced.eval()


@pytest.fixture(scope="module")
def reduced_model(trained_model):
    """The trained micro model (tokens 0..39 of 320) with heads that score 12 of its 40 tokens plus 20 tokens it
    never sees: many drafts it would make are impossible, so drafts are both accepted and rejected."""
    torch.manual_seed(5)
    ids = torch.cat([torch.randperm(40)[:12], 40 + torch.randperm(280)[:20]])[torch.randperm(32)]
    return with_draft_vocab(trained_model, ids)


def test_most_frequent_tokens_break_ties_by_id_and_report_coverage():
    ids, coverage = most_frequent_tokens(torch.tensor([3, 3, 5, 1, 1, 2, 4]), vocab_size=6, n=3)
    assert ids.tolist() == [1, 3, 2] and coverage == pytest.approx(5 / 7)


def test_default_keeps_small_vocabularies_whole_and_bad_sizes_are_errors():
    assert resolve_draft_vocab(None, 4096) == 0 and resolve_draft_vocab(None, 49152) == 8192
    assert resolve_draft_vocab(320, 320) == 0 and resolve_draft_vocab(100, 320) == 100
    for bad in (0, -1, 321):
        with pytest.raises(MtpdError, match="--draft-vocab must be between 1 and the vocabulary size 320"):
            resolve_draft_vocab(bad, 320)


def test_full_vocabulary_is_the_identity_and_adds_no_tensors():
    model = micro_model()
    assert model.draft_ids is None and not any(k.startswith("draft_vocab") for k in model.state_dict())
    h, x = torch.randn(2, 3, 32), torch.arange(6).view(2, 3)
    assert torch.equal(model.draft_logits(1, h), model.main.project(model.heads[0].norm(h)))
    assert model.to_token_ids(x) is x and model.to_draft_indices(x) is x


def test_mapping_between_draft_indices_token_ids_and_full_distributions():
    vocab = DraftVocab(6, 3)
    vocab.assign(torch.tensor([4, 1, 2]))
    assert vocab.to_token_ids(torch.tensor([[2, 0]])).tolist() == [[2, 4]]
    assert vocab.to_draft_indices(torch.tensor([0, 1, 2, 3, 4, 5])).tolist() == [-1, 1, 2, -1, 0, -1]
    full = vocab.to_full_probs(torch.tensor([[0.5, 0.25, 0.25]]))
    assert full.tolist() == [[0.0, 0.25, 0.25, 0.0, 0.5, 0.0]]
    with pytest.raises(ValueError):
        vocab.assign(torch.tensor([4, 4, 2]))


def test_draft_logits_follow_a_cast_and_a_training_step_of_w_out():
    torch.manual_seed(0)
    model = micro_model(draft_vocab=16)
    model.draft_vocab.assign(torch.randperm(320)[:16])
    h = torch.randn(1, 2, 32)

    def expected(m):
        return F.linear(m.heads[0].norm(h.to(m.main.lm_head.weight.dtype)), m.main.lm_head.weight[m.draft_ids])

    with torch.no_grad():
        assert torch.equal(model.draft_logits(1, h), expected(model))
        model.main.lm_head.weight.add_(0.5)  # an optimizer step changes W_out in place
        assert torch.equal(model.draft_logits(1, h), expected(model))
        model.draft_vocab.assign(torch.arange(16))
        assert torch.equal(model.draft_logits(1, h), expected(model))
        model.to(torch.bfloat16)
        assert model.draft_ids.dtype == torch.long
        assert torch.equal(model.draft_logits(1, h.bfloat16()), expected(model))
    model.float().train()  # with gradients the heads' loss reaches W_out
    model.draft_logits(1, h).sum().backward()
    assert model.main.lm_head.weight.grad[:16].abs().sum() > 0 and model.main.lm_head.weight.grad[16:].eq(0).all()


PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7], [30], [9, 9, 9, 9], [12, 7]]


@pytest.mark.parametrize("num_heads", [1, 4])
def test_greedy_chain_with_a_draft_vocabulary_equals_autoregressive(trained_model, reduced_model, num_heads):
    accepted = assert_greedy_lossless(reduced_model, PROMPTS, 24, batch_size=3, num_heads=num_heads)
    full = speculative_generate(trained_model, PROMPTS, 24, num_heads=num_heads).accepted
    assert 0 < sum(accepted) < sum(full)  # drafts were accepted, and drafts outside V' were impossible


def test_a_draft_vocabulary_holding_every_token_the_heads_propose_drafts_the_same(trained_model):
    """V' = the 40 tokens the model knows, shuffled, plus 24 others: the drafts (mapped back to token ids) and so
    the accepted counts are those of the full vocabulary, step for step."""
    torch.manual_seed(3)
    ids = torch.cat([torch.randperm(40), 40 + torch.randperm(280)[:24]])[torch.randperm(64)]
    reduced = with_draft_vocab(trained_model, ids)
    for num_heads in (1, 4):
        full = speculative_generate(trained_model, PROMPTS, 24, num_heads=num_heads)
        mapped = speculative_generate(reduced, PROMPTS, 24, num_heads=num_heads)
        assert mapped.tokens == full.tokens and mapped.accepted == full.accepted and sum(full.accepted) > 0


@pytest.mark.parametrize("drafter", [StaticTree(TreeShape.parse("0 1 2 0.0 0.1 1.0 0.0.0 0.0.0.0")),
                                     DynamicTree(depth=3, width=2, children=2, nodes=6)], ids=["static", "dynamic"])
def test_greedy_trees_with_a_draft_vocabulary_equal_autoregressive(reduced_model, drafter):
    prompts = [[5, 17, 3, 8], [1, 2, 3, 4, 5, 6, 7], [30, 2, 2, 2, 1], [12, 7, 7, 7]]
    accepted = assert_greedy_lossless(reduced_model, prompts, 24, batch_size=2, drafter=drafter)
    assert sum(accepted) > 0


def test_a_tree_cannot_take_more_ranks_than_the_draft_vocabulary_has(reduced_model):
    with pytest.raises(MtpdError, match="draft vocabulary has 32 tokens"):
        speculative_generate(reduced_model, [[1, 2, 3, 4, 5]], 4, drafter=StaticTree(TreeShape.parse("0 32")))


CHI2_CRITICAL_DF5_P001 = 20.515  # chi-squared quantile, 5 degrees of freedom, p = 0.001


def test_speculative_sampling_with_a_draft_vocabulary_preserves_the_target_distribution():
    """The draft vocabulary leaves out tokens 0 and 1, which carry 63% of the target's mass: the drafts can never
    be them, yet the emitted tokens follow p, since q (zero outside V') is a valid proposal."""
    g = torch.Generator().manual_seed(1234)
    V, N, draws = 6, 4, 60000
    vocab = DraftVocab(V, N)
    vocab.assign(torch.tensor([5, 2, 4, 3]))
    target_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    rule = SpeculativeSampling(temperature=1.0)
    p = rule.probs(target_logits)
    q = rule.probs(torch.tensor([-1.0, 2.5, 0.3, 1.0]))  # over the draft vocabulary
    for num_drafts in (1, 3):
        drafts = vocab.to_token_ids(torch.multinomial(q.expand(draws, N), num_drafts, replacement=True, generator=g))
        accepted, next_token = rule.verify(drafts, vocab.to_full_probs(q).expand(draws, num_drafts, V),
                                           target_logits.expand(draws, num_drafts + 1, V), generator=g)
        first = torch.where(accepted > 0, drafts[:, 0], next_token)
        counts = torch.bincount(first, minlength=V).float()
        assert float(((counts - p * draws) ** 2 / (p * draws)).sum()) < CHI2_CRITICAL_DF5_P001
        assert counts[:2].sum() / draws == pytest.approx(float(p[:2].sum()), abs=0.01)


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_speculative_sampling_end_to_end_with_a_draft_vocabulary(reduced_model, threshold):
    """Distribution of the 2nd generated token (after drafting) matches plain sampling from the main model."""
    assert_samples_like_the_main_model(reduced_model, [5, 17, 3], 2, positions=(1,), draft_threshold=threshold)


def test_loss_over_the_draft_vocabulary_by_hand():
    """V = 6, V' = (4, 1, 2); one head. Its CE leaves out targets outside V'; its KL is over V' (teacher restricted
    to V', then to its top-N there, both renormalised)."""
    torch.manual_seed(0)
    ids = torch.tensor([4, 1, 2])
    window = torch.tensor([[0, 1, 5, 2]])  # head 1 targets t_{i+2}: 5 (outside V'), 2 (draft index 2)
    main_logits, head_logits = torch.randn(1, 3, 6), torch.randn(1, 2, 3)

    def log_softmax(values):
        total = math.log(sum(math.exp(v) for v in values))
        return [v - total for v in values]

    def kl(teacher, student):
        q, r = log_softmax(teacher), log_softmax(student)
        return sum(math.exp(a) * (a - b) for a, b in zip(q, r))

    terms = mtp_d_loss(window, main_logits, [head_logits], LossConfig(beta=1.0), top_n=10, draft_ids=ids)
    assert terms.head_ce[0].item() == pytest.approx(-log_softmax(head_logits[0, 1].tolist())[2], rel=1e-5)
    teacher = main_logits[0, 1:, ids]  # the main head at i + 1, on V'
    by_hand = [kl(teacher[i].tolist(), head_logits[0, i].tolist()) for i in range(2)]
    assert terms.head_kl[0].item() == pytest.approx(sum(by_hand) / 2, rel=1e-5)

    top2 = mtp_d_loss(window, main_logits, [head_logits], LossConfig(beta=1.0), top_n=2, draft_ids=ids)
    by_hand = []
    for i in range(2):
        support = teacher[i].topk(2).indices.tolist()  # draft indices
        by_hand.append(kl([teacher[i, s].item() for s in support], [head_logits[0, i, s].item() for s in support]))
    assert top2.head_kl[0].item() == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    assert top2.main_ce.item() == pytest.approx(F.cross_entropy(main_logits[0], window[0, 1:]).item())

    none_inside = mtp_d_loss(torch.tensor([[0, 1, 5, 3]]), main_logits, [head_logits], LossConfig(beta=0.0),
                             draft_ids=ids)
    assert none_inside.head_ce[0].item() == 0.0  # no target the head can propose: nothing to learn, not NaN


def test_evaluation_maps_the_heads_top_tokens(trained_model):
    """V' = every token but 7, in shuffled order: acceptance and CE are the full-vocabulary ones with token 7
    masked out of the heads' scores."""
    torch.manual_seed(0)
    ids = torch.tensor([t for t in torch.randperm(320).tolist() if t != 7])
    reduced = with_draft_vocab(trained_model, ids)
    windows = torch.randint(0, 40, (4, 33))
    windows[:, 10] = 7
    metrics = evaluate(reduced, windows)
    with torch.no_grad():
        main_logits, head_logits = trained_model(windows[:, :-1])
    for k, logits in enumerate(head_logits, start=1):
        masked = logits.clone()
        masked[..., 7] = float("-inf")
        top1 = masked.argmax(-1) == main_logits[:, k:].argmax(-1)
        assert metrics["offline_acceptance"][k - 1] == pytest.approx(top1.float().mean().item())
        targets = windows[:, k + 1:]
        inside = targets != 7
        ce = -masked.log_softmax(-1).gather(-1, targets[..., None])[..., 0][inside].mean()
        assert metrics["head_ce"][k - 1] == pytest.approx(ce.item(), rel=1e-4)


def test_id_map_round_trips_through_checkpoints_and_survives_extension(tmp_path, reduced_model):
    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n"], 300)
    save_checkpoint(tmp_path / "full", reduced_model, tokenizer, {})
    loaded = load_checkpoint(tmp_path / "full").model
    assert torch.equal(loaded.draft_ids, reduced_model.draft_ids) and loaded.cfg.draft_vocab == 32

    # A head-only checkpoint holds the heads and the ids, nothing of the main model.
    heads_only = tmp_path / "heads"
    heads_only.mkdir()
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": reduced_model.cfg.to_dict(),
              "backbone": {"type": "huggingface"}}
    (heads_only / CONFIG_FILE).write_text(json.dumps(config))
    save_file(head_tensors(reduced_model), str(heads_only / HEADS_FILE))
    assert "draft_vocab.ids" in head_tensors(reduced_model)
    fresh = MTPModel(reduced_model.cfg)  # placeholder ids
    load_weights(fresh, heads_only)
    assert torch.equal(fresh.draft_ids, reduced_model.draft_ids)

    loaded.extend_heads(8)
    assert torch.equal(loaded.draft_ids, reduced_model.draft_ids) and loaded.cfg.draft_vocab == 32
    h = torch.randn(1, 3, 32)
    assert torch.equal(loaded.draft_logits(5, h), loaded.draft_logits(1, h))  # head 5 is a copy of head 1


def test_training_with_a_draft_vocabulary_runs_and_resume_restores_the_map(tmp_path):
    from test_train import _snippet_tokenizer, snippet_stream

    tokenizer, stream = _snippet_tokenizer(), snippet_stream()
    ids, coverage = most_frequent_tokens(stream, tokenizer.get_vocab_size(), 40)
    assert 0.5 < coverage < 1
    cfg = TrainConfig(batch_size=4, seq_len=32, warmup_steps=1, max_steps=2, save_every=2, eval_every=10**6,
                      eval_windows=4)

    def trainer(seed: int, draft_ids: torch.Tensor) -> Trainer:
        model = micro_model(2, seed=seed, vocab_size=tokenizer.get_vocab_size(), draft_vocab=40)
        model.draft_vocab.assign(draft_ids)
        return Trainer(model.train(), tokenizer, stream, stream, cfg, LossConfig(), tmp_path / "run",
                       show_progress=False)

    metrics = trainer(0, ids).fit()
    assert all(math.isfinite(ce) and ce > 0 for ce in metrics["head_ce"])
    resumed = trainer(1, torch.arange(40))
    assert resumed.resume() and torch.equal(resumed.model.draft_ids, ids)


@pytest.mark.parametrize("flags, fragment", [
    (["--draft-vocab", "0"], "--draft-vocab must be between 1 and the vocabulary size 300 (got 0)"),
    (["--draft-vocab", "301"], "--draft-vocab must be between 1 and the vocabulary size 300 (got 301)"),
])
def test_bad_draft_vocab_is_one_line_before_any_work(tmp_path, capsys, flags, fragment):
    code, _, err = run(capsys, "train", *MICRO, "--max-steps", "1", "--out", tmp_path / "run", *flags)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_bad_draft_vocab_with_hf_is_one_line_before_the_model_loads(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--hf", tmp_path / "no-model", "--draft-vocab", "0", "--max-steps", "1",
                       "--out", tmp_path / "run")
    assert_one_line_error(code, err, "--draft-vocab must be >= 1 (got 0)")


def test_cli_training_and_extension_keep_the_draft_vocabulary(tmp_path, capsys):
    from conftest import SAMPLE_TEXT

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i}.py").write_text(SAMPLE_TEXT.replace("fibonacci", f"fib_{i}") * 3)
    code, out, _ = run(capsys, "train", *MICRO, "--data", corpus, "--max-steps", "2", "--draft-vocab", "64",
                       "--out", tmp_path / "run")
    assert code == 0 and "the heads score the 64 most frequent" in out
    trained = load_checkpoint(tmp_path / "run")
    assert trained.config["model"]["draft_vocab"] == 64 and 0 < trained.config["history"][0]["draft_coverage"] < 1
    assert run(capsys, "extend", "--ckpt", tmp_path / "run", "--to", "4", "--out", tmp_path / "ext", "--max-steps",
               "1", "--quiet")[0] == 0
    extended = load_checkpoint(tmp_path / "ext").model
    assert extended.num_heads == 4 and torch.equal(extended.draft_ids, trained.model.draft_ids)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # mtpd's decoder and the transformers adapter
def test_heads_on_a_hugging_face_model_with_a_draft_vocabulary(tmp_path, arch):
    pytest.importorskip("transformers")
    from conftest import SAMPLE_TEXT
    from hf_models import save_tiny_model
    from mtpd.run import train_heads

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i}.py").write_text(SAMPLE_TEXT.replace("fibonacci", f"fib_{i}") * 3)
    model_dir = save_tiny_model(tmp_path / arch, arch)
    cfg = TrainConfig(batch_size=4, seq_len=32, max_steps=2, eval_every=100, eval_windows=2, warmup_steps=1)
    train_heads(model_dir, 2, cfg, LossConfig(), tmp_path / "run", str(corpus), device="cpu", show_progress=False,
                log=lambda _: None, draft_vocab=48)
    checkpoint = load_checkpoint(tmp_path / "run")
    model = checkpoint.model
    assert model.cfg.draft_vocab == 48 and len(torch.unique(model.draft_ids)) == 48
    prompts = [checkpoint.tokenizer.encode("def fib(n):").ids, checkpoint.tokenizer.encode("x = 1").ids]
    reference = autoregressive_generate(model.main, prompts, 12).tokens
    assert speculative_generate(model, prompts, 12).tokens == reference
