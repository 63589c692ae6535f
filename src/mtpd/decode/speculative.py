"""Lossless self-speculative decoding with cascaded MTP heads (DESIGN §4).

Per step, with `count` tokens per row in `seq` (the last one, the pending token, not yet run through the
main model, so the main KV cache holds positions 0..count-2):

  draft    head k at position count-2 reads (h{k-1}, Emb(seq[count-2+k])) and proposes seq[count-1+k];
           with a draft threshold, drafting stops after the first draft whose probability under its head
           is below it in every row (dynamic draft length)
  verify   the main model runs once over seq[count-1 .. count-1+D] (pending token + D drafts)
  accept   the acceptance rule keeps a prefix of a drafts and picks one more token from the main model

Caches are never copied or recomputed from the start. The main cache is "cut back" by lowering `count`.
Head k's entry at position i depends on token seq[i+k], so its last entries were computed from drafts;
per row we keep how many positions each head computed, and the valid prefix is
`min(computed, count - 1 - k)`. Each step a head recomputes only from there (its "chunk"), which both
repairs entries built on rejected drafts and fills entries for newly accepted tokens, in one pass.

The loop is shared: `prefill` sets up a `Decoding`, a step (`chain_step` here, or a tree drafter's step,
decode/tree_draft.py) drafts and verifies, and `advance` appends the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mtpd.decode.acceptance import Greedy, draft_probability
from mtpd.decode.generation import Batch, Generation, collect, finished, make_batch
from mtpd.decode.tree import require_tree_support
from mtpd.model import KVCache, MTPModel

if TYPE_CHECKING:
    from mtpd.decode.tree_draft import TreeDrafter


def _gather_rows(buffer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """buffer [B, L, d], positions [B, T] -> [B, T, d]."""
    return buffer.gather(1, positions[..., None].expand(-1, -1, buffer.shape[-1]))


def _scatter_rows(buffer: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    buffer.scatter_(1, positions[..., None].expand(-1, -1, buffer.shape[-1]), values)


@dataclass
class HeadState:
    """What the heads carry between steps."""

    caches: list[KVCache]  # one per head
    hidden: torch.Tensor  # [K, B, capacity, d]: hidden[j] = h{j} per position, the input of head j+1
    computed: torch.Tensor  # [K+1, B]: computed[k] = positions 0..computed[k]-1 head k has run on


def draft(model: MTPModel, heads: HeadState, seq: torch.Tensor, count: torch.Tensor, max_drafts: int, rule,
          generator: torch.Generator | None, threshold: float, active: torch.Tensor):
    """Run heads 1..D, each over the positions its cache lacks, and write their drafts into seq.

    Returns the drafts [B, D] and their draft distributions [B, D, V] (None for greedy)."""
    B, device = seq.shape[0], seq.device
    rows = torch.arange(B, device=device)
    K = heads.hidden.shape[0]
    drafts, draft_probs = [], []
    for k in range(1, max_drafts + 1):
        valid = torch.minimum(heads.computed[k], count - 1 - k).clamp_min(0)
        chunk = int((count - 1 - valid).max())
        start = (count - 1 - chunk).clamp_min(0)
        positions = start[:, None] + torch.arange(chunk, device=device)
        h = model.head_step(k, _gather_rows(heads.hidden[k - 1], positions), positions,
                            seq.gather(1, positions + k), heads.caches[k - 1])
        if k < K:
            _scatter_rows(heads.hidden[k], positions, h)
        heads.computed[k] = count - 1
        logits = model.head_logits(k, h[rows, count - 2 - start])
        token, probs = rule.choose(logits, generator)
        at = count - 1 + k
        seq[rows, at] = torch.where(active, token, seq[rows, at])  # finished rows keep their tokens
        drafts.append(token)
        draft_probs.append(probs)
        if threshold > 0 and k < max_drafts:
            confident = draft_probability(logits, token, probs) >= threshold
            if not bool((confident & active).any()):
                break
    tokens = torch.stack(drafts, 1) if drafts else seq[:, :0]
    probs = torch.stack(draft_probs, 1) if drafts and draft_probs[0] is not None else None
    return tokens, probs


@dataclass
class Decoding:
    """One speculative decode in progress: what every step reads and updates."""

    model: MTPModel
    rule: object
    generator: torch.Generator | None
    num_heads: int  # K heads in use
    seq: torch.Tensor  # [B, capacity] tokens: prompt, generated, then room for drafts
    count: torch.Tensor  # [B] tokens in seq; the last one (pending) is not yet in the main cache
    active: torch.Tensor  # [B] rows still generating
    main_cache: object
    heads: HeadState


@dataclass
class Step:
    """What one step decided, per row: drafts accepted and the main model's next token; plus the drafts
    proposed per row (chain: D; tree: its depth) and the tokens verified besides the pending one."""

    accepted: torch.Tensor
    token: torch.Tensor
    drafted: int
    verified: int


def chain_step(state: Decoding, max_drafts: int, draft_threshold: float = 0.0) -> Step:
    """Draft a chain with heads 1..max_drafts, verify it in one main-model pass, apply the rule."""
    main, heads, seq = state.model.main, state.heads, state.seq
    count = _within_bounds(state, max_drafts)
    drafts, draft_probs = draft(state.model, heads, seq, count, max_drafts, state.rule, state.generator,
                                draft_threshold, state.active)
    D = drafts.shape[1]
    positions = (count - 1)[:, None] + torch.arange(D + 1, device=seq.device)
    h0 = main(seq.gather(1, positions), positions, state.main_cache)
    if state.num_heads:
        _scatter_rows(heads.hidden[0], positions, h0)
    accepted, token = state.rule.verify(drafts, draft_probs, main.logits(h0), state.generator)
    return Step(accepted, token, D, D)


def _within_bounds(state: Decoding, max_drafts: int) -> torch.Tensor:
    """The token counts a step works at. Finished rows still ride along in the batch and may have overshot
    their budget by up to K accepted drafts; drafting and verifying past that would index beyond the token
    buffer and the context, so they are cut back (never moved forward, which a cache cannot skip to) to where
    `max_drafts` more tokens fit. What they compute is discarded: their tokens are masked in `draft`, and
    `advance` leaves their counts unchanged."""
    limit = min(state.seq.shape[1], state.model.main.max_seq_len) - max_drafts
    return torch.where(state.active, state.count, state.count.clamp(max=limit))


def advance(state: Decoding, step: Step) -> torch.Tensor:
    """Append the step's next token after the accepted drafts of every active row; returns accepted [B]."""
    rows = torch.arange(state.seq.shape[0], device=state.seq.device)
    accepted = torch.where(state.active, step.accepted, 0)
    at = state.count + accepted
    state.seq[rows, at] = torch.where(state.active, step.token, state.seq[rows, at])
    state.count = torch.where(state.active, at + 1, state.count)
    return accepted


