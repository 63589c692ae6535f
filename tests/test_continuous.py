"""Continuous batching (decode/continuous.py): every request decodes as it would alone."""

import pytest
import torch

from hf_models import save_tiny_model
from mtpd.decode import autoregressive_generate, make_rule
from mtpd.decode.continuous import Request, stream_generate
from mtpd.errors import MtpdError
from mtpd.model.backbone import load_backbone
from conftest import markov_tokens, prompts_from


def run_stream(decoder, requests, rows, stop_ids=(), generator=None, answer=None):
    """All of `requests` through `rows` rows; `answer(request, tokens)` may queue a follow-up request."""
    queue, results = list(requests), []

    def next_request():
        return queue.pop(0) if queue else None

    for request, tokens in stream_generate(decoder, next_request, rows, stop_ids, generator):
        results.append((request, tokens))
        if answer is not None and (follow := answer(request, tokens)) is not None:
            queue.append(follow)
    return results


def alone(decoder, request, stop_ids=()):
    return autoregressive_generate(decoder, [request.prompt], request.max_new_tokens, stop_ids=stop_ids).tokens[0]


def test_greedy_requests_decode_as_they_would_alone(trained_model):
    main = trained_model.main
    prompts = prompts_from(markov_tokens(2000, seed=5), [1, 3, 4, 7, 9, 12, 15, 20, 2, 30, 5, 11])
    requests = [Request(prompt, 3 + 5 * index % 37, tag=index) for index, prompt in enumerate(prompts)]
    results = run_stream(main, requests, rows=3)
    assert sorted(request.tag for request, _ in results) == list(range(len(requests)))  # each exactly once
    for request, tokens in results:
        assert tokens == alone(main, request)
    # Rows were refilled while others decoded: the short requests ended before the long ones.
    assert [request.tag for request, _ in results] != list(range(len(requests)))


def test_stop_tokens_end_a_request_and_follow_ups_join_the_stream(trained_model):
    main = trained_model.main
    prompts = prompts_from(markov_tokens(2000, seed=6), [2, 5, 8, 13])
    first = [Request(prompt, 24, tag="first") for prompt in prompts]
    stop = (alone(main, first[0])[4],)  # a token the first request emits: it ends there

    def answer(request, tokens):  # each finished request asks for a continuation of itself
        return Request(request.prompt + tokens, 10, tag="follow") if request.tag == "first" else None

    results = run_stream(main, first, rows=2, stop_ids=stop, answer=answer)
    assert [request.tag for request, _ in results].count("follow") == len(first)
    for request, tokens in results:
        assert tokens == alone(main, request, stop)
        assert stop[0] not in tokens[:-1]
    assert any(tokens[-1] == stop[0] and len(tokens) < request.max_new_tokens for request, tokens in results)


def test_each_row_samples_by_its_own_rule(trained_model):
    """Greedy and sampled requests in one batch: the greedy ones still decode as alone."""
    main = trained_model.main
    prompts = prompts_from(markov_tokens(2000, seed=7), [3, 6, 9, 12, 15, 18])
    sampled = make_rule(1.0)
    requests = [Request(prompt, 16, sampled if index % 2 else make_rule(0.0), tag=index)
                for index, prompt in enumerate(prompts)]
    results = run_stream(main, requests, rows=4, generator=torch.Generator().manual_seed(0))
    again = run_stream(main, requests, rows=4, generator=torch.Generator().manual_seed(0))
    assert results == again  # seeded: reproducible
    for request, tokens in results:
        if request.rule is not sampled:
            assert tokens == alone(main, request)
        assert len(tokens) == 16


def test_the_transformers_adapter_refills_when_every_row_is_free(tmp_path):
    """Its cache cannot take rows apart: batches run one after another, each request still as alone."""
    main = load_backbone(save_tiny_model(tmp_path / "gpt2", "gpt2"), runtime="transformers")
    prompts = prompts_from(markov_tokens(2000, seed=8), [2, 4, 6, 8, 10])
    requests = [Request([token % 300 for token in prompt], 4 + 3 * index, tag=index) for index, prompt in enumerate(prompts)]
    results = run_stream(main, requests, rows=2)
    assert sorted(request.tag for request, _ in results) == list(range(len(requests)))
    for request, tokens in results:
        assert tokens == alone(main, request)


def test_bad_requests(trained_model):
    main = trained_model.main
    with pytest.raises(MtpdError, match="at least one token"):
        run_stream(main, [Request([], 4)], rows=2)
    with pytest.raises(MtpdError, match="context"):
        run_stream(main, [Request([1] * main.max_seq_len, 4)], rows=2)
    with pytest.raises(MtpdError, match="max-new-tokens"):
        run_stream(main, [Request([1, 2, 3], 0)], rows=2)


def test_the_cache_grows_for_a_longer_request(trained_model):
    """A short request first sizes the cache; a long one later grows it, rows in flight keeping their entries."""
    main = trained_model.main
    prompts = prompts_from(markov_tokens(3000, seed=9), [3, 4, 40, 5])
    requests = [Request(prompts[0], 30, tag=0), Request(prompts[1], 4, tag=1), Request(prompts[2], 60, tag=2),
                Request(prompts[3], 8, tag=3)]
    for request, tokens in run_stream(main, requests, rows=2):
        assert tokens == alone(main, request)
