"""Head-only training (docs/design.md §3.2): the fast path's loss is the reference objective's, the teacher
cache returns what the main model computes, head initialisation from the last block, and independent heads
(the parallel-heads baseline) train, save, load and decode losslessly."""

import json
import shutil

import pytest
import torch

from conftest import (assert_greedy_lossless, assert_samples_like_the_main_model, markov_tokens, micro_model,
                      prompts_from)
from hf_models import save_tiny_model
from mtpd import teacher_cache
from mtpd.config import LossConfig, preset
from mtpd.decode import speculative_generate
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_draft import StaticTree
from mtpd.errors import MtpdError
from mtpd.losses import heads_loss, mtp_d_loss
from mtpd.model import MTPModel
from mtpd.model.draft_vocab import draft_index_map
from mtpd.teacher_cache import TeacherCache
from mtpd.train import Trainer, TrainConfig

STREAM = markov_tokens(6000, seed=4)


def frozen_micro(heads: int = 3, draft_vocab: int = 0, **overrides) -> MTPModel:
    model = micro_model(heads=heads, draft_vocab=draft_vocab, **overrides)
    if draft_vocab:
        model.draft_vocab.assign(torch.randperm(model.cfg.vocab_size, generator=torch.Generator().manual_seed(0))
                                 [:draft_vocab])
    return model


def windows(n: int = 4, length: int = 33) -> torch.Tensor:
    return torch.stack([STREAM[i * 97:i * 97 + length] for i in range(n)]).long()


@pytest.mark.parametrize("draft_vocab", [0, 48])
@pytest.mark.parametrize("top_n", [None, 7])
@pytest.mark.parametrize("independent", [False, True])
def test_head_only_loss_equals_the_reference_objective(draft_vocab, top_n, independent):
    """The fast path (teacher scored over the draft vocabulary only, no main CE) gives mtp_d_loss's head terms."""
    model = frozen_micro(draft_vocab=draft_vocab, independent_heads=independent)
    window, cfg = windows(), LossConfig(beta=0.5, main_weight=0.0)
    main_logits, head_logits = model(window[:, :-1])
    reference = mtp_d_loss(window, main_logits, head_logits, cfg, top_n, model.draft_ids)
    teacher, fast_heads = model(window[:, :-1], main_scores="draft")
    ids = model.draft_ids
    fast = heads_loss(window, teacher, fast_heads, cfg, top_n, None if ids is None else draft_index_map(ids, 320))
    assert fast.main_ce is None
    torch.testing.assert_close(fast.total, reference.total, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast.head_ce + fast.head_kl, reference.head_ce + reference.head_kl):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_draft_teacher_is_the_full_main_head_restricted():
    model = frozen_micro(draft_vocab=48)
    tokens = windows()[:, :-1]
    full, _ = model(tokens)
    draft, _ = model(tokens, main_scores="draft")
    none, _ = model(tokens, main_scores="none")
    torch.testing.assert_close(draft, full[..., model.draft_ids], rtol=1e-5, atol=1e-5)
    assert none is None
    with pytest.raises(ValueError, match="main_scores"):
        model(tokens, main_scores="some")


def trainer(model: MTPModel, tmp_path, **train) -> Trainer:
    cfg = TrainConfig(batch_size=4, seq_len=32, max_steps=4, warmup_steps=1, eval_windows=2, freeze_main=True,
                      dtype="fp32", **train)
    return Trainer(model, None, STREAM[:4000], STREAM[4000:], cfg, LossConfig(beta=0.5), tmp_path, show_progress=False)


def test_the_trainers_head_only_step_is_the_reference_objective(tmp_path):
    model = frozen_micro(draft_vocab=48)
    t = trainer(model, tmp_path)
    window = windows()
    terms = t.loss(window)
    main_logits, head_logits = model(window[:, :-1])
    reference = mtp_d_loss(window, main_logits, head_logits, t.objective, t.top_n, model.draft_ids)
    torch.testing.assert_close(terms.total, reference.total, rtol=1e-5, atol=1e-6)
    assert "ce0" not in t.train_step()  # the frozen main head's CE is left to evaluation


