"""Prompt lookup drafting (decode/lookup.py): drafts copied from the context, the heads' chain where none
match; lossless like every drafter, greedy and sampling, alone and behind the heads, one row and a batch."""

import pytest
import torch

from mtpd.decode import ChainDrafter, autoregressive_generate, speculative_generate
from mtpd.decode.lookup import LookupDrafter, lookup_draft
from mtpd.errors import MtpdError
from conftest import assert_greedy_lossless, assert_samples_like_the_main_model, markov_tokens, prompts_from


def test_a_draft_copies_what_followed_the_latest_longest_match():
    tokens = [7, 1, 2, 9, 9, 5, 1, 2, 3, 4, 6, 1, 2]
    assert lookup_draft(tokens, 3, 2, 3) == [3, 4, 6]  # "1 2" last occurred before "3 4 6", not before "9 9"
    assert lookup_draft(tokens + [3], 2, 2, 3) == [4, 6]  # "1 2 3" (3 tokens) wins over "2 3"
    assert lookup_draft([5, 6, 7, 8], 4, 2, 3) == []  # nothing repeats
    assert lookup_draft([5, 6, 7, 6], 4, 2, 3) == []  # a 1-token match is below min_ngram
    assert lookup_draft([5, 6, 7, 6], 2, 1, 3) == [7, 6]


def test_a_copy_that_reaches_the_end_goes_on_copying_itself():
    """After a loop of period p the draft is the loop again, however long, not the p tokens before the end."""
    assert lookup_draft([4, 0, 0, 0], 5, 2, 3) == [0] * 5
    assert lookup_draft([9, 1, 2, 3, 1, 2, 3, 1, 2], 7, 2, 3) == [3, 1, 2, 3, 1, 2, 3]


def test_bad_settings_are_clear_errors():
    with pytest.raises(MtpdError, match="--lookup-tokens must be >= 1"):
        LookupDrafter(tokens=0)
    with pytest.raises(MtpdError, match="n-gram"):
        LookupDrafter(ngram=(3, 2))


DRAFTERS = {"lookup + chain": lambda: LookupDrafter(ChainDrafter()),
            "lookup alone": lambda: LookupDrafter(None),
            "lookup + thresholded chain, 3 tokens": lambda: LookupDrafter(ChainDrafter(0.5), tokens=3)}


@pytest.mark.parametrize("name", DRAFTERS)
def test_greedy_lookup_equals_greedy_autoregressive(trained_model, name):
    """The micro model's greedy text loops, so steps draft from lookups and (behind the heads) from the chain,
    rows of one batch each their own way; a head whose drafts a lookup replaced must recompute its entries."""
    prompts = prompts_from(markov_tokens(2000, seed=5), [1, 3, 4, 7, 9, 12, 15, 20, 2, 30, 5, 11])
    accepted = assert_greedy_lossless(trained_model, prompts, 40, batch_size=3, drafter=DRAFTERS[name]())
    assert max(accepted) > 4 or name.endswith("3 tokens")  # some lookups went past what 4 heads can draft


def test_lookup_behind_the_heads_accepts_more_than_either_alone(trained_model):
    prompts = prompts_from(markov_tokens(2000, seed=5), [3, 7, 12, 20])
    steps = {name: speculative_generate(trained_model, prompts, 40, drafter=make()).steps
             for name, make in [("chain", ChainDrafter), ("lookup", lambda: LookupDrafter(None)),
                                ("both", lambda: LookupDrafter(ChainDrafter()))]}
    assert steps["both"] < min(steps["chain"], steps["lookup"])


def test_lookup_stops_at_a_stop_token_and_at_the_context_end(trained_model):
    prompts = prompts_from(markov_tokens(2000, seed=6), [4, 9, 13])
    free = autoregressive_generate(trained_model.main, prompts, 40).tokens
    eos = free[0][5]
    reference = autoregressive_generate(trained_model.main, prompts, 40, stop_ids={eos}).tokens
    assert speculative_generate(trained_model, prompts, 40, stop_ids={eos},
                                drafter=LookupDrafter(ChainDrafter())).tokens == reference
    context = trained_model.main.max_seq_len
    long_prompt = markov_tokens(context - 6, seed=8).tolist()  # 6 tokens of room: drafts must shrink to fit
    reference = autoregressive_generate(trained_model.main, [long_prompt], 40).tokens
    for drafter in (LookupDrafter(ChainDrafter()), LookupDrafter(None)):
        assert speculative_generate(trained_model, [long_prompt], 40, drafter=drafter).tokens == reference


@pytest.mark.parametrize("name", ["lookup + chain", "lookup alone"])
def test_lookup_sampling_preserves_the_main_models_distribution(trained_model, name):
    """The prompt repeats "5 17", so the first step drafts "3 5 17 ..." by lookup: a point-mass draft that
    speculative sampling must accept with probability p and correct from the residual."""
    assert_samples_like_the_main_model(trained_model, [5, 17, 3, 5, 17], 3, positions=(1, 2),
                                       drafter=DRAFTERS[name]())


def test_every_step_verifies_one_sequence_per_row(trained_model):
    """drafted = verified = the step's draft length, lookup or chain, and never more than fits."""
    prompt = markov_tokens(60, seed=9).tolist()
    result = speculative_generate(trained_model, [prompt], 30, drafter=LookupDrafter(ChainDrafter(), tokens=6))
    assert result.drafted == result.verified
    assert set(result.drafted) <= {4, 6}  # the chain's 4 heads, or a 6-token lookup
    assert torch.tensor(result.accepted).le(torch.tensor(result.drafted)).all()


@pytest.mark.parametrize("drafter", [ChainDrafter, lambda: LookupDrafter(ChainDrafter())])
def test_streamed_tokens_are_the_output(trained_model, drafter):
    """What `on_tokens` streams (generate's text) is the output, cut at the budget like it: a last step that
    accepts drafts past the budget does not stream them (regression: a 10-token lookup overshot by up to 9)."""
    prompts = prompts_from(markov_tokens(2000, seed=5), [3, 7, 12])
    streamed = [[] for _ in prompts]

    def on_tokens(rows):
        for row, tokens in zip(streamed, rows):
            row += tokens

    result = speculative_generate(trained_model, prompts, 21, drafter=drafter(), on_tokens=on_tokens)
    assert streamed == result.tokens
