import pytest
import torch

from mtpd.decode import speculative_generate
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_calibration import (DraftStatistics, best_tree, calibrate_chain, calibrate_tree, candidate_trees,
                                          draft_statistics, fit_step_cost, prefix_frequencies, walked_chain,
                                          walked_tau)
from mtpd.decode.tree_draft import StaticTree
from mtpd.errors import MtpdError
from conftest import markov_tokens, prompts_from


def test_prefix_frequencies_and_best_tree():
    ranks = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0], [16, 0, 0], [0, 16, 0], [2, 2, 2]])
    f = prefix_frequencies(ranks, max_rank=16)
    assert f[(0,)] == 5 / 8 and f[(0, 0)] == 3 / 8 and f[(0, 0, 0)] == 2 / 8 and f[(1,)] == 1 / 8
    assert (16,) not in f and (0, 16) not in f
    shape, tau = best_tree(f, 3)
    assert shape.paths == ((0,), (0, 0), (0, 0, 0))
    assert tau == pytest.approx(1 + (5 + 3 + 2) / 8)
    shape, tau = best_tree(f, 5)  # ties at 1/8: shallower nodes first, so every parent is in the tree
    assert shape.paths == ((0,), (1,), (2,), (0, 0), (0, 0, 0))
    trees = candidate_trees(f, max_nodes=5)
    assert [s.num_nodes for s, _ in trees] == [2, 3, 4, 5]
    assert [t for _, t in trees] == sorted(t for _, t in trees)


def test_fit_step_cost_is_affine_in_nodes_and_depth():
    shapes = [TreeShape.parse(s) for s in ("0", "0 0.0", "0 1 0.0", "0 1 0.0 0.0.0", "0 1 2 0.0 1.0 0.0.0")]
    truth = [3.0 + 0.5 * s.num_nodes + 2.0 * s.depth for s in shapes]
    noisy = [t * f for t, f in zip(truth, (1.0, 1.3, 0.9, 1.0, 1.05))]
    fitted = fit_step_cost(shapes, noisy)
    assert max(abs(f - t) / t for f, t in zip(fitted, truth)) < 0.15
    assert fit_step_cost(shapes[:2], [1.0, 2.0]) == [1.0, 2.0]


def test_walked_tau_replays_the_steps_of_greedy_decoding():
    """Roots visited: 0, then 0 + accepted + 1, ...; the per-position average would count every root."""
    ranks = torch.tensor([[0, 0], [9, 9], [9, 9], [0, 1], [0, 0], [9, 9]])
    stats = DraftStatistics([ranks], [torch.full(ranks.shape, 0.5)])
    chain = TreeShape.chain(2)
    # root 0 accepts 2 -> root 3 accepts 1 (rank 1 at depth 2 is not in a chain) -> root 5 accepts 0
    assert walked_tau(stats, chain) == pytest.approx((3 + 2 + 1) / 3)
    wide = TreeShape.parse("0 0.0 0.1")
    # root 0 accepts 2 -> root 3 accepts 2 -> root 6: past the end
    assert walked_tau(stats, wide) == pytest.approx((3 + 3) / 2)
    assert walked_tau(DraftStatistics([ranks[:0]], [ranks[:0]]), chain) == 1.0
    assert walked_chain(stats, 2) == pytest.approx((walked_tau(stats, chain), 2.0))


