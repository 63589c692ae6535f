"""Draft trees: their shape, and the pure math of verifying one in a single main-model pass.

Node 0 is the root: the pending token y0, already chosen from the main model but not yet run through it,
at sequence position n. Every other node is a drafted token whose parent is the token before it on its
path; a node at depth m sits at position n + m. Nodes are stored in depth order (a parent's index is
below its children's), which is what makes compacting the accepted path in place safe.

Verification runs the main model once over all nodes: node j is written at cache slot n + j, takes
position n + depth(j) for RoPE, and attends to the cached prefix (slots < n) plus its ancestors and itself
(`tree_attention_mask`). The main model's output at each node gives a target token there (the rule's
`choose`: greedy argmax, or a sample); a node is accepted when its token equals its parent's target and
its parent is accepted. The deepest accepted node ends the accepted path, and its target is the next
token (`accept_path`).

Sampling stays lossless with several candidates per node: one sample is drawn from the main model's
distribution at every node, and the walk follows the child equal to it. The token emitted at each step
is therefore that step's sample from the main model, whatever the heads drafted: this is ancestral
sampling. It equals recursive rejection sampling with a deterministic proposal (the heads' top-ranked
children): candidate c_i is accepted with probability p(c_i) / (1 - p(c_1) - ... - p(c_{i-1})), and
after the last rejection the token is drawn from p restricted to the other tokens.

`require_tree_support` refuses a tree a model cannot draft (no tree attention, or deeper than its heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtpd.errors import MtpdError
from mtpd.model import MTPModel


@dataclass(frozen=True)
class TreeShape:
    """A static draft tree, written as Medusa's "choices": a non-root node is a path of ranks (r1, .., rm):
    the r_m-th most likely token (0 = most likely) under head m, evaluated at node (r1, .., r_{m-1})."""

    paths: tuple[tuple[int, ...], ...]  # the non-root nodes, sorted by (depth, ranks)

    @classmethod
    def from_paths(cls, paths) -> "TreeShape":
        nodes = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        known = set(nodes)
        for path in nodes:
            if not path or min(path) < 0:
                raise MtpdError(f"tree node {list(path)} is not a path of ranks >= 0: write nodes like 0 1 0.0")
            if len(path) > 1 and path[:-1] not in known:
                raise MtpdError(f"tree node {'.'.join(map(str, path))} has no parent "
                                f"{'.'.join(map(str, path[:-1]))}: list every prefix of every path")
        if not nodes:
            raise MtpdError("a draft tree needs at least one node besides the root, e.g. --tree-shape 0")
        return cls(tuple(nodes))

    @classmethod
    def parse(cls, spec: str) -> "TreeShape":
        """'0 1 0.0 0.1 0.0.0': nodes separated by spaces (or commas), ranks along a path by dots."""
        try:
            paths = [tuple(int(r) for r in node.split(".")) for node in spec.replace(",", " ").split()]
        except ValueError:
            raise MtpdError(f"cannot read tree shape '{spec}': write nodes as rank paths, e.g. '0 1 0.0 0.1 0.0.0'") from None
        return cls.from_paths(paths)

    @classmethod
    def chain(cls, depth: int) -> "TreeShape":
        return cls.from_paths([(0,) * m for m in range(1, depth + 1)])

    def spec(self) -> str:
        return " ".join(".".join(map(str, p)) for p in self.paths)

    @property
    def num_nodes(self) -> int:
        """Nodes verified per step, the root included."""
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    def parents(self) -> list[int]:
        index = {p: i for i, p in enumerate(self.paths, start=1)}
        return [-1] + [index.get(p[:-1], 0) for p in self.paths]

    def depths(self) -> list[int]:
        return [0] + [len(p) for p in self.paths]

    def ranks(self) -> list[int]:
        return [0] + [p[-1] for p in self.paths]

    @property
    def candidates(self) -> int:
        """The most tokens any node takes from one head's ranking (its deepest rank + 1)."""
        return max(max(p) for p in self.paths) + 1


