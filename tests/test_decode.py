import pytest
import torch

from mtpd.decode import Greedy, SpeculativeSampling, autoregressive_generate, sampling_probs, speculative_generate
from mtpd.errors import MtpdError
from mtpd.metrics import teacher_forced_accepts
from conftest import assert_greedy_lossless, assert_samples_like_the_main_model, markov_tokens, prompts_from


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_greedy_speculative_equals_greedy_autoregressive(trained_model, num_heads):
    prompts = prompts_from(markov_tokens(2000, seed=5), [1, 3, 4, 7, 9, 12, 15, 20, 2, 30, 5, 11])
    accepted = assert_greedy_lossless(trained_model, prompts, 40, batch_size=3, num_heads=num_heads)
    mean_accepted = sum(accepted) / len(accepted)
    assert 0.3 < mean_accepted < num_heads  # the test exercises both acceptance and rejection


def test_rows_that_finish_with_accepted_drafts_to_spare_stay_in_bounds(trained_model):
    """Equal-length rows finish at different steps, some overshooting their budget by accepted drafts; the
    others keep drafting 4 deep. Regression: the finished rows used to draft past the token buffer."""
    for seed in range(6):
        prompts = prompts_from(markov_tokens(3000, seed=20 + seed), [8] * 4)
        reference = autoregressive_generate(trained_model.main, prompts, 13).tokens
        assert speculative_generate(trained_model, prompts, 13, num_heads=4).tokens == reference


@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_dynamic_draft_length_stays_lossless_and_drafts_less(trained_model, threshold):
    prompts = prompts_from(markov_tokens(2000, seed=15), [2, 6, 9, 14, 21, 4])
    reference = autoregressive_generate(trained_model.main, prompts, 40).tokens
    drafted = []
    for prompt, expected in zip(prompts, reference):
        result = speculative_generate(trained_model, [prompt], 40, draft_threshold=threshold)
        assert result.tokens[0] == expected
        drafted += result.drafted
    batched = speculative_generate(trained_model, prompts[:3], 40, draft_threshold=threshold)
    assert batched.tokens == reference[:3]
    assert min(drafted) >= 1
    if threshold == 0.9:  # the 80/20 Markov chain's heads are rarely 90% sure: drafting often stops early
        assert sum(drafted) / len(drafted) < 3


def test_greedy_speculative_stops_at_eos_mid_draft(trained_model):
    prompts = prompts_from(markov_tokens(2000, seed=6), [4, 9, 13])
    free = autoregressive_generate(trained_model.main, prompts, 40).tokens
    eos = free[0][5]  # a token the model emits early: EOS will fall inside a draft chain
    reference = autoregressive_generate(trained_model.main, prompts, 40, stop_ids={eos}).tokens
    assert reference[0][-1] == eos and len(reference[0]) <= 6
    for heads in (2, 4):
        assert speculative_generate(trained_model, prompts, 40, num_heads=heads, stop_ids={eos}).tokens == reference
        for prompt, expected in zip(prompts, reference):
            assert speculative_generate(trained_model, [prompt], 40, num_heads=heads, stop_ids={eos}).tokens[0] == expected


def test_no_cache_baseline_equals_cached_baseline(trained_model):
    prompts = prompts_from(markov_tokens(500, seed=7), [3, 8, 5])
    cached = autoregressive_generate(trained_model.main, prompts, 25)
    uncached = autoregressive_generate(trained_model.main, prompts, 25, use_cache=False)
    assert cached.tokens == uncached.tokens


def test_generation_stops_at_context_end_identically(trained_model):
    context = trained_model.cfg.max_seq_len
    prompt = markov_tokens(context - 6, seed=8).tolist()
    reference = autoregressive_generate(trained_model.main, [prompt], 50).tokens[0]
    assert len(reference) == 6
    assert speculative_generate(trained_model, [prompt], 50).tokens[0] == reference


def test_prompt_longer_than_context_is_a_clear_error(trained_model):
    prompt = [1] * trained_model.cfg.max_seq_len
    with pytest.raises(MtpdError, match="context"):
        speculative_generate(trained_model, [prompt], 5)
    with pytest.raises(MtpdError, match="context"):
        autoregressive_generate(trained_model.main, [prompt], 5)


def test_sampling_seeds_reproduce(trained_model):
    prompts = prompts_from(markov_tokens(500, seed=9), [5, 9])
    rule = SpeculativeSampling(temperature=0.8, top_k=20)
    a = speculative_generate(trained_model, prompts, 20, rule, generator=torch.Generator().manual_seed(3))
    b = speculative_generate(trained_model, prompts, 20, rule, generator=torch.Generator().manual_seed(3))
    assert a.tokens == b.tokens and all(len(t) == 20 for t in a.tokens)


