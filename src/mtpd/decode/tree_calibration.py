"""Choosing a static draft tree, or how many heads a chain drafts with, by measurement: expected accepted
tokens per unit of measured step cost.

Acceptance statistics. A node of a static tree is a path of ranks (r1, .., rm) (decode/tree.py). At a
step whose root (pending token) sits at position n, the node is accepted exactly when, for every depth
j <= m, the main model's greedy token seq[n+j] is the r_j-th most likely token of head j evaluated along
the path, and along an accepted path the heads read exactly the tokens of the greedy continuation. So
running the model teacher-forced over greedy continuations of held-out prompts gives, for every root
position, the rank vector R = (rank of seq[n+1] under head 1, .., rank of seq[n+D] under head D), and what
a tree accepts at root n is the deepest of its paths that R[n] starts with. No independence assumption.

Greedy decoding visits one root per step and skips the positions it accepted: from root n it moves to
n + accepted + 1. Replaying that walk over the rank vectors (`walked_tau`) gives exactly the mean accepted
tokens per step greedy decoding gets on those continuations. The average over all positions would not:
predictable stretches (where deep drafts are accepted) hold many positions but few steps, so it overrates
deep trees (on one GPU-trained model: 10.4 expected vs 3.1 measured for a 16-deep chain).

Candidates are the B most frequent prefixes for each size B (a prefix is never rarer than its extensions,
so they form a tree) and the chain of every depth; each is scored by its walk. Bigger trees accept more but
cost more per step (a wider verification pass, heads run on more nodes); the winner has the most expected
tokens per millisecond of measured step time (`calibrate_tree`). `calibrate_chain` chooses the chain
decoder's number of heads and its draft threshold the same way, replaying dynamic draft length (`walked_chain`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mtpd.clock import step_clock
from mtpd.decode.autoregressive import autoregressive_generate
from mtpd.decode.chain import ChainDrafter
from mtpd.decode.speculative import speculative_generate
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_draft import StaticTree
from mtpd.errors import MtpdError
from mtpd.model import MTPModel


@dataclass
class DraftStatistics:
    """Per held-out greedy continuation, one row per root position n, in order: `ranks` [M, D], the rank of
    the greedy token seq[n+j] under head j, and `top_probs` [M, D], head j's probability for its own top
    token there (what the draft threshold compares), both teacher-forced along the greedy path."""

    ranks: list[torch.Tensor]
    top_probs: list[torch.Tensor]

    @property
    def positions(self) -> int:
        return sum(len(rows) for rows in self.ranks)

    @property
    def depth(self) -> int:
        return self.ranks[0].shape[1]

    def first_heads(self, depth: int) -> "DraftStatistics":
        """The statistics of heads 1..depth: the first columns (each continuation's last roots, where only
        the shallower heads would have a greedy target, stay left out)."""
        return self if depth == self.depth else DraftStatistics([r[:, :depth] for r in self.ranks],
                                                                [p[:, :depth] for p in self.top_probs])


@torch.no_grad()
def draft_statistics(model: MTPModel, prompts: list[list[int]], new_tokens: int, depth: int,
                     max_rank: int = 16, progress: Callable[[str], None] | None = None) -> DraftStatistics:
    """Rank and top-probability statistics of heads 1..depth over the greedy continuations of `prompts`
    (ranks >= max_rank are stored as max_rank: never in a tree; so is a token outside the heads' draft
    vocabulary, which no head can propose)."""
    if progress:
        progress(f"calibration: greedy continuations of {len(prompts)} validation prompts")
    continuations = autoregressive_generate(model.main, prompts, new_tokens).tokens
    ranks, top_probs = [], []
    device = next(model.parameters()).device
    for prompt, continuation in zip(prompts, continuations):
        sequence = torch.tensor([prompt + continuation], device=device)
        _, head_logits = model(sequence)
        P, T = len(prompt), sequence.shape[1]
        if T - depth <= P:  # a continuation shorter than the deepest draft: no root position
            continue
        roots = torch.arange(P, T - depth, device=device)  # the drafts seq[n+1..n+depth] are greedy tokens
        per_depth, probs = [], []
        for j in range(1, depth + 1):
            logits = head_logits[j - 1][0, roots - 1].float()  # head j at position n-1 predicts seq[n+j]
            index = model.to_draft_indices(sequence[0, roots + j])
            rank = (logits > logits.gather(-1, index.clamp_min(0)[:, None])).sum(-1)
            per_depth.append(torch.where(index >= 0, rank, max_rank).clamp_max(max_rank))
            probs.append(logits.softmax(-1).amax(-1))
        ranks.append(torch.stack(per_depth, -1).cpu())
        top_probs.append(torch.stack(probs, -1).cpu())
    if not ranks:
        raise MtpdError(f"no calibration positions: the continuations of {len(prompts)} prompts are not longer than "
                        f"the {depth} heads draft; continue them by more tokens")
    return DraftStatistics(ranks, top_probs)


def walked_tau(stats: DraftStatistics, shape: TreeShape) -> float:
    """Mean accepted tokens per step that greedy decoding with `shape` gets on the continuations behind
    `stats`: from each continuation's first root, a step at root n accepts the deepest path of the tree that
    R[n] starts with, and the next root is n + accepted + 1."""
    paths = set(shape.paths)
    tokens = steps = 0
    for rows in stats.ranks:
        rows, n = rows.tolist(), 0
        while n < len(rows):
            accepted = 0
            while accepted < shape.depth and tuple(rows[n][:accepted + 1]) in paths:
                accepted += 1
            tokens, steps, n = tokens + accepted + 1, steps + 1, n + accepted + 1
    return tokens / steps if steps else 1.0


def walked_chain(stats: DraftStatistics, max_drafts: int, threshold: float = 0.0) -> tuple[float, float]:
    """(mean accepted tokens per step, mean drafts per step) of greedy chain decoding with up to `max_drafts`
    heads and dynamic draft length: a step drafts until a head's top probability falls below `threshold`
    (that draft included, as the decoder does) and accepts the drafts up to the first mismatch. Past a
    mismatch the drafts' probabilities are read along the greedy path, not the drafted one: the number of
    drafts (the cost) is approximate there, the accepted tokens are exact."""
    tokens = steps = drafts = 0
    for rows, probs in zip(stats.ranks, stats.top_probs):
        rows, probs, n = rows.tolist(), probs.tolist(), 0
        while n < len(rows):
            drafted = 0
            while drafted < max_drafts:
                drafted += 1
                if probs[n][drafted - 1] < threshold:
                    break
            accepted = 0
            while accepted < drafted and rows[n][accepted] == 0:
                accepted += 1
            tokens, steps, drafts, n = tokens + accepted + 1, steps + 1, drafts + drafted, n + accepted + 1
    return (tokens / steps, drafts / steps) if steps else (1.0, 0.0)


def prefix_frequencies(ranks: torch.Tensor, max_rank: int = 16) -> dict[tuple[int, ...], float]:
    """Fraction of root positions whose rank vector starts with each observed path."""
    counts: Counter = Counter()
    for row in ranks.tolist():
        for m in range(1, len(row) + 1):
            if row[m - 1] >= max_rank:
                break
            counts[tuple(row[:m])] += 1
    return {path: c / len(ranks) for path, c in counts.items()}


def best_tree(frequencies: dict[tuple[int, ...], float], nodes: int) -> tuple[TreeShape, float]:
    """The `nodes` most frequent paths (ties: shallower first, so parents precede children) and the mean
    accepted tokens per step they give (1 + the sum of their frequencies)."""
    if not frequencies:
        return TreeShape.chain(1), 1.0
    ranked = sorted(frequencies, key=lambda p: (-frequencies[p], len(p), p))[:nodes]
    return TreeShape.from_paths(ranked), 1.0 + sum(frequencies[p] for p in ranked)


@dataclass
class TreeChoice:
    shape: TreeShape
    expected_tau: float  # calibration's mean accepted tokens per step with this tree
    step_ms: float  # its time per step (the fitted cost model)
    chain_expected_tau: float  # the same estimate for the chain of all heads
    positions: int  # root positions the statistics come from
    candidates: list[dict] = field(default_factory=list)  # every tree tried: nodes, expected tau, ms per step
    draft_threshold: float | None = None  # a chain's: the dynamic-draft-length threshold chosen with it

    def report(self) -> dict:
        return {"shape": self.shape.spec(), "nodes": self.shape.num_nodes, "depth": self.shape.depth,
                "expected_mean_accepted_tokens": self.expected_tau, "step_ms": self.step_ms,
                "chain_expected_mean_accepted_tokens": self.chain_expected_tau, "positions": self.positions,
                "draft_threshold": self.draft_threshold, "candidates": self.candidates}


def candidate_trees(frequencies: dict[tuple[int, ...], float], max_nodes: int) -> list[tuple[TreeShape, float]]:
    """The best tree of every size 2..max_nodes (root included), with its expected tau; sizes beyond the
    observed paths are left out."""
    trees: list[tuple[TreeShape, float]] = []
    for nodes in range(1, max_nodes):
        shape, tau = best_tree(frequencies, nodes)
        if not trees or shape != trees[-1][0]:
            trees.append((shape, tau))
    return trees


def least_squares(features: list[list[float]], measured: list[float]) -> list[float]:
    """Coefficients of the least-squares fit measured ~ features @ coefficients."""
    solution = torch.linalg.lstsq(torch.tensor(features, dtype=torch.float64),
                                  torch.tensor(measured, dtype=torch.float64)[:, None]).solution
    return solution[:, 0].tolist()


def fit_step_cost(shapes: list[TreeShape], measured_ms: list[float]) -> list[float]:
    """Least-squares ms = a + b * nodes + c * depth through the measurements: the timings of a busy machine
    are noisy, and a step's cost is close to affine in the verified nodes (one wider main-model pass) and
    in the depth (one head call per level). Fewer than 4 trees: the measurements themselves."""
    if len(shapes) < 4:
        return list(measured_ms)
    features = [[1.0, s.num_nodes, s.depth] for s in shapes]
    a, b, c = least_squares(features, measured_ms)
    return [max(a + b * nodes + c * depth, 1e-6) for _, nodes, depth in features]


def measure_step_ms(model: MTPModel, prompt: list[int], num_heads: int, shapes: list[TreeShape],
                    new_tokens: int = 64, rounds: int = 3, progress: Callable[[str], None] | None = None,
                    chain_decoder: bool = False) -> list[float]:
    """Milliseconds per speculative step (drafting, verification, compaction) of each tree, in the steady
    state: a decode of `new_tokens` minus one that stops after its first step, divided by the steps between
    them. The first step is left out with the prefill because the heads then run over the whole prompt as
    well, which a steady step never does (counted in, it made more heads look dearer per step the fewer
    steps the decode took). Fastest of `rounds` interleaved runs each (a step's cost barely depends on what
    it accepts). `chain_decoder`: the shapes are chains, timed with the chain decoder drafting with that
    many heads (not as trees)."""
    def run(shape: TreeShape, tokens: int):
        if chain_decoder:
            return speculative_generate(model, [prompt], tokens, num_heads=shape.depth, drafter=ChainDrafter())
        return speculative_generate(model, [prompt], tokens, num_heads=num_heads, drafter=StaticTree(shape))

    clock = step_clock(next(model.parameters()).device)
    run(shapes[-1], 8)  # warm-up
    # 2 tokens: the prefill and the first step only; the long decode takes at least 4 steps after it
    lengths = (2, max(new_tokens, 2 + 4 * (max(shape.depth for shape in shapes) + 1)))
    best = [[float("inf")] * len(lengths) for _ in shapes]
    steps = [[0] * len(lengths) for _ in shapes]
    for round_index in range(rounds):
        for i, shape in enumerate(shapes):
            for j, tokens in enumerate(lengths):
                start = clock()
                result = run(shape, tokens)
                best[i][j] = min(best[i][j], clock() - start)
                steps[i][j] = result.steps
        if progress:
            progress(f"calibration: timing round {round_index + 1}/{rounds}")
    return [(t_long - t_short) / (s_long - s_short) * 1e3
            for (t_short, t_long), (s_short, s_long) in zip(best, steps)]


def calibrate_tree(model: MTPModel, prompts: list[list[int]], num_heads: int, max_nodes: int = 16,
                   new_tokens: int = 128, rounds: int = 3, progress: Callable[[str], None] | None = None,
                   stats: DraftStatistics | None = None) -> TreeChoice:
    """The static tree for this model and machine: acceptance statistics from greedy continuations of
    `prompts` (held out from the benchmark's), the best tree of each size up to `max_nodes` and the chain of
    each depth, each timed (cost model fitted through the timings); the most expected tokens per millisecond
    wins. `stats`: statistics of these prompts already gathered (`draft_statistics`, at least num_heads deep)."""
    if max_nodes < 2:
        raise MtpdError(f"--tree-nodes must be >= 2: the root and at least one draft (got {max_nodes})")
    report = progress and (lambda line: progress(f"tree {line}"))  # noqa: E731
    stats = _statistics(model, prompts, new_tokens, num_heads, report, stats)
    shapes = [shape for shape, _ in candidate_trees(prefix_frequencies(torch.cat(stats.ranks)), max_nodes)]
    shapes += [chain for chain in (TreeShape.chain(d) for d in range(1, min(num_heads, max_nodes - 1) + 1))
               if chain not in shapes]
    shapes.sort(key=lambda shape: (shape.num_nodes, shape.depth))
    measured = measure_step_ms(model, prompts[0], num_heads, shapes, rounds=rounds, progress=report)
    fitted = fit_step_cost(shapes, measured)
    candidates = [{"nodes": shape.num_nodes, "shape": shape.spec(), "expected_mean_accepted_tokens": tau,
                   "measured_step_ms": ms, "step_ms": fit, "expected_tokens_per_ms": tau / fit}
                  for shape, tau, ms, fit in zip(shapes, (walked_tau(stats, s) for s in shapes), measured, fitted)]
    return _best(shapes, candidates, walked_tau(stats, TreeShape.chain(num_heads)), stats)


def calibrate_chain(model: MTPModel, prompts: list[list[int]], num_heads: int,
                    thresholds: tuple[float, ...] = (0.0,), depths: tuple[int, ...] | None = None,
                    new_tokens: int = 128, rounds: int = 3, progress: Callable[[str], None] | None = None,
                    stats: DraftStatistics | None = None) -> TreeChoice:
    """How the chain decoder should draft on this model and machine: with how many heads (`depths`, default
    1..num_heads) and which dynamic-draft-length threshold (`thresholds`). For every pair, the mean accepted
    tokens and drafts per step from the same statistics (`walked_chain`), a step's cost a + b * drafts
    fitted through the chain decoder timed at every fixed depth; the most expected tokens per millisecond
    wins (`TreeChoice.draft_threshold` holds its threshold). Heads 1..d of a looped model are those of the
    d-head model it grew from, so with this choice more heads never draft slower than fewer (up to the
    timing noise and the prompts' differences). `stats`: as for `calibrate_tree`."""
    depths = tuple(range(1, num_heads + 1)) if depths is None else depths
    report = progress and (lambda line: progress(f"heads {line}"))  # noqa: E731
    stats = _statistics(model, prompts, new_tokens, num_heads, report, stats)
    timed = [TreeShape.chain(d) for d in range(1, num_heads + 1)]
    measured = measure_step_ms(model, prompts[0], num_heads, timed, rounds=rounds, progress=report,
                               chain_decoder=True)
    # ms = a + b * drafts through the fixed-depth timings (least squares: a busy machine's timings are noisy)
    a, b = least_squares([[1.0, d] for d in range(1, num_heads + 1)], measured) if num_heads > 1 else (measured[0], 0.0)
    chains, candidates = [], []
    for d in depths:
        for threshold in thresholds:
            tau, drafts = walked_chain(stats, d, threshold)
            cost = max(a + b * drafts, 1e-6)
            chains.append(TreeShape.chain(d))
            candidates.append({"nodes": d + 1, "shape": TreeShape.chain(d).spec(), "draft_threshold": threshold,
                               "expected_mean_accepted_tokens": tau, "mean_draft_length": drafts,
                               "measured_step_ms": measured[d - 1], "step_ms": cost,
                               "expected_tokens_per_ms": tau / cost})
    return _best(chains, candidates, walked_chain(stats, num_heads, min(thresholds))[0], stats)


def _statistics(model: MTPModel, prompts: list[list[int]], new_tokens: int, num_heads: int,
                progress: Callable[[str], None] | None, stats: DraftStatistics | None) -> DraftStatistics:
    """`stats` cut to num_heads, else gathered now."""
    if stats is not None:
        if stats.depth < num_heads:
            raise ValueError(f"statistics of {stats.depth} heads cannot calibrate {num_heads}")
        return stats.first_heads(num_heads)
    return draft_statistics(model, prompts, new_tokens, num_heads, progress=progress)


def _best(shapes: list[TreeShape], candidates: list[dict], all_heads_tau: float, stats: DraftStatistics) -> TreeChoice:
    """The candidate with the most expected tokens per millisecond (a chain's with its draft threshold); every
    candidate reported."""
    best = max(range(len(shapes)), key=lambda i: candidates[i]["expected_tokens_per_ms"])
    return TreeChoice(shapes[best], candidates[best]["expected_mean_accepted_tokens"], candidates[best]["step_ms"],
                      all_heads_tau, stats.positions, candidates, candidates[best].get("draft_threshold"))
