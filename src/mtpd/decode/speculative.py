"""Lossless self-speculative decoding with cascaded MTP heads (docs/design.md §4): the decode loop.

`prefill` sets up a `Decoding` (decode/state.py); then, until every row is done, a drafter's `step` drafts
and verifies (decode/chain.py: one chain, the default; decode/tree_draft.py: a tree) and `advance` appends
the accepted drafts and the main model's next token. The loop knows nothing of how a drafter drafts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from mtpd.decode.acceptance import Greedy
from mtpd.decode.chain import ChainDrafter
from mtpd.decode.generation import Batch, Generation, collect, finished, make_batch
from mtpd.decode.passes import EAGER, Passes, passes_for
from mtpd.decode.state import Decoding, Drafter, HeadState, Step
from mtpd.errors import MtpdError
from mtpd.model import MTPModel


def advance(state: Decoding, step: Step) -> torch.Tensor:
    """Append the step's next token after the accepted drafts of every active row; returns accepted [B]."""
    rows = torch.arange(state.seq.shape[0], device=state.seq.device)
    accepted = torch.where(state.active, step.accepted, 0)
    at = state.count + accepted
    state.seq[rows, at] = torch.where(state.active, step.token, state.seq[rows, at])
    state.count = torch.where(state.active, at + 1, state.count)
    # Head k's entry at position i was computed from seq[i+k]: only those below count-1-k rest on confirmed
    # tokens. A head that did not run this step (drafting stopped early, a tree shallower than the heads, the
    # context end) would otherwise keep counting entries built on this step's rejected drafts as valid later.
    heads = state.heads.computed[1:]
    depth = torch.arange(1, heads.shape[0] + 1, device=heads.device)[:, None]
    state.heads.computed[1:] = torch.minimum(heads, (state.count - 1 - depth).clamp_min(0))
    return accepted


def prefill(model: MTPModel, batch: Batch, rule, num_heads: int, generator: torch.Generator | None,
            passes: Passes = EAGER) -> Decoding:
    """Empty caches, then the main model over the prompts: h0 for the heads and the first new token (pending).
    `passes`: how the decode runs the model (decode/passes.py)."""
    main = model.main
    seq, K = batch.seq, num_heads
    weight = next(model.parameters())
    B, P, capacity, device = seq.shape[0], batch.max_prompt_len, seq.shape[1], seq.device
    rows = torch.arange(B, device=device)
    main_cache = passes.main_cache(main, B, capacity)
    heads = HeadState(passes.head_caches(model, B, capacity)[:K],
                      torch.zeros(K, B, capacity, model.cfg.d_model, device=device, dtype=weight.dtype),
                      torch.zeros(K + 1, B, dtype=torch.long, device=device))
    positions = torch.arange(P, device=device).expand(B, P)
    h0 = passes.main(main, seq[:, :P], positions, main_cache)
    if K:
        heads.hidden[0, :, :P] = h0
    token, _ = rule.choose(main.logits(h0[rows, batch.prompt_len - 1]), generator)
    seq[rows, batch.prompt_len] = token
    active = torch.ones(B, dtype=torch.bool, device=device)
    return Decoding(model, rule, generator, K, seq, batch.prompt_len + 1, active, main_cache, heads, passes)


@torch.no_grad()
def speculative_generate(model: MTPModel, prompts: list[list[int]], max_new_tokens: int, rule=Greedy(),
                         num_heads: int | None = None, stop_ids: Collection[int] = (),
                         generator: torch.Generator | None = None,
                         on_tokens: Callable[[list[list[int]]], None] | None = None,
                         draft_threshold: float = 0.0, drafter: Drafter | None = None, *,
                         tree: Drafter | None = None, compile: bool = False) -> Generation:
    """Decode with the first `num_heads` heads drafting and the main model verifying; the output equals the
    main model's own (greedy: token for token; sampling: in distribution). `drafter` says how a step drafts:
    by default a ChainDrafter(draft_threshold) (`draft_threshold` > 0: dynamic draft length; a given drafter
    has its own settings), or a tree drafter (decode/tree_draft.py). `tree` is the older name of `drafter`.
    `compile`: run the model's blocks compiled (decode/passes.py; mtpd's decoder only)."""
    if drafter is not None and tree is not None:
        raise MtpdError("pass the drafter as drafter= or as tree=, not both")
    if drafter is None:
        drafter = tree if tree is not None else ChainDrafter(draft_threshold)
    K = model.num_heads if num_heads is None else min(num_heads, model.num_heads)
    drafter.check(model, K)
    passes = passes_for(model.main, compile)
    batch = make_batch(prompts, max_new_tokens, model.main.max_seq_len, drafter.extra_slots(K),
                       next(model.parameters()).device, stop_ids)
    state = prefill(model, batch, rule, K, generator, passes)
    seq, active, context = state.seq, state.active, model.main.max_seq_len
    B, count = seq.shape[0], state.count
    rows = torch.arange(B, device=seq.device)
    if on_tokens is not None:
        on_tokens([[int(t)] for t in seq[rows, count - 1]])
    active &= ~finished(batch, count, count - 1)
    generation = Generation([], 0)
    end = (batch.prompt_len + batch.budget).tolist()  # streamed tokens stop at each row's budget, as collect() does

    while bool(active.any()):
        # Tokens that fit past the pending one: drafters draft fewer near the context end, so that
        # verification stays inside it.
        room = max(0, int(torch.where(active, context - count, context).min()))
        step = drafter.step(state, room)
        new_start = state.count
        accepted = advance(state, step)
        count = state.count
        generation.steps += 1
        accepted_by_active_rows = accepted[active].tolist()  # one transfer per step, not one per row
        generation.accepted += accepted_by_active_rows
        generation.drafted += [step.drafted] * len(accepted_by_active_rows)
        generation.verified += [step.verified] * len(accepted_by_active_rows)
        if on_tokens is not None:
            on_tokens([seq[b, int(new_start[b]):min(int(count[b]), end[b])].tolist() for b in range(B)])
        active &= ~finished(batch, count, new_start)

    generation.tokens = collect(batch, count)
    return generation
