"""Baselines: the main model alone, one token per forward pass.

`use_cache=True` is the honest baseline (KV-cached); `use_cache=False` recomputes the whole prefix every
step (the setting the paper reports speedups against).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtpd.decode.acceptance import Greedy
from mtpd.decode.generation import Generation, collect, finished, make_batch
from mtpd.model import Backbone


@torch.no_grad()
def autoregressive_generate(decoder: Backbone, prompts: list[list[int]], max_new_tokens: int, rule=Greedy(),
                            eos_id: int | None = None, use_cache: bool = True,
                            generator: torch.Generator | None = None,
                            on_tokens: Callable[[list[list[int]]], None] | None = None) -> Generation:
    device = next(decoder.parameters()).device
    batch = make_batch(prompts, max_new_tokens, decoder.max_seq_len, 0, device)
    B, P = batch.seq.shape[0], batch.max_prompt_len
    rows = torch.arange(B, device=device)
    count = batch.prompt_len.clone()  # tokens in seq per row
    cache = decoder.new_cache(B, batch.seq.shape[1]) if use_cache else None
    positions = torch.arange(P, device=device).expand(B, P)
    hidden = decoder(batch.seq[:, :P], positions, cache)
    last = hidden[rows, count - 1]
    active = torch.ones(B, dtype=torch.bool, device=device)
    steps = 0
    while True:
        token, _ = rule.choose(decoder.logits(last), generator)
        batch.seq[rows, count] = torch.where(active, token, batch.seq[rows, count])
        new_start = count.clone()
        count = count + active.long()
        if on_tokens is not None:
            on_tokens([[int(token[b])] if active[b] else [] for b in range(B)])
        active &= ~finished(batch, count, new_start, eos_id)
        if not bool(active.any()):
            break
        if use_cache:
            hidden = decoder(token[:, None], (count - 1)[:, None], cache)
            last = hidden[:, 0]
        else:
            hidden = decoder(batch.seq[:, :int(count.max())])
            last = hidden[rows, count - 1]
        steps += 1
    return Generation(collect(batch, count, eos_id), steps)
