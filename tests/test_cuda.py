"""The CUDA path: decoding stays lossless, sampling draws on the GPU's generator, training runs in bf16 and its
checkpoints load anywhere. Skipped on machines without a GPU (CI has none); run on one with
`pytest tests/test_cuda.py`."""

import copy
import json

import pytest
import torch

from mtpd.bench import BenchConfig, run_benchmark
from mtpd.checkpoint import load_checkpoint
from mtpd.cli import main
from mtpd.decode import autoregressive_generate, speculative_generate
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_draft import DynamicTree, StaticTree
from conftest import assert_greedy_lossless, assert_samples_like_the_main_model, markov_tokens, prompts_from

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def cuda_model(trained_model):
    return copy.deepcopy(trained_model).to(CUDA)


@pytest.fixture(scope="module")
def cuda_uncertain_model(uncertain_model):
    return copy.deepcopy(uncertain_model).to(CUDA)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_greedy_speculative_on_cuda_equals_autoregressive(cuda_model, num_heads):
    prompts = prompts_from(markov_tokens(2000, seed=5), [1, 3, 4, 7, 9, 12, 15, 20, 2, 30, 5, 11])
    accepted = assert_greedy_lossless(cuda_model, prompts, 40, batch_size=3, num_heads=num_heads)
    assert 0.3 < sum(accepted) / len(accepted) < num_heads


def test_dynamic_draft_length_on_cuda_is_lossless(cuda_model):
    prompts = prompts_from(markov_tokens(2000, seed=15), [2, 6, 9, 14, 21, 4])
    assert_greedy_lossless(cuda_model, prompts, 40, batch_size=3, draft_threshold=0.3)


@pytest.mark.parametrize("drafter", [StaticTree(TreeShape.parse("0 1 0.0 0.1 1.0 1.1 0.0.0 0.0.1 0.1.0 0.0.0.0")),
                                     DynamicTree(depth=4, width=2, children=2, nodes=8)], ids=["static", "dynamic"])
def test_greedy_tree_on_cuda_equals_autoregressive(cuda_uncertain_model, drafter):
    prompts = prompts_from(markov_tokens(2000, seed=5, p_first=0.55), [1, 3, 4, 7, 9, 12, 15, 20, 2, 30, 5, 11])
    accepted = assert_greedy_lossless(cuda_uncertain_model, prompts, 40, batch_size=4, tree=drafter)
    assert sum(accepted) > 0


def test_speculative_sampling_on_cuda_matches_autoregressive_sampling(cuda_model):
    """Sampling draws from a generator on the GPU, and the 2nd token's distribution matches plain sampling."""
    assert_samples_like_the_main_model(cuda_model, [5, 17, 3], 2, positions=(1,), device=CUDA)


def test_train_on_cuda_then_bench_sampling_and_load_on_cpu(tmp_path, corpus_dir, capsys):
    """`mtpd train --device cuda` (bf16 autocast) learns and resumes, its checkpoint loads on the CPU with the
    same weights, and `bench` runs on the GPU greedy (identical output) and with sampling."""
    out = tmp_path / "run"
    code = main(["train", "--preset", "micro", "--heads", "2", "--vocab-size", "300", "--batch-size", "8",
                 "--seq-len", "32", "--quiet", "--data", str(corpus_dir), "--max-steps", "40", "--device", "cuda",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("event") == "train"]
    assert losses[-1] < losses[0]
    # Resuming on the GPU: the trainer state (RNG states included) was saved from, and loads onto, the GPU.
    code = main(["train", "--out", str(out), "--resume", "--max-steps", "50", "--device", "cuda", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert load_checkpoint(out).config["state"]["step"] == 50
    on_gpu, on_cpu = load_checkpoint(out, CUDA), load_checkpoint(out)
    for (name, a), (_, b) in zip(on_gpu.model.state_dict().items(), on_cpu.model.state_dict().items()):
        assert torch.equal(a.cpu(), b), name
    prompts = prompts_from(markov_tokens(500, seed=3), [6, 9])
    greedy = run_benchmark(on_gpu, prompts, BenchConfig(max_new_tokens=16, rounds=1, no_cache_baseline=False))
    assert greedy["device"].startswith("cuda") and greedy["identical_to_baseline"]
    sampled = run_benchmark(on_gpu, prompts, BenchConfig(max_new_tokens=16, rounds=1, no_cache_baseline=False,
                                                         temperature=1.0))
    assert sampled["mean_accepted_tokens"] >= 1


def test_compiled_decoding_on_cuda_is_lossless(cuda_model):
    """`--compile` on the GPU (decode/passes.py; docs/design.md §4.8): the compiled chain and static tree equal
    eager autoregressive decoding, one prompt and three at a time, and a second decode compiles nothing."""
    from mtpd.decode.passes import graphs_compiled

    prompts = prompts_from(markov_tokens(2000, seed=5), [1, 3, 4, 7, 9, 12])
    reference = autoregressive_generate(cuda_model.main, prompts, 30).tokens
    tree = StaticTree(TreeShape.parse("0 1 0.0 0.1 0.0.0"))
    for options in ({}, {"drafter": tree}):
        assert [speculative_generate(cuda_model, [p], 30, compile=True, **options).tokens[0] for p in prompts] == reference
        assert speculative_generate(cuda_model, prompts[:3], 30, compile=True, **options).tokens == reference[:3]
    assert autoregressive_generate(cuda_model.main, prompts[:3], 30, compile=True).tokens == reference[:3]
    before = graphs_compiled()
    assert speculative_generate(cuda_model, prompts[3:], 30, compile=True).tokens == reference[3:]
    assert graphs_compiled() == before
