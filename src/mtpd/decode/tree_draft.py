"""Tree drafting with cascaded MTP heads: one speculative step that drafts a tree, verifies all of its nodes
in one main-model pass and keeps the longest verified path (the pure math is in decode/tree.py).

Why the heads run "along the tree". Head k at sequence position i reads h{k-1}_i and Emb(seq[i+k]) and
attends to its own cache at positions <= i. With the root (pending token y0) at position n and a node v
at depth m (the path y1..ym), head k evaluated *at v* sits at position n - k + m, reads Emb(token(v)) and
head k-1's state at parent(v) (for the root: the confirmed h{k-1} at n - k), and attends to head k's
confirmed cache plus its own states at v's ancestors. Its output at a node of depth k-1 drafts that
node's children. So head k must run on every node of depth < k that leads to a node it expands; a chain
is the case of one node per depth, which is exactly the suffix the chain decoder recomputes.

Per step and head, one batched call covers both: the "chunk" of sequential positions the head's cache
still lacks (ending at the root, at position n - k, with a causal mask) and the tree nodes it runs on
(written at slots after the root's, attending to the prefix and their ancestors: a tree mask). The main
model verifies the nodes at slots n + j. After acceptance the accepted path's entries are copied to their
sequential slots (compaction), in the main cache and in every head cache, so nothing is recomputed:
next step a head recomputes only the positions its path entries did not cover.

Two growth policies decide which nodes exist (pluggable like the acceptance rule):
  StaticTree   a fixed shape of rank paths (Medusa-style), chosen from acceptance statistics
               (decode/tree_calibration.py); same nodes in every row and step.
  DynamicTree  EAGLE-2 style: at each depth expand the `width` nodes of highest cumulative draft
               probability with their top `children` tokens, then verify the `nodes` best nodes.
Rows with less context than the tree is deep, and the last steps before the context end, draft a chain
(decode/chain.py). The decode state and the step a drafter returns are in decode/state.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mtpd.decode.chain import ChainDrafter
from mtpd.decode.state import Decoding, Step, gather_rows, scatter_rows
from mtpd.decode.tree import (TreeShape, accept_path, ancestor_matrix, path_nodes, require_tree_support,
                              tree_attention_mask)
from mtpd.errors import MtpdError
from mtpd.model import MTPModel, TreeAttention

_CHAIN = ChainDrafter()  # without a draft threshold: what a tree step drafts when the tree does not fit


@dataclass
class DraftTree:
    """The tree drafted in one step. Depths are the same in every row (same node count per depth); parents
    and ancestors may differ per row (dynamic trees) or be shared (leading dimension 1)."""

    tokens: torch.Tensor  # [B, N]
    parents: torch.Tensor  # [B or 1, N], root -1
    depth: torch.Tensor  # [1, N]
    ancestors: torch.Tensor  # [B or 1, N, N]
    hidden: torch.Tensor  # [D + 1, B, N, d]: hidden[k] = head k's state at the nodes it ran on
    logp: torch.Tensor | None = None  # [B, N] cumulative draft log-probability (dynamic trees)
    frontiers: list[torch.Tensor] = field(default_factory=list)  # [B, E] nodes expanded per depth >= 1 (dynamic)


@dataclass
class HeadPlan:
    """Where head k runs: non-root nodes [B or 1, T] (ancestors before descendants), the ancestor relation
    among them [B or 1, T, T], the nodes whose children it drafts [B or 1, E], and each node's index among
    `nodes` (-1: not run on) [B or 1, N]."""

    nodes: torch.Tensor
    window: torch.Tensor
    expand: torch.Tensor
    local: torch.Tensor


@dataclass
class VerifyTree:
    """The nodes the main model verifies: a subtree of the draft tree, in depth order; source maps its
    nodes to draft-tree nodes."""

    tokens: torch.Tensor  # [B, N]
    parents: torch.Tensor  # [B or 1, N]
    depth: torch.Tensor  # [B or 1, N]
    ancestors: torch.Tensor  # [B or 1, N, N]
    source: torch.Tensor  # [B or 1, N]


class TreeDrafter:
    """One speculative step with a draft tree; subclasses say how the tree grows."""

    depth: int  # heads 1..depth draft
    max_nodes: int  # nodes drafted per step, the root included
    candidates: int  # the most tokens a node takes from one head's ranking

    def describe(self) -> dict:
        raise NotImplementedError

    def start(self, root: torch.Tensor, d_model: int, dtype: torch.dtype) -> DraftTree:
        raise NotImplementedError

    def plan(self, tree: DraftTree, k: int) -> HeadPlan:
        raise NotImplementedError

    def grow(self, tree: DraftTree, k: int, plan: HeadPlan, logits: torch.Tensor,
             to_token_ids: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Add the children of plan.expand from head k's logits over the draft vocabulary [B, E, N];
        `to_token_ids` maps the chosen draft indices to the token ids the tree holds."""
        raise NotImplementedError

    def verification(self, tree: DraftTree) -> VerifyTree:
        raise NotImplementedError

    def check(self, model: MTPModel, num_heads: int) -> None:
        require_tree_support(model, self.depth, num_heads, self.candidates)

    def extra_slots(self, num_heads: int) -> int:
        return max(_CHAIN.extra_slots(num_heads), self.max_nodes)  # a step may draft a chain instead

    def step(self, state: Decoding, room: int) -> Step:
        D, count, active = self.depth, state.count, state.active
        n = count - 1  # the root's position
        if room < D or bool(((n < D) & active).any()):  # near the context end, or too little context
            return _CHAIN.step(state, room)
        n = torch.where(active, n, n.masked_fill(~active, 0).max())  # finished rows: any valid position
        model = state.model
        # What the passes' shapes need from the host, in one transfer rather than one per head: each head's
        # chunk (head k's depends only on its own `computed`, which the heads before it leave alone) and the
        # furthest root, which bounds the slots an eager pass attends to.
        roots = n - torch.arange(1, D + 1, device=n.device)[:, None]  # [D, B]: root position for head k
        chunks = (roots - torch.minimum(state.heads.computed[1:D + 1], roots)).amax(1) + 1
        *chunk_lengths, furthest = torch.cat([chunks, n.max()[None]]).tolist()
        tree = self.start(state.seq.gather(1, n[:, None])[:, 0], model.cfg.d_model, state.heads.hidden.dtype)
        plans = []
        for k in range(1, D + 1):
            plan = self.plan(tree, k)
            self._run_head(state, tree, plan, k, n, chunk_lengths[k - 1], furthest - k)
            B = tree.tokens.shape[0]
            expand = plan.expand.expand(B, -1)
            logits = model.draft_logits(k, gather_rows(tree.hidden[k], expand))
            self.grow(tree, k, plan, logits, model.to_token_ids)
            plans.append(plan)
        verify = self.verification(tree)
        best, h0, targets = self._verify(state, verify, n, furthest)
        accepted = verify.depth.expand(best.shape[0], -1).gather(1, best[:, None])[:, 0]
        token = targets.gather(1, best[:, None])[:, 0]
        self._compact(state, tree, verify, plans, best, h0, n)
        return Step(accepted, token, D, verify.tokens.shape[1] - 1)

    def _run_head(self, state: Decoding, tree: DraftTree, plan: HeadPlan, k: int, n: torch.Tensor, L: int,
                  furthest_root: int) -> None:
        """Head k over the L positions its cache lacks (ending at the root, n - k; the furthest row's root is
        at `furthest_root`) and the tree nodes of the plan."""
        heads, seq, model, passes = state.heads, state.seq, state.model, state.passes
        B, device = seq.shape[0], seq.device
        root = n - k
        chunk = (root[:, None] - (L - 1) + torch.arange(L, device=device)).clamp_min(0)
        prev, tokens = gather_rows(heads.hidden[k - 1], chunk), seq.gather(1, chunk + k)
        T = plan.nodes.shape[1]
        if T == 0:
            h = passes.head(model, k, prev, chunk, tokens, heads.caches[k - 1])
        else:
            nodes = plan.nodes.expand(B, -1)
            parents = tree.parents.expand(B, -1).gather(1, nodes)
            positions = torch.cat([chunk, root[:, None] + tree.depth.expand(B, -1).gather(1, nodes)], 1)
            slots = torch.cat([chunk, root[:, None] + 1 + torch.arange(T, device=device)], 1)
            prev = torch.cat([prev, gather_rows(tree.hidden[k - 1], parents)], 1)
            tokens = torch.cat([tokens, tree.tokens.gather(1, nodes)], 1)
            prefix = torch.cat([chunk + 1, (root + 1)[:, None].expand(B, T)], 1)
            window = torch.cat([plan.window.new_zeros(plan.window.shape[0], L, T), plan.window], 1)
            cache = heads.caches[k - 1]
            mask = tree_attention_mask(prefix, root + 1, window, _attended(cache, furthest_root + 1 + T))
            h = passes.head(model, k, prev, positions, tokens, cache, TreeAttention(slots, mask))
            scatter_rows(tree.hidden[k], nodes, h[:, L:])
        if k < state.num_heads:
            scatter_rows(heads.hidden[k], chunk, h[:, :L])
        tree.hidden[k][:, 0] = h[:, L - 1]
        heads.computed[k] = root + 1

    def _verify(self, state: Decoding, verify: VerifyTree, n: torch.Tensor, furthest: int):
        """One main-model pass over all nodes (the furthest row's root at `furthest`); returns the deepest
        accepted node [B], h0 [B, N, d] and the main model's target at every node [B, N]."""
        B, N = verify.tokens.shape
        device = n.device
        positions = n[:, None] + verify.depth.expand(B, -1)
        slots = n[:, None] + torch.arange(N, device=device)
        kv_len = _attended(state.main_cache, furthest + N)
        mask = tree_attention_mask(n[:, None].expand(B, N), n, verify.ancestors, kv_len)
        main = state.model.main
        h0 = state.passes.main(main, verify.tokens, positions, state.main_cache, tree=TreeAttention(slots, mask))
        targets, _ = state.rule.choose(main.logits(h0), state.generator)
        best = accept_path(verify.tokens, targets, verify.parents, verify.ancestors, verify.depth)
        return best, h0, targets

    def _compact(self, state: Decoding, tree: DraftTree, verify: VerifyTree, plans: list[HeadPlan],
                 best: torch.Tensor, h0: torch.Tensor, n: torch.Tensor) -> None:
        """Move the accepted path to sequential slots: tokens into seq, cache entries and hidden states of
        the main model and of every head that ran on path nodes."""
        D, heads, seq = self.depth, state.heads, state.seq
        B = seq.shape[0]
        path = path_nodes(verify.ancestors, verify.depth, best, D)  # [B, D + 1]
        on_path = path[:, 1:] >= 0
        node = path.clamp_min(0)
        m = torch.arange(1, D + 1, device=seq.device)
        target = n[:, None] + m
        drafted = verify.tokens.gather(1, node[:, 1:])
        seq.scatter_(1, target, torch.where(on_path & state.active[:, None], drafted, seq.gather(1, target)))
        state.main_cache.copy_slots(n[:, None] + torch.where(on_path, node[:, 1:], m), target)
        if state.num_heads:
            scatter_rows(heads.hidden[0], torch.cat([n[:, None], target], 1), gather_rows(h0, node))
        draft_path = verify.source.expand(B, -1).gather(1, node[:, 1:])  # [B, D] draft-tree nodes
        for k, plan in enumerate(plans, start=1):
            root = n - k
            if plan.nodes.shape[1] == 0:
                continue  # head k ran on the root only: its cache is already sequential
            local = plan.local.expand(B, -1).gather(1, draft_path)
            valid = on_path & (local >= 0)  # a prefix of the path: the nodes head k ran on
            target = root[:, None] + m
            heads.caches[k - 1].copy_slots(torch.where(valid, root[:, None] + 1 + local, target), target)
            if k < state.num_heads:  # positions past the valid prefix get stale values, recomputed before use
                scatter_rows(heads.hidden[k], target, gather_rows(tree.hidden[k], draft_path))
            heads.computed[k] = root + 1 + valid.sum(-1)