def test_walked_chain_stops_drafting_below_the_threshold():
    ranks = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])
    probs = torch.tensor([[0.9, 0.2, 0.9], [0.9, 0.9, 0.9], [0.9, 0.9, 0.9], [0.1, 0.9, 0.9]])
    stats = DraftStatistics([ranks], [probs])
    # threshold 0.5: root 0 drafts 2 (the second is below), accepts 2 -> root 3 drafts 1, accepts 1 -> end
    assert walked_chain(stats, 3, threshold=0.5) == pytest.approx(((3 + 2) / 2, (2 + 1) / 2))
    assert walked_chain(stats, 3, threshold=0.0) == pytest.approx((4.0, 3.0))  # root 0 accepts 3; root 4: the end


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_walks_predict_what_the_decoder_measures(uncertain_model, threshold):
    """On the calibration prompts themselves, the walk over the statistics predicts the decoder's measured
    tau, for the chain (with and without dynamic draft length) and a tree (up to the last steps, where the
    decoder drafts less than the tree is deep)."""
    prompts = prompts_from(markov_tokens(3000, seed=5, p_first=0.55), [12, 17, 9, 20, 14, 11])
    stats = draft_statistics(uncertain_model, prompts, 40, 4)
    assert len(stats.ranks) == len(prompts) and all(r.shape == (40 - 4, 4) for r in stats.ranks)
    assert all(0 < float(p.min()) and float(p.max()) <= 1 for p in stats.top_probs)

    def measured(**speculative):
        steps = [speculative_generate(uncertain_model, [p], 40, **speculative) for p in prompts]
        n = sum(len(g.accepted) for g in steps)
        return 1 + sum(sum(g.accepted) for g in steps) / n, sum(sum(g.drafted) for g in steps) / n

    tau, drafts = walked_chain(stats, 4, threshold)
    expected_tau, expected_drafts = measured(draft_threshold=threshold)
    assert abs(tau - expected_tau) < 0.05 and abs(drafts - expected_drafts) < 0.3
    if threshold == 0.0:
        tree = TreeShape.parse("0 1 0.0 0.1 1.0 0.0.0 0.0.0.0")
        assert abs(walked_tau(stats, tree) - measured(tree=StaticTree(tree))[0]) < 0.05


def test_calibrate_tree_picks_a_tree_that_pays(uncertain_model):
    prompts = prompts_from(markov_tokens(3000, seed=7, p_first=0.55), [12, 17, 9, 20])
    choice = calibrate_tree(uncertain_model, prompts, 4, max_nodes=8, new_tokens=24, rounds=1)
    assert 2 <= choice.shape.num_nodes <= 8 and choice.shape.depth <= 4
    report = choice.report()
    assert report["shape"] == choice.shape.spec() and report["positions"] == 4 * 20
    best = max(report["candidates"], key=lambda c: c["expected_tokens_per_ms"])
    assert best["shape"] == choice.shape.spec()
    assert choice.expected_tau >= max(c["expected_mean_accepted_tokens"] for c in report["candidates"]
                                      if c["nodes"] <= 2)
    reference = speculative_generate(uncertain_model, prompts, 24).tokens
    assert speculative_generate(uncertain_model, prompts, 24, tree=StaticTree(choice.shape)).tokens == reference
    with pytest.raises(MtpdError, match="--tree-nodes"):
        calibrate_tree(uncertain_model, prompts, 4, max_nodes=1)


def test_dynamic_tree_gets_the_static_trees_budget():
    from mtpd.bench import dynamic_like

    for spec in ("0", "0 0.0", "0 1 0.0 0.1 0.0.0", "0 1 2 0.0 0.1 1.0 2.0 0.0.0 0.0.1 0.1.0 1.0.0 0.0.0.0 0.0.1.0 "
                                                    "0.1.0.0 1.0.0.0"):
        shape = TreeShape.parse(spec)
        dynamic = dynamic_like(shape)
        assert (dynamic.depth, dynamic.nodes) == (shape.depth, shape.num_nodes)


def test_calibrate_chain_picks_a_number_of_heads_and_bench_drafts_with_it(trained_model):
    from mtpd.bench import BenchConfig, run_benchmark
    from mtpd.checkpoint import Checkpoint

    prompts = prompts_from(markov_tokens(3000, seed=7), [12, 17, 9, 20])
    choice = calibrate_chain(trained_model, prompts, 4, thresholds=(0.05,), new_tokens=24, rounds=1)
    assert [c["shape"] for c in choice.report()["candidates"]] == [TreeShape.chain(d).spec() for d in (1, 2, 3, 4)]
    best = max(choice.candidates, key=lambda c: c["expected_tokens_per_ms"])
    assert choice.shape.spec() == best["shape"] and choice.step_ms == best["step_ms"]
    assert [c["mean_draft_length"] for c in choice.candidates] == sorted(c["mean_draft_length"] for c in choice.candidates)

    checkpoint = Checkpoint("memory", trained_model, None, {})
    report = run_benchmark(checkpoint, prompts_from(markov_tokens(500, seed=3), [6, 9]),
                           BenchConfig(max_new_tokens=16, rounds=1, no_cache_baseline=False, auto_heads=True),
                           calibration_prompts=prompts)
    assert 1 <= report["heads"] <= 4 and report["heads"] == report["heads_calibration"]["depth"]
    assert len(report["acceptance_rate"]) == report["heads"] and report["identical_to_baseline"]
    with pytest.raises(MtpdError, match="--heads auto"):
        run_benchmark(checkpoint, prompts, BenchConfig(max_new_tokens=4, rounds=1, auto_heads=True))