def test_teacher_cache_returns_the_main_models_states_and_reads_them_back(tmp_path):
    model = frozen_micro()
    model.main.requires_grad_(False)
    tokens = windows()[:, :-1]
    cache = TeacherCache(model.main, None, tmp_path)
    first = cache.hidden_states(model.main, tokens)
    assert (cache.hits, cache.misses) == (0, 4)
    again = TeacherCache(model.main, None, tmp_path)  # a later run: reads every window
    mixed = torch.cat([tokens[:2], windows(6)[4:, :-1]])  # two windows seen, two new
    second = again.hidden_states(model.main, mixed)
    assert (again.hits, again.misses) == (2, 2)
    torch.testing.assert_close(first, model.main(tokens), rtol=0, atol=0)
    torch.testing.assert_close(second, model.main(mixed), rtol=0, atol=0)
    with torch.no_grad():
        model.main.norm.weight.add_(1.0)  # another model: other weights, another directory
    assert TeacherCache(model.main, None, tmp_path).directory != cache.directory
    assert TeacherCache(model.main, torch.bfloat16, tmp_path).directory != cache.directory


def test_teacher_cache_stores_nothing_on_a_nearly_full_disk(tmp_path, monkeypatch):
    model = frozen_micro()
    model.main.requires_grad_(False)
    tokens = windows()[:, :-1]
    monkeypatch.setattr(teacher_cache, "MIN_FREE_BYTES", shutil.disk_usage(tmp_path).free + (1 << 40))
    cache = TeacherCache(model.main, None, tmp_path)
    torch.testing.assert_close(cache.hidden_states(model.main, tokens), model.main(tokens), rtol=0, atol=0)
    assert (cache.misses, cache.unstored) == (4, 4) and not list(tmp_path.rglob("*.bin"))
    monkeypatch.setattr(teacher_cache, "MIN_FREE_BYTES", 0)  # room again: stored as before
    cache.hidden_states(model.main, tokens)
    assert (cache.misses, cache.unstored) == (8, 4) and len(list(tmp_path.rglob("*.bin"))) == 4


def test_training_with_the_teacher_cache_gives_the_same_losses(tmp_path):
    losses = []
    for run in ("plain", "cache-writes", "cache-reads"):
        t = trainer(frozen_micro(), tmp_path / run, teacher_cache=run != "plain")
        if t.teacher_cache is not None:
            t.teacher_cache.directory = tmp_path / "teacher"
        losses.append([t.train_step()["loss"] for _ in range(3)])
        if run == "cache-reads":
            assert t.teacher_cache.misses == 0 and t.teacher_cache.hits == 12
    assert losses[0] == losses[1] == losses[2]


def test_teacher_cache_needs_a_frozen_main_model(tmp_path):
    with pytest.raises(MtpdError, match="teacher-cache"):
        Trainer(frozen_micro(), None, STREAM[:4000], STREAM[4000:],
                TrainConfig(batch_size=4, seq_len=32, max_steps=1, teacher_cache=True), LossConfig(), tmp_path)


def test_last_block_init_copies_the_main_models_last_block_and_final_norm():
    model = frozen_micro()
    model.init_heads_from_last_block()
    last, norm = model.main.blocks[-1].state_dict(), model.main.norm.state_dict()
    for head in model.heads:
        assert all(torch.equal(head.block.state_dict()[k], v) for k, v in last.items())
        assert all(torch.equal(head.norm.state_dict()[k], v) for k, v in norm.items())
        assert head.block.attn.qkv.weight.data_ptr() != model.main.blocks[-1].attn.qkv.weight.data_ptr()  # copies


def test_last_block_init_is_refused_on_the_transformers_adapter(tmp_path):
    from mtpd.model.backbone import load_backbone

    backbone = load_backbone(save_tiny_model(tmp_path / "qwen", "qwen2"), log=lambda _: None)
    model = MTPModel(backbone.head_config(2), backbone)
    with pytest.raises(MtpdError, match="--head-init random"):
        model.init_heads_from_last_block()


# ------------------------------------------------------------------------------------- independent heads

