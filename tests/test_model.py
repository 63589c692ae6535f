import torch

from conftest import micro_model


def test_cached_passes_equal_full_pass():
    model = micro_model(heads=2)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24))
    full = model.main(tokens)
    cache = model.main.new_cache(2, 32)
    parts = [(0, 10), (10, 11), (11, 17), (17, 24)]
    outs = [model.main(tokens[:, a:b], torch.arange(a, b).expand(2, -1), cache) for a, b in parts]
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


def test_truncated_cache_equals_recomputed_cache():
    """Write 6 speculative positions, cut back to 3 of them, continue with other tokens: same as from scratch."""
    model = micro_model(heads=2)
    V = model.cfg.vocab_size
    prefix, speculative, other = (torch.randint(0, V, (1, n)) for n in (12, 6, 5))
    cache = model.main.new_cache(1, 40)
    model.main(prefix, torch.arange(12)[None], cache)
    model.main(speculative, torch.arange(12, 18)[None], cache)
    # cut back to 15 tokens (3 speculative ones accepted): the next pass starts at position 15
    continued = model.main(other, torch.arange(15, 20)[None], cache)
    scratch_tokens = torch.cat([prefix, speculative[:, :3], other], 1)
    scratch_cache = model.main.new_cache(1, 40)
    scratch = model.main(scratch_tokens, torch.arange(20)[None], scratch_cache)
    assert torch.allclose(continued, scratch[:, 15:], atol=1e-5)
    assert torch.allclose(cache.k[:, :, :, :20], scratch_cache.k[:, :, :, :20], atol=1e-5)
    assert torch.allclose(cache.v[:, :, :, :20], scratch_cache.v[:, :, :, :20], atol=1e-5)


def test_rows_at_different_positions_equal_separate_rows():
    model = micro_model(heads=1)
    V = model.cfg.vocab_size
    a, b = torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 9))
    cache = model.main.new_cache(2, 16)
    # row 0 has 5 tokens cached, row 1 has 8; then one pass of 1 token each at their own positions
    model.main(torch.cat([a[:, :8], b[:, :8]]), torch.arange(8).expand(2, -1), cache)
    step = model.main(torch.cat([a[:, 5:6], b[:, 8:9]]), torch.tensor([[5], [8]]), cache)
    assert torch.allclose(step[0, 0], model.main(a[:, :6])[0, 5], atol=1e-5)
    assert torch.allclose(step[1, 0], model.main(b[:, :9])[0, 8], atol=1e-5)


def test_grouped_query_attention_and_tied_embeddings():
    model = micro_model(heads=1)
    assert model.cfg.n_kv_heads < model.cfg.n_heads
    assert model.main.lm_head.weight is model.main.embed.weight
    untied = micro_model(heads=1, tie_embeddings=False)
    assert untied.main.lm_head.weight is not untied.main.embed.weight


def test_head_k_at_position_i_sees_exactly_tokens_up_to_i_plus_k():
    """No leakage: head k's logits at position i change with t_{i+k} and never with t_{i+k+1} (its target)."""
    model = micro_model(heads=3)
    V, T, i = model.cfg.vocab_size, 12, 4
    tokens = torch.randint(0, V, (1, T))
    _, head_logits = model(tokens)
    for k in range(1, 4):
        for changed, should_change in ((i + k, True), (i + k + 1, False)):
            other = tokens.clone()
            other[0, changed] = (other[0, changed] + 1) % V
            _, other_logits = model(other)
            moved = not torch.allclose(head_logits[k - 1][0, i], other_logits[k - 1][0, i])
            assert moved == should_change, (k, changed)
