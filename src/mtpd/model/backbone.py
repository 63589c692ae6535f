"""What MTP heads, the trainer and the decoders need from the main model: the `Backbone` interface.

The built-in `Decoder` satisfies it; an adapter around a Hugging Face causal LM can too. Nothing else in
mtpd looks inside the main model.

The cache contract is position-indexed: a cached pass receives per-row positions [B, T] for its tokens,
stores their keys/values at those positions, and lets each token attend to every position <= its own.
Cutting a row back to a prefix of length n therefore needs no call at all: the next pass for that row
starts at position n and everything cached beyond is never read again before it is overwritten.

Tree drafting (decode/tree.py) needs more: a pass whose tokens share positions, written at explicit cache
slots and attending through an explicit mask, and a cache that can move entries between slots. A backbone
that offers it sets `supports_tree_attention = True`; speculative decoding with a tree refuses the others
with a clear error (the chain works with every backbone).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Backbone(Protocol):
    max_seq_len: int  # context length: positions 0..max_seq_len-1
    # True: __call__ accepts tree=TreeAttention(slots, mask) (model/decoder.py) with a cache, and the cache has
    # copy_slots(source, target). False: tree drafting is refused, chain drafting still works.
    supports_tree_attention: bool

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                 cache: Any | None = None) -> torch.Tensor:
        """tokens [B, T] -> h0 [B, T, d], the last hidden state. No cache: a causal pass over 0..T-1."""

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input embedding Emb, shared with the heads."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection W_out, shared with the heads (applied after each head's own norm)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The main head: h0 -> next-token logits (the final norm, if any, then W_out)."""

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Any:
        """An empty cache for `batch_size` rows and up to `max_len` positions."""
