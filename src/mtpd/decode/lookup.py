"""Prompt lookup drafting: drafts copied from the context, where its last tokens occurred before (n-gram
matching, as transformers' `prompt_lookup_num_tokens` and llama.cpp's lookup decoding), and the MTP heads'
chain where they did not (docs/design.md §4.9).

Answers repeat their prompt and themselves: names, code, lists, and a small model's greedy loops. Where the
last n tokens (n from `max_ngram` down to `min_ngram`) occurred earlier in the row, the tokens that followed
that occurrence are a draft of up to `tokens` tokens that costs no model pass; the main model verifies it as it
verifies the heads' chain, under the same acceptance rule, so the output stays the main model's own. A lookup
draft is deterministic, so for speculative sampling its draft distribution is a point mass on each token.

In a batch, rows with a match take its draft, the others the heads' chain (the heads run only when some row
needs them). A head that ran on a row whose drafts were then replaced computed its last entries from the
replaced tokens; those entries are marked stale, and its next step recomputes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtpd.config import LOOKUP_TOKENS
from mtpd.decode.chain import ChainDrafter, verify_drafts, within_bounds
from mtpd.decode.state import Decoding, Step
from mtpd.errors import MtpdError
from mtpd.model import MTPModel

# The n-gram sizes matched (shortest, longest; the longest match found wins). Behind the heads, a 1-token match
# is left to them; alone, it is the best draft there is. Measured offline on SmolLM2's greedy answers to 40
# MT-Bench questions: tau 2.42 with heads at (2, 3) against 2.37 at (1, 3); alone 1.96 at (1, 3), 1.82 at (2, 3).
LOOKUP_NGRAM = (2, 3)
LOOKUP_NGRAM_ALONE = (1, 3)


def lookup_draft(tokens: Sequence[int], max_tokens: int, min_ngram: int, max_ngram: int) -> list[int]:
    """`max_tokens` tokens that followed the latest earlier occurrence of the last n tokens of `tokens`, for the
    largest n in [min_ngram, max_ngram] that occurred before; [] if none. A copy that reaches the end goes on
    copying its own tokens, as LZ77 does: after a loop of period p, the draft is the loop again, not p tokens."""
    end = len(tokens)
    for n in range(min(max_ngram, end - 1), min_ngram - 1, -1):
        suffix = list(tokens[end - n:])
        for start in range(end - n - 1, -1, -1):  # the latest occurrence first: the current loop, the nearest topic
            if tokens[start] == suffix[0] and list(tokens[start:start + n]) == suffix:
                followed = tokens[start + n:end]  # what came after it, up to now; the copy repeats it
                return [followed[i % len(followed)] for i in range(max_tokens)]
    return []


class LookupDrafter:
    """Draft each row from its context where its last tokens occurred before, else with `chain` (the heads; None:
    such a row drafts nothing and the step verifies only its pending token)."""

    def __init__(self, chain: ChainDrafter | None = None, tokens: int = LOOKUP_TOKENS,
                 ngram: tuple[int, int] | None = None):
        if ngram is None:
            ngram = LOOKUP_NGRAM if chain is not None else LOOKUP_NGRAM_ALONE
        if tokens < 1:
            raise MtpdError(f"--lookup-tokens must be >= 1 (got {tokens})")
        if not 1 <= ngram[0] <= ngram[1]:
            raise MtpdError(f"lookup n-gram sizes must satisfy 1 <= min <= max (got {ngram[0]}, {ngram[1]})")
        self.chain, self.tokens, self.ngram = chain, tokens, ngram

    def check(self, model: MTPModel, num_heads: int) -> None:
        if self.chain is not None:
            self.chain.check(model, num_heads)

    def extra_slots(self, num_heads: int) -> int:
        return max(self.tokens, num_heads if self.chain is not None else 0) + 1

    def describe(self) -> dict:
        return {"kind": "lookup", "lookup_tokens": self.tokens, "ngram": list(self.ngram),
                "chain": self.chain.describe() if self.chain is not None else None}

    def step(self, state: Decoding, room: int) -> Step:
        seq, device = state.seq, state.seq.device
        B = seq.shape[0]
        head_drafts = min(state.num_heads, room) if self.chain is not None else 0
        count = within_bounds(state, max(min(self.tokens, room), head_drafts))
        counts, active = count.tolist(), state.active.tolist()
        rows = seq[:, :max(counts)].tolist()  # the rows' tokens, read on the host once per step
        found = [lookup_draft(row[:n], min(self.tokens, room), *self.ngram) if on else []
                 for row, n, on in zip(rows, counts, active)]
        uses_lookup = torch.tensor([bool(draft) for draft in found], device=device)
        if head_drafts and bool((state.active & ~uses_lookup).any()):
            chain, chain_probs = self.chain.draft(state, count, head_drafts)
        else:
            chain, chain_probs = seq[:, :0], None
        D = max([chain.shape[1]] + [len(draft) for draft in found])
        # Every row gets D drafts: its lookup draft or its chain, padded with copies of its last draft (or of its
        # pending token) that verification accepts only where they are the main model's own tokens.
        drafts = torch.empty(B, D, dtype=torch.long, device=device)
        last = seq.gather(1, (count - 1)[:, None])
        drafts[:] = chain[:, -1:] if chain.shape[1] else last
        drafts[:, :chain.shape[1]] = chain
        for b, draft in enumerate(found):
            if draft:
                drafts[b] = torch.tensor(draft + draft[-1:] * (D - len(draft)), device=device)
        at = (count - 1)[:, None] + 1 + torch.arange(D, device=device)
        seq.scatter_(1, at, torch.where(state.active[:, None], drafts, seq.gather(1, at)))
        draft_probs = None
        if state.rule.needs_draft_probs:
            draft_probs = torch.zeros(B, D, state.model.cfg.vocab_size, device=device)
            draft_probs.scatter_(2, drafts[..., None], 1.0)  # a point mass on every copied or padded draft
            if chain_probs is not None:
                heads_rows = ~uses_lookup
                draft_probs[heads_rows, :chain.shape[1]] = chain_probs[heads_rows]
        if chain.shape[1]:
            self._mark_stale(state, count, uses_lookup)
        return verify_drafts(state, count, drafts, draft_probs)

    @staticmethod
    def _mark_stale(state: Decoding, count: torch.Tensor, replaced: torch.Tensor) -> None:
        """Head k's entries at positions >= count-k read the chain's drafts (seq[count..]); in rows whose drafts
        were replaced by a lookup they must be recomputed."""
        computed = state.heads.computed
        depth = torch.arange(1, computed.shape[0], device=computed.device)[:, None]
        stale = torch.minimum(computed[1:], (count - depth).clamp_min(0))
        computed[1:] = torch.where(replaced, stale, computed[1:])
