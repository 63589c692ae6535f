"""Compiled decoding (`--compile`, decode/passes.py): lossless like eager decoding, with a bounded number of
graphs, and refused in one line where it cannot run.

The compiled tests compile the micro model's block (about 7 graphs, each some seconds on a CPU the first
time; inductor's on-disk cache makes later runs faster) and are marked slow. The fast test runs the compiled
path's static shapes (static-shape caches, one-layer cache aliases, positions copied) with the block left
uncompiled."""

import json

import pytest
import torch

from mtpd.bench import BenchConfig, bench_table, run_benchmark
from mtpd.checkpoint import Checkpoint
from mtpd.decode import autoregressive_generate, speculative_generate
from mtpd.decode import passes
from mtpd.decode.passes import graphs_compiled
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_draft import StaticTree
from mtpd.errors import MtpdError
from mtpd.model import MTPModel
from mtpd.model.backbone import load_backbone
from conftest import markov_tokens, prompts_from

TREE = "0 1 0.0 0.1 0.0.0"


def decodes(model: MTPModel, prompts: list[list[int]], new_tokens: int, compile: bool) -> dict[str, list[list[int]]]:
    """Greedy outputs of every decoder: AR, chains (every head, and a threshold), a static tree; one prompt at
    a time and three at a time (rows of different lengths)."""
    def batched(generate):
        return [row for start in range(0, len(prompts), 3) for row in generate(prompts[start:start + 3]).tokens]

    def one_by_one(generate):
        return [generate([prompt]).tokens[0] for prompt in prompts]

    methods = {
        "ar": lambda batch: autoregressive_generate(model.main, batch, new_tokens, compile=compile),
        "chain": lambda batch: speculative_generate(model, batch, new_tokens, compile=compile),
        "chain_threshold": lambda batch: speculative_generate(model, batch, new_tokens, draft_threshold=0.3,
                                                              compile=compile),
        "tree": lambda batch: speculative_generate(model, batch, new_tokens, drafter=StaticTree(TreeShape.parse(TREE)),
                                                   compile=compile),
    }
    return {f"{name} {how.__name__}": how(generate) for name, generate in methods.items()
            for how in (one_by_one, batched)}


def test_static_shapes_decode_losslessly_with_the_block_left_eager(trained_model, monkeypatch):
    monkeypatch.setattr(passes, "_compiled_block", lambda device_type: passes._block)  # everything but torch.compile
    prompts = prompts_from(markov_tokens(2000, seed=5), [1, 3, 4, 7, 9, 12, 15])
    reference = autoregressive_generate(trained_model.main, prompts, 30).tokens
    for name, outputs in decodes(trained_model, prompts, 30, compile=True).items():
        assert outputs == reference, name


def test_compile_is_refused_in_one_line_on_the_adapter(tmp_path):
    from hf_models import save_tiny_model

    backbone = load_backbone(save_tiny_model(tmp_path / "llama"), runtime="transformers")
    model = MTPModel(backbone.head_config(2), backbone).eval()
    for decode in (lambda: speculative_generate(model, [[1, 2, 3]], 4, compile=True),
                   lambda: autoregressive_generate(model.main, [[1, 2, 3]], 4, compile=True),
                   lambda: run_benchmark(Checkpoint(tmp_path, model, None, {}), [[1, 2, 3]],
                                         BenchConfig(max_new_tokens=4, compile=True))):
        with pytest.raises(MtpdError, match="--compile needs a model that runs on mtpd's own decoder") as error:
            decode()
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_compiled_decoding_is_lossless_with_bounded_graphs(trained_model):
    prompts = prompts_from(markov_tokens(2000, seed=5), [1, 3, 4, 7, 9, 12, 15])
    reference = autoregressive_generate(trained_model.main, prompts, 30).tokens
    before = graphs_compiled()
    for name, outputs in decodes(trained_model, prompts, 30, compile=True).items():
        assert outputs == reference, name
    # batch of one or more x one token or more x a sequence or a tree pass, whatever the prompt lengths, chunk
    # lengths, draft depths and tree shape; a size that happens to equal a model dimension may add one
    assert graphs_compiled() - before <= 8
    # everything is compiled now: other prompts, lengths, batch sizes and another tree compile nothing more
    others = prompts_from(markov_tokens(2000, seed=9), [2, 5, 11, 20, 6])
    before = graphs_compiled()
    assert speculative_generate(trained_model, others, 20, compile=True).tokens == \
        autoregressive_generate(trained_model.main, others, 20).tokens
    speculative_generate(trained_model, others[:4], 20, drafter=StaticTree(TreeShape.parse("0 0.0 0.0.0 1")),
                         compile=True)
    assert graphs_compiled() == before