def _attended(cache, needed: int) -> int:
    """The slots a tree pass's mask covers: the whole of a static-shape cache (compiled decoding: one shape
    whatever the positions), else the `needed` ones up to its furthest slot."""
    return needed if cache.attended_len is None else cache.attended_len


class StaticTree(TreeDrafter):
    """The same tree every step: `shape` lists its nodes as rank paths (decode/tree.py)."""

    def __init__(self, shape: TreeShape):
        self.shape = shape
        self.depth, self.max_nodes, self.candidates = shape.depth, shape.num_nodes, shape.candidates
        parents = torch.tensor(shape.parents())
        depth = torch.tensor(shape.depths())
        ranks = torch.tensor(shape.ranks())
        ancestors = ancestor_matrix(parents)
        N = shape.num_nodes
        self._tensors = {"parents": parents[None], "depth": depth[None], "ancestors": ancestors[None]}
        self._plans: list[dict] = []
        for k in range(1, self.depth + 1):
            expand = [v for v in range(N) if depth[v] == k - 1 and bool((parents == v).any())]
            runs = [a for a in range(1, N) if any(bool(ancestors[v, a]) for v in expand)]
            children = [c for c in range(1, N) if int(parents[c]) in expand]
            local = torch.full((N,), -1)
            local[runs] = torch.arange(len(runs))
            self._plans.append({
                "nodes": torch.tensor(runs, dtype=torch.long)[None],
                "window": ancestors[runs][:, runs][None],
                "expand": torch.tensor(expand, dtype=torch.long)[None],
                "local": local[None],
                "children": torch.tensor(children, dtype=torch.long),
                "child_parent": torch.tensor([expand.index(int(parents[c])) for c in children], dtype=torch.long),
                "child_rank": ranks[children],
                "top": int(ranks[children].max()) + 1,
            })
        self._device: torch.device | None = None

    def describe(self) -> dict:
        return {"kind": "static", "shape": self.shape.spec(), "nodes": self.shape.num_nodes,
                "depth": self.depth}

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            move = lambda d: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}  # noqa: E731
            self._tensors = move(self._tensors)
            self._plans = [move(p) for p in self._plans]
            self._device = device

    def start(self, root: torch.Tensor, d_model: int, dtype: torch.dtype) -> DraftTree:
        self._to(root.device)
        B, N = root.shape[0], self.max_nodes
        tokens = torch.zeros(B, N, dtype=torch.long, device=root.device)
        tokens[:, 0] = root
        hidden = torch.zeros(self.depth + 1, B, N, d_model, dtype=dtype, device=root.device)
        t = self._tensors
        return DraftTree(tokens, t["parents"], t["depth"], t["ancestors"], hidden)

    def plan(self, tree: DraftTree, k: int) -> HeadPlan:
        p = self._plans[k - 1]
        return HeadPlan(p["nodes"], p["window"], p["expand"], p["local"])

    def grow(self, tree: DraftTree, k: int, plan: HeadPlan, logits: torch.Tensor,
             to_token_ids: Callable[[torch.Tensor], torch.Tensor]) -> None:
        p = self._plans[k - 1]
        top = logits.topk(p["top"], dim=-1).indices  # [B, E, top]
        tree.tokens[:, p["children"]] = to_token_ids(top[:, p["child_parent"], p["child_rank"]])

    def verification(self, tree: DraftTree) -> VerifyTree:
        source = torch.arange(self.max_nodes, device=tree.tokens.device)[None]
        return VerifyTree(tree.tokens, tree.parents, tree.depth, tree.ancestors, source)


