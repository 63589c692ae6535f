"""The draft vocabulary V': the tokens the MTP heads score (docs/design.md §10; EAGLE-3's `d2t`, FR-Spec).

With a large vocabulary the heads' output layer dominates a head step and head training (SmolLM2: 49,152 x
576, ~14 ms of a ~75 ms forward pass in fp32). With a draft vocabulary of the N most frequent tokens of the
training data the heads score only those: head logits are indexed by draft index 0..N-1, and `ids` maps a
draft index to its token id. The main head always scores the whole vocabulary.

Decoding stays lossless: greedy verification compares token ids and never reads the draft distribution, and
for speculative sampling a draft distribution that is zero outside V' is a valid proposal (accept with
min(1, p/q), on rejection sample from norm(max(0, p - q))). Everything that reads head outputs maps them here,
through MTPModel's `draft_logits` / `to_token_ids` / `to_full_probs` / `to_draft_indices`.

The full vocabulary is the identity map: no ids, no gather, the heads use the main model's projection as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtpd.errors import MtpdError

# Vocabularies above LARGE_VOCAB get a DEFAULT_DRAFT_VOCAB-token draft vocabulary unless --draft-vocab says
# otherwise; smaller ones keep the full vocabulary, whose output layer is cheap (4,096 x 256 on the `small`
# preset). Measured on SmolLM2 (README, "Draft vocabulary"): its 8,192 most frequent stdlib tokens cover
# 97.9% of held-out stdlib tokens (16,384: 99.8%), and a bf16 head output layer + softmax over them costs
# 1.4 ms instead of 8.8 (16,384: 3.0 ms), which keeps a 4-head draft step within issue 18's budget.
LARGE_VOCAB = 16384
DEFAULT_DRAFT_VOCAB = 8192


def resolve_draft_vocab(requested: int | None, vocab_size: int) -> int:
    """The ModelConfig.draft_vocab for `--draft-vocab` (None: the default for this vocabulary size); 0 means
    the full vocabulary."""
    if requested is None:
        return DEFAULT_DRAFT_VOCAB if vocab_size > LARGE_VOCAB else 0
    if not 1 <= requested <= vocab_size:
        raise MtpdError(f"--draft-vocab must be between 1 and the vocabulary size {vocab_size:,} (got {requested}): "
                        f"the heads score that many of the most frequent tokens")
    return 0 if requested == vocab_size else requested


def most_frequent_tokens(tokens: torch.Tensor, vocab_size: int, n: int) -> tuple[torch.Tensor, float]:
    """The n most frequent token ids of `tokens` (most frequent first; equal counts in id order, so the choice
    is deterministic) and the fraction of `tokens` they cover."""
    counts = torch.bincount(tokens.reshape(-1).long(), minlength=vocab_size)
    ids = torch.sort(-counts, stable=True).indices[:n]
    return ids, float(counts[ids].sum()) / max(int(counts.sum()), 1)


def draft_index_map(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size]: the draft index of each token id, -1 for tokens outside the draft vocabulary."""
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=ids.device)
    index[ids] = torch.arange(len(ids), device=ids.device)
    return index


class DraftVocab(nn.Module):
    """The heads' vocabulary: `ids` [N] (a persistent buffer, saved with the heads), or None for the full one.

    The output weight the heads use, W_out[ids], is derived from the main model's W_out whenever the heads
    score, so it follows W_out when W_out trains or the model is cast or moved; without gradients (decoding,
    head-only training) the gathered copy is kept until W_out or the ids change."""

    def __init__(self, vocab_size: int, size: int = 0):
        super().__init__()
        self.vocab_size = vocab_size
        reduced = 0 < size < vocab_size
        self.size = size if reduced else vocab_size
        # A placeholder until `assign` (training) or a checkpoint sets the real ids.
        self.register_buffer("ids", torch.arange(size) if reduced else None)
        # (W_out gathered from, its version, ids, their version, W_out[ids], bias[ids]): see _output_weight
        self._gathered: tuple | None = None

    def assign(self, ids: torch.Tensor) -> None:
        """Set the ids (e.g. from `most_frequent_tokens`): N distinct token ids."""
        if self.ids is None or ids.shape != self.ids.shape:
            raise ValueError(f"a draft vocabulary of {self.size} tokens takes {self.size} ids, got {tuple(ids.shape)}")
        if len(torch.unique(ids)) != len(ids) or int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"draft vocabulary ids must be distinct token ids in 0..{self.vocab_size - 1}")
        self.ids.copy_(ids)

    def logits(self, x: torch.Tensor, main) -> torch.Tensor:
        """Scores of the draft vocabulary [..., N] from normed head states x [..., d]; `main` is the Backbone
        whose output layer the heads share."""
        if self.ids is None:
            return main.project(x)
        weight, bias = self._output_weight(main.output_layer)
        return F.linear(x, weight, bias)

    def to_token_ids(self, draft_indices: torch.Tensor) -> torch.Tensor:
        return draft_indices if self.ids is None else self.ids[draft_indices]

    def to_draft_indices(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Draft index of each token id; -1 where the token is outside the draft vocabulary."""
        return token_ids if self.ids is None else draft_index_map(self.ids, self.vocab_size)[token_ids]

    def to_full_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """A distribution over the draft vocabulary [..., N] as one over the whole vocabulary [..., V], zero
        outside the draft vocabulary (what speculative sampling's q must be)."""
        if self.ids is None:
            return probs
        full = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        return full.index_copy_(-1, self.ids, probs)

    def _output_weight(self, layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = layer.weight, layer.bias
        if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            return weight[self.ids], None if bias is None else bias[self.ids]  # the gradient reaches W_out
        cached = self._gathered
        # The cache holds (an alias of) the tensors it was computed from, so their storage cannot be reused by
        # other tensors while it is compared: a cast or move gives W_out new storage, a training step or a load
        # bumps its version, and new ids (assign, load, move) are a new tensor or a new version.
        if (cached is None or cached[0].data_ptr() != weight.data_ptr() or cached[0].dtype != weight.dtype
                or cached[0].device != weight.device or cached[1] != weight._version
                or cached[2] is not self.ids or cached[3] != self.ids._version):
            cached = self._gathered = (weight.detach(), weight._version, self.ids, self.ids._version,
                                       weight.detach()[self.ids], None if bias is None else bias.detach()[self.ids])
        return cached[4], cached[5]