CHI2_CRITICAL_DF5_P001 = 20.515  # chi-squared quantile, 5 degrees of freedom, p = 0.001


def chi_squared(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("num_drafts", [1, 3])
def test_speculative_sampling_preserves_target_distribution(num_drafts):
    """First emitted token of one verification ~ p, although drafts come from a very different q."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    V, N = 6, 60000
    target_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0])
    draft_logits = torch.tensor([-1.0, 0.0, 2.5, 0.3, 1.0, -2.0])
    rule = SpeculativeSampling(temperature=1.0)
    p, q = rule.probs(target_logits), rule.probs(draft_logits)
    drafts = torch.multinomial(q.expand(N, V), num_drafts, replacement=True, generator=g)
    accepted, next_token = rule.verify(drafts, q.expand(N, num_drafts, V), target_logits.expand(N, num_drafts + 1, V),
                                       generator=g)
    first = torch.where(accepted > 0, drafts[:, 0], next_token)
    counts = torch.bincount(first, minlength=V).float()
    assert chi_squared(counts, p) < CHI2_CRITICAL_DF5_P001
    # and the draft distribution alone would fail the same test: the test has power
    assert chi_squared(torch.bincount(drafts[:, 0], minlength=V).float(), p) > 100 * CHI2_CRITICAL_DF5_P001


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_speculative_sampling_end_to_end_matches_autoregressive_sampling(trained_model, threshold):
    """Distribution of the 2nd generated token (after drafting) matches plain sampling, from one prompt."""
    assert_samples_like_the_main_model(trained_model, [5, 17, 3], 2, positions=(1,), draft_threshold=threshold)


def test_greedy_rule_accepts_matching_prefix():
    target = torch.full((2, 4, 10), -1.0)
    target[0, torch.arange(4), torch.tensor([3, 5, 7, 9])] = 1.0
    target[1, torch.arange(4), torch.tensor([3, 2, 7, 9])] = 1.0
    drafts = torch.tensor([[3, 5, 7], [3, 5, 7]])
    accepted, next_token = Greedy().verify(drafts, None, target)
    assert accepted.tolist() == [3, 1]
    assert next_token.tolist() == [9, 2]


def test_sampling_probs_top_k_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert (sampling_probs(logits, top_k=2)[0, 2:] == 0).all()
    probs = sampling_probs(logits, top_p=0.7)
    full = logits.softmax(-1)[0]
    assert full[0] < 0.7 < full[0] + full[1]
    assert (probs[0, 2:] == 0).all() and probs[0, :2].sum().item() == pytest.approx(1.0)
    assert torch.allclose(sampling_probs(logits, temperature=0.5), (logits / 0.5).softmax(-1))


def full_sort_nucleus(probs, top_p):
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    kept = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    return kept / kept.sum(-1, keepdim=True)


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked: the nucleus is among the first candidates; flat: it is not
def test_top_p_nucleus_equals_a_full_sort(scale):
    from mtpd.decode.acceptance import NUCLEUS_CANDIDATES, nucleus

    logits = torch.randn(6, 4 * NUCLEUS_CANDIDATES, generator=torch.Generator().manual_seed(0)) * scale
    probs = logits.softmax(-1)
    top = probs.topk(NUCLEUS_CANDIDATES, dim=-1).values.sum(-1)
    assert bool((top >= 0.95).all()) == (scale == 8.0)
    assert torch.allclose(nucleus(probs, 0.95), full_sort_nucleus(probs, 0.95), atol=1e-7)


@pytest.mark.parametrize("num_heads", [2, 4])
def test_online_acceptance_is_what_the_teacher_forced_heads_predict(trained_model, num_heads):
    """Every chain step accepts exactly as many drafts as the heads, teacher-forced on the output, get right
    from where it starts: the drafter feeds each head the cascade and the cache it was trained on (a stale head
    cache would stay lossless but accept less)."""
    model, accepted = trained_model, []
    for prompt in prompts_from(markov_tokens(2000, seed=31), [1, 3, 5, 8, 12, 17, 23, 30]):
        generation = speculative_generate(model, [prompt], 24, num_heads=num_heads)
        tokens = prompt + generation.tokens[0]
        with torch.no_grad():
            _, head_logits = model(torch.tensor([tokens]))
        head_top1 = [model.to_token_ids(logits[0].argmax(-1)) for logits in head_logits[:num_heads]]
        predicted = teacher_forced_accepts(head_top1, tokens, len(prompt), generation.accepted)
        assert predicted[:-1] == generation.accepted[:-1]  # the last step's drafts may run past the budget
        accepted += generation.accepted
    assert 0 < sum(accepted) < num_heads * len(accepted)  # steps that accept all and steps that reject