class DynamicTree(TreeDrafter):
    """EAGLE-2 style: at depth m the `width` nodes of highest cumulative draft probability (product of the
    heads' probabilities along the path) are expanded with their top `children` tokens; of all drafted
    nodes, the `nodes` - 1 most probable (a subtree: a child is never more probable than its parent) are
    verified with the root. Head k runs on every expanded node of depth < k (a fixed count per row)."""

    def __init__(self, depth: int, width: int = 2, children: int = 2, nodes: int = 8):
        if depth < 1 or width < 1 or children < 1 or nodes < 2:
            raise MtpdError(f"dynamic tree needs depth, width, children >= 1 and nodes >= 2 (got {depth}, {width}, "
                            f"{children}, {nodes})")
        self.depth, self.width, self.children, self.candidates = depth, width, children, children
        sizes, expanded = [1], []
        for _ in range(depth):
            expanded.append(min(width, sizes[-1]))
            sizes.append(expanded[-1] * children)
        self._sizes, self._expanded = sizes, expanded
        self._offsets = [sum(sizes[:m]) for m in range(depth + 2)]
        self.max_nodes = self._offsets[-1]
        self.nodes = min(nodes, self.max_nodes)

    def describe(self) -> dict:
        return {"kind": "dynamic", "depth": self.depth, "width": self.width, "children": self.children,
                "nodes": self.nodes, "drafted_nodes": self.max_nodes}

    def start(self, root: torch.Tensor, d_model: int, dtype: torch.dtype) -> DraftTree:
        B, N, device = root.shape[0], self.max_nodes, root.device
        tokens = torch.zeros(B, N, dtype=torch.long, device=device)
        tokens[:, 0] = root
        parents = torch.full((B, N), -1, dtype=torch.long, device=device)
        depth = torch.repeat_interleave(torch.arange(self.depth + 1, device=device),
                                        torch.tensor(self._sizes, device=device))[None]
        ancestors = torch.eye(N, dtype=torch.bool, device=device).repeat(B, 1, 1)
        hidden = torch.zeros(self.depth + 1, B, N, d_model, dtype=dtype, device=device)
        logp = torch.zeros(B, N, dtype=torch.float64, device=device)
        return DraftTree(tokens, parents, depth, ancestors, hidden, logp)

    def plan(self, tree: DraftTree, k: int) -> HeadPlan:
        B, device = tree.tokens.shape[0], tree.tokens.device
        if k == 1:
            expand = torch.zeros(B, 1, dtype=torch.long, device=device)
        else:  # the most probable nodes of depth k-1
            first, size = self._offsets[k - 1], self._sizes[k - 1]
            expand = first + tree.logp[:, first:first + size].topk(self._expanded[k - 1], dim=-1).indices
            tree.frontiers.append(expand)
        nodes = (torch.cat(tree.frontiers, 1) if tree.frontiers
                 else torch.zeros(B, 0, dtype=torch.long, device=device))
        T = nodes.shape[1]
        window = tree.ancestors.gather(1, nodes[..., None].expand(-1, -1, self.max_nodes)).gather(
            2, nodes[:, None, :].expand(-1, T, -1))
        local = torch.full((B, self.max_nodes), -1, dtype=torch.long, device=device)
        local.scatter_(1, nodes, torch.arange(T, device=device).expand(B, -1))
        return HeadPlan(nodes, window, expand, local)

    def grow(self, tree: DraftTree, k: int, plan: HeadPlan, logits: torch.Tensor,
             to_token_ids: Callable[[torch.Tensor], torch.Tensor]) -> None:
        B, E = plan.expand.shape
        c = self.children
        logp = logits.float().log_softmax(-1).topk(c, dim=-1)  # [B, E, c]
        first = self._offsets[k]
        new = slice(first, first + E * c)
        parents = plan.expand.repeat_interleave(c, dim=1)  # [B, E*c]
        tree.tokens[:, new] = to_token_ids(logp.indices.reshape(B, -1))
        tree.parents[:, new] = parents
        tree.logp[:, new] = tree.logp.gather(1, parents) + logp.values.reshape(B, -1).double()
        inherited = tree.ancestors.gather(1, parents[..., None].expand(-1, -1, self.max_nodes))
        tree.ancestors[:, new] = inherited | tree.ancestors[:, new]

    def verification(self, tree: DraftTree) -> VerifyTree:
        # A child's cumulative log-probability never exceeds its parent's; the depth term breaks ties, so
        # the best nodes form a subtree. Sorting by draft index keeps depth order.
        score = tree.logp[:, 1:] - 1e-9 * tree.depth[:, 1:]
        kept = score.topk(self.nodes - 1, dim=-1).indices.sort(-1).values + 1
        source = torch.cat([torch.zeros_like(kept[:, :1]), kept], 1)  # [B, N]
        B, N = source.shape
        position = torch.full((B, self.max_nodes), -1, dtype=torch.long, device=source.device)
        position.scatter_(1, source, torch.arange(N, device=source.device).expand(B, -1))
        draft_parents = tree.parents.gather(1, source)
        parents = torch.where(draft_parents >= 0, position.gather(1, draft_parents.clamp_min(0)), -1)
        ancestors = tree.ancestors.gather(1, source[..., None].expand(-1, -1, self.max_nodes)).gather(
            2, source[:, None, :].expand(-1, N, -1))
        return VerifyTree(tree.tokens.gather(1, source), parents, tree.depth.expand(B, -1).gather(1, source),
                          ancestors, source)