def ancestor_matrix(parents: torch.Tensor) -> torch.Tensor:
    """parents [..., N] (depth order, root -1) -> [..., N, N] bool: [j, i] = node i is node j or an ancestor."""
    N = parents.shape[-1]
    anc = torch.eye(N, dtype=torch.bool, device=parents.device).repeat(*parents.shape[:-1], 1, 1)
    for j in range(1, N):
        parent = parents[..., j, None, None].expand(*parents.shape[:-1], 1, N)
        anc[..., j, :] |= anc.gather(-2, parent).squeeze(-2)
    return anc


def tree_attention_mask(prefix: torch.Tensor, window_start: torch.Tensor, window: torch.Tensor,
                        kv_len: int) -> torch.Tensor:
    """Which cache slots each query attends to: [B, T, kv_len] bool.

    prefix [B, T]: query t sees every slot < prefix[b, t]; window [B or 1, T, W] bool: and the slots
    window_start[b] + w where window[b, t, w] (the query's ancestors and itself, for a tree node)."""
    W = window.shape[-1]
    keys = torch.arange(kv_len, device=prefix.device)
    mask = keys < prefix[..., None]
    offset = keys - window_start[:, None]  # [B, kv_len]
    inside = (offset >= 0) & (offset < W)
    index = offset.clamp(0, W - 1)[:, None, :].expand(-1, window.shape[1], -1)
    in_window = window.expand(prefix.shape[0], -1, -1).gather(2, index)
    return mask | (in_window & inside[:, None, :])


def accept_path(tokens: torch.Tensor, targets: torch.Tensor, parents: torch.Tensor,
                ancestors: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """The deepest accepted node per row [B].

    tokens, targets [B, N]: each node's token, and the main model's choice after it; parents [B or 1, N];
    ancestors [B or 1, N, N]; depth [B or 1, N]. A node is accepted when it and every ancestor equal
    their parent's target (the root always is). At most one node per depth can be (siblings differ)."""
    B = tokens.shape[0]
    parent_target = targets.gather(1, parents.clamp_min(0).expand(B, -1))
    correct = (tokens == parent_target) | (parents < 0)
    accepted = ~(ancestors & ~correct[:, None, :]).any(-1)
    return torch.where(accepted, depth, -1).argmax(-1)


def path_nodes(ancestors: torch.Tensor, depth: torch.Tensor, node: torch.Tensor, max_depth: int) -> torch.Tensor:
    """The path from the root to `node` [B]: [B, max_depth + 1] node index at each depth, -1 past the node."""
    B = node.shape[0]
    on_path = ancestors.expand(B, -1, -1).gather(1, node[:, None, None].expand(-1, 1, ancestors.shape[-1]))
    levels = torch.arange(max_depth + 1, device=node.device)
    at_level = on_path & (depth.expand(B, -1)[:, None, :] == levels[None, :, None])  # [B, D+1, N]
    return torch.where(at_level.any(-1), at_level.long().argmax(-1), -1)


def require_tree_support(model: MTPModel, depth: int, num_heads: int, candidates: int = 1) -> None:
    """Refuse a tree of `depth` that this model cannot draft with `num_heads` heads: the main model has no
    tree attention (a Hugging Face model on the transformers adapter), the tree is deeper than the heads, or
    a node takes more `candidates` from a head's ranking than the heads' (draft) vocabulary has tokens."""
    if not model.main.supports_tree_attention:
        raise MtpdError(f"tree drafting needs tree attention in the main model, which mtpd's own decoder has (its "
                        f"built-in models and Llama-family Hugging Face models); this Hugging Face model runs through "
                        f"the transformers adapter ({type(model.main).__name__}) and drafts chains only: drop --tree "
                        f"/ --tree-shape")
    if model.cfg.independent_heads:  # a tree node's head reads its parent's state: the cascade
        raise MtpdError("tree drafting expands each node with the next cascaded head; independent heads all draft "
                        "from the last position and draft chains only: drop --tree / --tree-shape")
    if depth > num_heads:
        raise MtpdError(f"the draft tree is {depth} deep but {num_heads} heads draft: use a tree at most "
                        f"{num_heads} deep, or a checkpoint with more heads")
    scored = model.cfg.draft_vocab_size  # the heads rank their draft vocabulary
    if candidates > scored:
        which = " heads' draft" if scored < model.cfg.vocab_size else ""
        raise MtpdError(f"the draft tree takes rank {candidates - 1} of a head's ranking but the{which} vocabulary "
                        f"has {scored} tokens: use ranks below {scored}")