def prefill(model: MTPModel, batch: Batch, rule, num_heads: int, generator: torch.Generator | None) -> Decoding:
    """Empty caches, then the main model over the prompts: h0 for the heads and the first new token (pending)."""
    main = model.main
    seq, K = batch.seq, num_heads
    weight = next(model.parameters())
    B, P, capacity, device = seq.shape[0], batch.max_prompt_len, seq.shape[1], seq.device
    rows = torch.arange(B, device=device)
    main_cache = main.new_cache(B, capacity)
    heads = HeadState(model.new_head_caches(B, capacity)[:K],
                      torch.zeros(K, B, capacity, model.cfg.d_model, device=device, dtype=weight.dtype),
                      torch.zeros(K + 1, B, dtype=torch.long, device=device))
    positions = torch.arange(P, device=device).expand(B, P)
    h0 = main(seq[:, :P], positions, main_cache)
    if K:
        heads.hidden[0, :, :P] = h0
    token, _ = rule.choose(main.logits(h0[rows, batch.prompt_len - 1]), generator)
    seq[rows, batch.prompt_len] = token
    active = torch.ones(B, dtype=torch.bool, device=device)
    return Decoding(model, rule, generator, K, seq, batch.prompt_len + 1, active, main_cache, heads)


@torch.no_grad()
def speculative_generate(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, rule=Greedy(),
                         num_heads: int | None = None, eos_id: int | None = None,
                         generator: torch.Generator | None = None,
                         on_tokens: Callable[[list[list[int]]], None] | None = None,
                         draft_threshold: float = 0.0, tree: "TreeDrafter | None" = None) -> Generation:
    """Decode with the first `num_heads` heads drafting and the main model verifying; the output equals the
    main model's own (greedy: token for token; sampling: in distribution). `draft_threshold` > 0 turns on
    dynamic draft length (chain only). `tree` drafts a tree of candidates instead of one chain
    (decode/tree_draft.py)."""
    K = model.num_heads if num_heads is None else min(num_heads, model.num_heads)
    if tree is not None:
        require_tree_support(model, tree.depth, K, tree.candidates)
    extra = K + 1 if tree is None else max(K + 1, tree.max_nodes)
    batch = make_batch(prompts, max_new_tokens, model.main.max_seq_len, extra, next(model.parameters()).device)
    state = prefill(model, batch, rule, K, generator)
    seq, active, context = state.seq, state.active, model.main.max_seq_len
    B, count = seq.shape[0], state.count
    rows = torch.arange(B, device=seq.device)
    if on_tokens is not None:
        on_tokens([[int(t)] for t in seq[rows, count - 1]])
    active &= ~finished(batch, count, count - 1, eos_id)
    generation = Generation([], 0)

    while bool(active.any()):
        # Fewer drafts near the end of the context: verification must stay inside it.
        room = max(0, int(torch.where(active, context - count, context).min()))
        step = chain_step(state, min(K, room), draft_threshold) if tree is None else tree.step(state, room)
        new_start = state.count
        accepted = advance(state, step)
        count = state.count
        generation.steps += 1
        accepted_by_active_rows = accepted[active].tolist()  # one transfer per step, not one per row
        generation.accepted += accepted_by_active_rows
        generation.drafted += [step.drafted] * len(accepted_by_active_rows)
        generation.verified += [step.verified] * len(accepted_by_active_rows)
        if on_tokens is not None:
            on_tokens([seq[b, int(new_start[b]):int(count[b])].tolist() for b in range(B)])
        active &= ~finished(batch, count, new_start, eos_id)

    generation.tokens = collect(batch, count, eos_id)
    return generation