@pytest.mark.slow
def test_compiled_decoding_of_a_llama_on_mtpds_decoder_is_lossless(tmp_path):
    from hf_models import save_tiny_model

    backbone = load_backbone(save_tiny_model(tmp_path / "llama"))  # a Llama: mtpd's own decoder
    torch.manual_seed(0)
    model = MTPModel(backbone.head_config(3), backbone).eval()
    prompts = [list(range(1, 9)), list(range(20, 25)), [7] * 11]
    reference = autoregressive_generate(model.main, prompts, 16).tokens
    assert autoregressive_generate(model.main, prompts, 16, compile=True).tokens == reference
    assert speculative_generate(model, prompts, 16, compile=True).tokens == reference


@pytest.mark.slow
def test_bench_reports_compilation_apart_from_the_timed_rounds(trained_model, tmp_path):
    prompts = prompts_from(markov_tokens(2000, seed=11), [6, 9, 12])  # batches of 2 and 1: both warmed up
    cfg = BenchConfig(max_new_tokens=12, batch_size=2, rounds=1, no_cache_baseline=False, tree_shape=TREE,
                      tree=True, compile=True)
    report = run_benchmark(Checkpoint(tmp_path, trained_model, None, {}), prompts, cfg)
    assert report["compiled"] is True
    assert set(report["compile_seconds"]) == set(report["compiled_graphs"]) == {"autoregressive", "speculative", "tree"}
    assert report["graphs_compiled_while_timed"] == 0
    assert report["identical_to_baseline"] and report["tree"]["identical_to_baseline"]
    assert "compiled: warm-up" in bench_table(report)


@pytest.mark.slow
def test_generate_and_bench_compile_on_the_command_line(tmp_path, capsys, corpus_dir):
    from test_cli import run, saved_run

    saved_run(tmp_path / "run", corpus_dir)
    generate = ["generate", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--prompt", "def fib_3(n):\n",
                "--max-new-tokens", 20]
    code, eager, _ = run(capsys, *generate)
    assert code == 0
    code, compiled, err = run(capsys, *generate, "--compile")
    assert code == 0, err
    assert compiled == eager and "compiled: warm-up" in err
    code, out, err = run(capsys, "bench", "--ckpt", tmp_path / "run", "--dtype", "fp32", "--num-prompts", 2,
                         "--prompt-tokens", 8, "--max-new-tokens", 12, "--rounds", 1, "--skip-no-cache", "--compile",
                         "--json", tmp_path / "bench.json")
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["compiled"] is True and report["graphs_compiled_while_timed"] == 0
    assert report["identical_to_baseline"] is True and "compiled: warm-up" in out


@pytest.mark.slow
def test_a_failing_compilation_is_one_line(trained_model, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)  # a cached graph would need no compiler
    monkeypatch.setattr(passes, "_compiled_block", passes._compiled_block.__wrapped__)  # a fresh torch.compile
    torch._dynamo.reset()
    try:
        with pytest.raises(MtpdError, match="--compile failed: torch.compile could not compile a transformer block "
                                            r"\(.*C\+\+ compiler.*\): run without --compile") as error:
            autoregressive_generate(trained_model.main, [[1, 2, 3]], 3, compile=True)
        assert "\n" not in str(error.value)
    finally:
        torch._dynamo.reset()  # no half-compiled state for the tests after this one
