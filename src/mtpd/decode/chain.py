"""Chain drafting: heads 1..D each propose one token after the previous one's, and the main model verifies
the chain in one pass (docs/design.md §4).

With `count` tokens per row in `seq` (the last one, the pending token, not yet run through the main model,
so the main KV cache holds positions 0..count-2):

  draft    head k at position count-2 reads (h{k-1}, Emb(seq[count-2+k])) and proposes seq[count-1+k]
           (independent heads read h0 alone: MTPModel.head_input);
           with a draft threshold, drafting stops after the first draft whose probability under its head
           is below it in every row (dynamic draft length)
  verify   the main model runs once over seq[count-1 .. count-1+D] (pending token + D drafts)
  accept   the acceptance rule keeps a prefix of a drafts and picks one more token from the main model

Caches are never copied or recomputed from the start. The main cache is "cut back" by lowering `count`.
Head k's entry at position i depends on token seq[i+k], so its last entries were computed from drafts;
per row we keep how many positions each head computed, and the valid prefix is
`min(computed, count - 1 - k)`. Each step a head recomputes only from there (its "chunk"), which both
repairs entries built on rejected drafts and fills entries for newly accepted tokens, in one pass.
"""

from __future__ import annotations

import torch

from mtpd.decode.acceptance import draft_probability
from mtpd.decode.passes import EAGER, Passes
from mtpd.decode.state import Decoding, HeadState, Step, gather_rows, scatter_rows
from mtpd.model import MTPModel


def draft_chain(model: MTPModel, heads: HeadState, seq: torch.Tensor, count: torch.Tensor, max_drafts: int, rule,
                generator: torch.Generator | None, threshold: float, active: torch.Tensor, passes: Passes = EAGER):
    """Run heads 1..D, each over the positions its cache lacks, and write their drafts into seq.

    Returns the drafts [B, D] (token ids) and their draft distributions over the whole vocabulary [B, D, V],
    zero outside the draft vocabulary (None for greedy)."""
    B, device = seq.shape[0], seq.device
    rows = torch.arange(B, device=device)
    K = heads.hidden.shape[0]
    drafts, draft_probs = [], []
    # Every head's chunk length, read on the host in one transfer before any head runs rather than once per
    # head: head k's depends only on its own `computed`, which the heads before it leave alone.
    depth = torch.arange(1, max_drafts + 1, device=device)[:, None]
    valid = torch.minimum(heads.computed[1:max_drafts + 1], count - 1 - depth).clamp_min(0)
    chunks = (count - 1 - valid).amax(1).tolist()
    for k in range(1, max_drafts + 1):
        chunk = chunks[k - 1]
        start = (count - 1 - chunk).clamp_min(0)
        positions = start[:, None] + torch.arange(chunk, device=device)
        h = passes.head(model, k, gather_rows(heads.hidden[model.head_input(k)], positions), positions,
                        seq.gather(1, positions + k), heads.caches[k - 1])
        if k < K:
            scatter_rows(heads.hidden[k], positions, h)
        heads.computed[k] = count - 1
        logits = model.draft_logits(k, h[rows, count - 2 - start])
        index, probs = rule.choose(logits, generator)  # over the draft vocabulary
        token = model.to_token_ids(index)
        at = count - 1 + k
        seq[rows, at] = torch.where(active, token, seq[rows, at])  # finished rows keep their tokens
        drafts.append(token)
        draft_probs.append(probs)
        if threshold > 0 and k < max_drafts:
            confident = draft_probability(logits, index, probs) >= threshold
            if not bool((confident & active).any()):
                break
    tokens = torch.stack(drafts, 1) if drafts else seq[:, :0]
    probs = model.to_full_probs(torch.stack(draft_probs, 1)) if drafts and draft_probs[0] is not None else None
    return tokens, probs


class ChainDrafter:
    """Draft a chain with every head in use (fewer near the context end), verify it in one main-model pass,
    apply the rule. `threshold` > 0 turns on dynamic draft length."""

    def __init__(self, threshold: float = 0.0):
        self.threshold = threshold

    def check(self, model: MTPModel, num_heads: int) -> None:
        pass  # every model drafts chains: heads on a Hugging Face backbone too

    def extra_slots(self, num_heads: int) -> int:
        return num_heads + 1

    def describe(self) -> dict:
        return {"kind": "chain", "draft_threshold": self.threshold}

    def draft(self, state: Decoding, count: torch.Tensor, max_drafts: int):
        """Up to `max_drafts` drafts per row after `count` tokens, written into seq: (tokens [B, D], their draft
        distributions [B, D, V] or None for greedy)."""
        return draft_chain(state.model, state.heads, state.seq, count, max_drafts, state.rule, state.generator,
                           self.threshold, state.active, state.passes)

    def step(self, state: Decoding, room: int) -> Step:
        max_drafts = min(state.num_heads, room)
        count = within_bounds(state, max_drafts)
        drafts, draft_probs = self.draft(state, count, max_drafts)
        return verify_drafts(state, count, drafts, draft_probs)


def verify_drafts(state: Decoding, count: torch.Tensor, drafts: torch.Tensor, draft_probs) -> Step:
    """One main-model pass over every row's pending token and its drafts (already in seq after `count` tokens),
    then the acceptance rule: the verification of any drafter that proposes one sequence per row."""
    main, seq = state.model.main, state.seq
    D = drafts.shape[1]
    positions = (count - 1)[:, None] + torch.arange(D + 1, device=seq.device)
    h0 = state.passes.main(main, seq.gather(1, positions), positions, state.main_cache)
    if state.num_heads:
        scatter_rows(state.heads.hidden[0], positions, h0)
    accepted, token = state.rule.verify(drafts, draft_probs, main.logits(h0), state.generator)
    return Step(accepted, token, D, D)


def within_bounds(state: Decoding, max_drafts: int) -> torch.Tensor:
    """The token counts a step works at. Finished rows still ride along in the batch and may have overshot
    their budget by up to K accepted drafts; drafting and verifying past that would index beyond the token
    buffer and the context, so they are cut back (never moved forward, which a cache cannot skip to) to where
    `max_drafts` more tokens fit. What they compute is discarded: their tokens are masked when drafts are
    written, and `advance` leaves their counts unchanged."""
    limit = min(state.seq.shape[1], state.model.main.max_seq_len) - max_drafts
    return torch.where(state.active, state.count, state.count.clamp(max=limit))
