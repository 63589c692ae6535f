"""The state one speculative decode carries between steps, and the seam every drafter fills.

A drafter (decode/chain.py, decode/tree_draft.py) turns a `Decoding` into one `Step`: it drafts, runs the
main model once to verify, and applies the acceptance rule; the loop in decode/speculative.py appends the
result. Everything here is shared by the drafters and the loop, so it depends on neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from mtpd.decode.passes import EAGER, Passes
from mtpd.model import KVCache, MTPModel


def gather_rows(buffer: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """buffer [B, L, d], positions [B, T] -> [B, T, d]."""
    return buffer.gather(1, positions[..., None].expand(-1, -1, buffer.shape[-1]))


def scatter_rows(buffer: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
    """buffer[b, positions[b, t]] = values[b, t] for buffer [B, L, d], positions [B, T], values [B, T, d]."""
    buffer.scatter_(1, positions[..., None].expand(-1, -1, buffer.shape[-1]), values)


@dataclass
class HeadState:
    """What the heads carry between steps."""

    caches: list[KVCache]  # one per head
    hidden: torch.Tensor  # [K, B, capacity, d]: hidden[j] = h{j} per position, the input of head j+1
    computed: torch.Tensor  # [K+1, B]: computed[k] = positions 0..computed[k]-1 head k has run on


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
    passes: Passes = EAGER  # how caches are made and passes run: eagerly, or compiled (decode/passes.py)


@dataclass
class Step:
    """What one step decided, per row: drafts accepted and the main model's next token; plus the drafts
    proposed per row (chain: D; tree: its depth) and the tokens verified besides the pending one."""

    accepted: torch.Tensor
    token: torch.Tensor
    drafted: int
    verified: int


class Drafter(Protocol):
    """One speculative step: draft, verify in one main-model pass, accept (ChainDrafter, StaticTree,
    DynamicTree)."""

    def check(self, model: MTPModel, num_heads: int) -> None:
        """Raise MtpdError before any work if this model cannot draft this way with `num_heads` heads."""

    def extra_slots(self, num_heads: int) -> int:
        """Token slots past the generated ones a step may write into (pending token and drafts)."""

    def step(self, state: Decoding, room: int) -> Step:
        """Draft, verify and accept; at most `room` tokens past the pending one fit in the context."""

    def describe(self) -> dict:
        """What the bench report says about this drafter."""