def test_independent_heads_read_only_h0():
    """Head k at position i depends on t_<=i only: changing the tokens after i leaves its logits there alone
    (a cascaded head reads Emb(t_{i+k}) and changes)."""
    for independent in (True, False):
        model = frozen_micro(independent_heads=independent)
        tokens = windows(1)[:, :-1]
        changed = tokens.clone()
        changed[0, 11] = (changed[0, 11] + 1) % 40
        _, before = model(tokens)
        _, after = model(changed)
        unchanged = all(torch.equal(b[0, :11], a[0, :11]) for b, a in zip(before, after))
        assert unchanged == independent
    assert model.head_input(3) == 2 and frozen_micro(independent_heads=True).head_input(3) == 0
    head = frozen_micro(independent_heads=True).heads[0]
    assert head.embed_norm is None and head.proj.in_features == head.proj.out_features


@pytest.fixture(scope="module")
def independent_model():
    """A micro model with 4 independent heads trained jointly on a Markov chain, so drafts are often
    accepted."""
    torch.manual_seed(0)
    model = MTPModel(preset("micro", mtp_heads=4, independent_heads=True)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = markov_tokens(20000, seed=1)
    for _ in range(150):
        starts = torch.randint(0, len(stream) - 65, (16,))
        window = torch.stack([stream[s:s + 65] for s in starts.tolist()])
        main_logits, head_logits = model(window[:, :-1])
        mtp_d_loss(window, main_logits, head_logits, LossConfig(beta=0.0)).total.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_independent_heads_decode_greedy_losslessly(independent_model):
    prompts = prompts_from(markov_tokens(2000, seed=7), [5, 9, 14, 20])
    accepted = assert_greedy_lossless(independent_model, prompts, 24, batch_size=2)
    assert sum(accepted) / len(accepted) > 0.5  # the heads learned to draft
    assert_greedy_lossless(independent_model, prompts, 24, batch_size=4, draft_threshold=0.3)


def test_independent_heads_sample_the_main_models_distribution(independent_model):
    """The 2nd sampled token (after drafting) is distributed as plain sampling's (two-sample chi-squared)."""
    assert_samples_like_the_main_model(independent_model, [5, 17, 3], 2, positions=(1,))


def test_independent_heads_refuse_trees(independent_model):
    with pytest.raises(MtpdError, match="independent heads .* draft chains only"):
        speculative_generate(independent_model, [[1, 2, 3]], 4, drafter=StaticTree(TreeShape.parse("0,1,00")))


def test_independent_heads_train_save_and_load_through_the_cli(tmp_path, corpus_dir, capsys):
    """`mtpd train --hf --independent-heads --head-init last-block` trains, records the kind of heads in
    config.json, and the checkpoint loads as independent heads that decode losslessly."""
    from mtpd.checkpoint import load_checkpoint
    from mtpd.cli import main

    llama = save_tiny_model(tmp_path / "llama", "llama")
    run = tmp_path / "run"
    train = ["train", "--hf", llama, "--heads", "2", "--independent-heads", "--head-init", "last-block",
             "--teacher-cache", "--data", corpus_dir, "--max-steps", "3", "--batch-size", "2", "--seq-len", "32",
             "--eval-windows", "2", "--out", run, "--quiet"]
    assert main([str(a) for a in train]) == 0
    checkpoint = load_checkpoint(run)
    config = json.loads((checkpoint.path / "config.json").read_text())
    assert config["model"]["independent_heads"] is True
    assert config["train"]["head_init"] == "last-block" and config["train"]["teacher_cache"] is True
    assert checkpoint.model.heads[0].embed_norm is None
    prompts = [checkpoint.tokenizer.encode(text).ids for text in ("def fib", "class Stack:")]
    assert_greedy_lossless(checkpoint.model, prompts, 8, batch_size=2)
    capsys.readouterr()
    assert main([str(a) for a in train[:-3]] + ["--out", str(run), "--resume", "--max-steps", "4", "--quiet"]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--head-init", "last-block"], "applies to heads on a frozen pretrained model"),
    (["--teacher-cache"], "applies to heads on a frozen pretrained model"),
    (["--head-init", "first-block"], "invalid choice"),
])
def test_bad_head_training_flags_are_one_line(flags, message, tmp_path, capsys):
    from mtpd.cli import main

    assert main(["train", "--preset", "micro", "--max-steps", "1", "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()
