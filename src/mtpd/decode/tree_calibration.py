"""Choosing a static draft tree by measurement: expected accepted tokens per unit of measured step cost.

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
tokens per millisecond of measured step time (`calibrate_tree`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mtpd.clock import step_clock
from mtpd.decode.autoregressive import autoregressive_generate
from mtpd.decode.speculative import speculative_generate
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_draft import StaticTree
from mtpd.errors import MtpdError
from mtpd.model import MTPModel


@torch.no_grad()
def draft_ranks(model: MTPModel, prompts: list[list[int]], new_tokens: int, depth: int,
                max_rank: int = 16) -> list[torch.Tensor]:
    """Per prompt, rank vectors [M, depth] of the greedy tokens under heads 1..depth, one per root position
    of the prompt's greedy continuation, in order (ranks >= max_rank are stored as max_rank: never in a
    tree)."""
    continuations = autoregressive_generate(model.main, prompts, new_tokens).tokens
    ranks = []
    device = next(model.parameters()).device
    for prompt, continuation in zip(prompts, continuations):
        sequence = torch.tensor([prompt + continuation], device=device)
        _, head_logits = model(sequence)
        P, T = len(prompt), sequence.shape[1]
        roots = torch.arange(P, T - depth, device=device)  # the drafts seq[n+1..n+depth] are greedy tokens
        if len(roots) == 0:
            continue
        per_depth = []
        for j in range(1, depth + 1):
            logits = head_logits[j - 1][0, roots - 1]  # head j at position n-1 predicts seq[n+j]
            target = logits.gather(-1, sequence[0, roots + j, None])
            per_depth.append((logits > target).sum(-1).clamp_max(max_rank))
        ranks.append(torch.stack(per_depth, -1).cpu())
    if not ranks:
        raise MtpdError("no calibration positions: use longer calibration continuations")
    return ranks


def walked_tau(ranks: list[torch.Tensor], shape: TreeShape) -> float:
    """Mean accepted tokens per step that greedy decoding with `shape` gets on the continuations behind
    `ranks` (draft_ranks): from each continuation's first root, a step at root n accepts the deepest path of
    the tree that R[n] starts with, and the next root is n + accepted + 1."""
    paths = set(shape.paths)
    tokens = steps = 0
    for rows in ranks:
        rows, n = rows.tolist(), 0
        while n < len(rows):
            accepted = 0
            while accepted < shape.depth and tuple(rows[n][:accepted + 1]) in paths:
                accepted += 1
            tokens, steps, n = tokens + accepted + 1, steps + 1, n + accepted + 1
    return tokens / steps if steps else 1.0


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

    def report(self) -> dict:
        return {"shape": self.shape.spec(), "nodes": self.shape.num_nodes, "depth": self.shape.depth,
                "expected_mean_accepted_tokens": self.expected_tau, "step_ms": self.step_ms,
                "chain_expected_mean_accepted_tokens": self.chain_expected_tau, "positions": self.positions,
                "candidates": self.candidates}


def candidate_trees(frequencies: dict[tuple[int, ...], float], max_nodes: int) -> list[tuple[TreeShape, float]]:
    """The best tree of every size 2..max_nodes (root included), with its expected tau; sizes beyond the
    observed paths are left out."""
    trees: list[tuple[TreeShape, float]] = []
    for nodes in range(1, max_nodes):
        shape, tau = best_tree(frequencies, nodes)
        if not trees or shape != trees[-1][0]:
            trees.append((shape, tau))
    return trees


def fit_step_cost(shapes: list[TreeShape], measured_ms: list[float]) -> list[float]:
    """Least-squares ms = a + b * nodes + c * depth through the measurements: the timings of a busy machine
    are noisy, and a step's cost is close to affine in the verified nodes (one wider main-model pass) and
    in the depth (one head call per level). Fewer than 4 trees: the measurements themselves."""
    if len(shapes) < 4:
        return list(measured_ms)
    features = torch.tensor([[1.0, s.num_nodes, s.depth] for s in shapes], dtype=torch.float64)
    target = torch.tensor(measured_ms, dtype=torch.float64)[:, None]
    coefficients = torch.linalg.lstsq(features, target).solution
    return [max(float(v), 1e-6) for v in (features @ coefficients)[:, 0]]


def measure_step_ms(model: MTPModel, prompt: list[int], num_heads: int, shapes: list[TreeShape],
                    new_tokens: int = 32, rounds: int = 3, progress: Callable[[str], None] | None = None,
                    chain_decoder: bool = False) -> list[float]:
    """Milliseconds per speculative step (drafting, verification, compaction) of each tree: the fastest of
    `rounds` interleaved runs (a step's cost barely depends on what it accepts). `chain_decoder`: the shapes
    are chains, timed with the chain decoder drafting with that many heads (not as trees)."""
    def run(shape: TreeShape, tokens: int):
        if chain_decoder:
            return speculative_generate(model, [prompt], tokens, num_heads=shape.depth)
        return speculative_generate(model, [prompt], tokens, num_heads=num_heads, tree=StaticTree(shape))

    clock = step_clock(next(model.parameters()).device)
    run(shapes[-1], 8)  # warm-up
    best = [float("inf")] * len(shapes)
    for round_index in range(rounds):
        for i, shape in enumerate(shapes):
            start = clock()
            result = run(shape, new_tokens)
            best[i] = min(best[i], (clock() - start) / max(result.steps, 1) * 1e3)
        if progress:
            progress(f"calibration: timing round {round_index + 1}/{rounds}")
    return best


def calibrate_tree(model: MTPModel, prompts: list[list[int]], num_heads: int, max_nodes: int = 16,
                   new_tokens: int = 128, rounds: int = 3,
                   progress: Callable[[str], None] | None = None) -> TreeChoice:
    """The static tree for this model and machine: acceptance statistics from greedy continuations of
    `prompts` (held out from the benchmark's), the best tree of each size up to `max_nodes` and the chain of
    each depth, each timed (cost model fitted through the timings); the most expected tokens per millisecond
    wins."""
    if max_nodes < 2:
        raise MtpdError(f"--tree-nodes must be >= 2: the root and at least one draft (got {max_nodes})")
    report = progress and (lambda line: progress(f"tree {line}"))  # noqa: E731
    ranks = _ranks(model, prompts, new_tokens, num_heads, report)
    shapes = [shape for shape, _ in candidate_trees(prefix_frequencies(torch.cat(ranks)), max_nodes)]
    shapes += [chain for chain in (TreeShape.chain(d) for d in range(1, min(num_heads, max_nodes - 1) + 1))
               if chain not in shapes]
    shapes.sort(key=lambda shape: (shape.num_nodes, shape.depth))
    measured = measure_step_ms(model, prompts[0], num_heads, shapes, rounds=rounds, progress=report)
    return _choose(ranks, shapes, measured, fit_step_cost(shapes, measured), num_heads)


def calibrate_chain(model: MTPModel, prompts: list[list[int]], num_heads: int, new_tokens: int = 128,
                    rounds: int = 3, progress: Callable[[str], None] | None = None) -> TreeChoice:
    """How many heads the chain decoder should draft with on this model and machine: every depth
    1..num_heads, its mean accepted tokens per step from the same statistics, its step time measured with
    the chain decoder; the most expected tokens per millisecond wins. Heads 1..d of a looped model are those
    of the d-head model it grew from, so with this choice more heads never draft slower than fewer (up to
    the timing noise)."""
    report = progress and (lambda line: progress(f"heads {line}"))  # noqa: E731
    ranks = _ranks(model, prompts, new_tokens, num_heads, report)
    chains = [TreeShape.chain(d) for d in range(1, num_heads + 1)]
    measured = measure_step_ms(model, prompts[0], num_heads, chains, rounds=rounds, progress=report,
                               chain_decoder=True)
    return _choose(ranks, chains, measured, measured, num_heads)


def _ranks(model: MTPModel, prompts: list[list[int]], new_tokens: int, num_heads: int,
           progress: Callable[[str], None] | None) -> list[torch.Tensor]:
    if progress:
        progress(f"calibration: greedy continuations of {len(prompts)} validation prompts")
    return draft_ranks(model, prompts, new_tokens, num_heads)


def _choose(ranks: list[torch.Tensor], shapes: list[TreeShape], measured: list[float], cost_ms: list[float],
            num_heads: int) -> TreeChoice:
    """The shape with the most expected tokens (walked) per millisecond of `cost_ms`; every candidate reported."""
    taus = [walked_tau(ranks, shape) for shape in shapes]
    candidates = [{"nodes": shape.num_nodes, "shape": shape.spec(), "expected_mean_accepted_tokens": tau,
                   "measured_step_ms": ms, "step_ms": cost, "expected_tokens_per_ms": tau / cost}
                  for shape, tau, ms, cost in zip(shapes, taus, measured, cost_ms)]
    best = max(range(len(shapes)), key=lambda i: candidates[i]["expected_tokens_per_ms"])
    return TreeChoice(shapes[best], taus[best], cost_ms[best], walked_tau(ranks, TreeShape.chain(num_heads)),
                      sum(len(rows) for rows in ranks), candidates)