def test_calibrate_chain_chooses_the_draft_threshold_too(trained_model):
    """`--draft-threshold auto`: every (heads, threshold) pair is scored from one set of statistics and timings;
    the bench drafts with the winner's threshold and reports it."""
    from mtpd.bench import BenchConfig, run_benchmark
    from mtpd.checkpoint import Checkpoint
    from mtpd.config import DRAFT_THRESHOLDS

    prompts = prompts_from(markov_tokens(3000, seed=7), [12, 17, 9, 20])
    choice = calibrate_chain(trained_model, prompts, 4, thresholds=DRAFT_THRESHOLDS, depths=(4,), new_tokens=24,
                             rounds=1)
    assert [(c["shape"], c["draft_threshold"]) for c in choice.candidates] == [
        (TreeShape.chain(4).spec(), t) for t in DRAFT_THRESHOLDS]
    best = max(choice.candidates, key=lambda c: c["expected_tokens_per_ms"])
    assert (choice.shape.depth, choice.draft_threshold) == (4, best["draft_threshold"])
    # a higher threshold never drafts more
    drafts = [c["mean_draft_length"] for c in choice.candidates]
    assert drafts == sorted(drafts, reverse=True)
    taus = [c["expected_mean_accepted_tokens"] for c in choice.candidates]
    assert taus[0] >= taus[-1]

    checkpoint = Checkpoint("memory", trained_model, None, {})
    report = run_benchmark(checkpoint, prompts_from(markov_tokens(500, seed=3), [6, 9]),
                           BenchConfig(max_new_tokens=16, rounds=1, no_cache_baseline=False, num_heads=3,
                                       auto_threshold=True), calibration_prompts=prompts)
    calibrated = report["heads_calibration"]
    assert report["heads"] == 3 and calibrated["depth"] == 3
    assert report["draft_threshold"] == calibrated["draft_threshold"] in DRAFT_THRESHOLDS
    assert report["identical_to_baseline"]
    with pytest.raises(MtpdError, match="--draft-threshold auto"):
        run_benchmark(checkpoint, prompts, BenchConfig(max_new_tokens=4, rounds=1, auto_threshold=True))


def test_the_bench_gathers_calibration_statistics_once_for_the_chain_and_the_tree(trained_model, monkeypatch):
    """--draft-threshold auto with --tree (and fewer heads than the model has): one set of greedy continuations
    serves both calibrations; the tree's is cut to the heads drafting (`first_heads`)."""
    import mtpd.bench
    from mtpd.bench import BenchConfig, run_benchmark
    from mtpd.checkpoint import Checkpoint

    gathered = []

    def counted(*args, **kwargs):
        gathered.append(draft_statistics(*args, **kwargs))
        return gathered[-1]

    monkeypatch.setattr(mtpd.bench, "draft_statistics", counted)
    prompts = prompts_from(markov_tokens(3000, seed=7), [12, 17, 9, 20])
    checkpoint = Checkpoint("memory", trained_model, None, {})
    report = run_benchmark(checkpoint, prompts_from(markov_tokens(500, seed=3), [6, 9]),
                           BenchConfig(max_new_tokens=16, rounds=1, no_cache_baseline=False, num_heads=3,
                                       auto_threshold=True, tree=True, tree_nodes=6), calibration_prompts=prompts)
    assert len(gathered) == 1 and gathered[0].depth == 4
    assert report["heads_calibration"]["depth"] == 3 and report["tree"]["calibration"]["depth"] <= 3
    assert report["identical_to_baseline"] and report["tree"]["identical_to_baseline"]
    three = gathered[0].first_heads(3)
    assert all(torch.equal(r3, r[:, :3]) for r3, r in zip(three.ranks, gathered[0].ranks))
    assert gathered[0].first_heads(4) is gathered[0]
