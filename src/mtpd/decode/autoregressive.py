"""Baselines: the main model alone, one token per forward pass.

`use_cache=True` is the honest baseline (KV-cached); `use_cache=False` recomputes the whole prefix every
step (the setting the paper reports speedups against). `compile` runs the model's blocks compiled
(decode/passes.py), as the speculative decoders do with it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch

from mtpd.decode.acceptance import Greedy
from mtpd.decode.generation import Generation, collect, finished, make_batch
from mtpd.decode.passes import passes_for
from mtpd.model import Backbone


@torch.no_grad()
def autoregressive_generate(decoder: Backbone, prompts: list[list[int]], max_new_tokens: int, rule=Greedy(),
                            stop_ids: Collection[int] = (), use_cache: bool = True,
                            generator: torch.Generator | None = None,
                            on_tokens: Callable[[list[list[int]]], None] | None = None,
                            compile: bool = False) -> Generation:
    passes = passes_for(decoder, compile)
    device = next(decoder.parameters()).device
    batch = make_batch(prompts, max_new_tokens, decoder.max_seq_len, 0, device, stop_ids)
    B, P = batch.seq.shape[0], batch.max_prompt_len
    rows = torch.arange(B, device=device)
    count = batch.prompt_len.clone()  # tokens in seq per row
    cache = passes.main_cache(decoder, B, batch.seq.shape[1]) if use_cache else None
    positions = torch.arange(P, device=device).expand(B, P)
    hidden = passes.main(decoder, batch.seq[:, :P], positions, cache)
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
        active &= ~finished(batch, count, new_start)
        if not bool(active.any()):
            break
        if use_cache:
            hidden = passes.main(decoder, token[:, None], (count - 1)[:, None], cache)
            last = hidden[:, 0]
        else:
            hidden = passes.main(decoder, batch.seq[:, :int(count.max())], None, None)
            last = hidden[rows, count - 1]
        steps += 1
    return Generation(collect(batch, count), steps)
