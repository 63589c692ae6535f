"""Continuous batching: a stream of requests decoded through a fixed number of cache rows.

`autoregressive_generate` decodes one batch until its longest row ends, so rows that end early idle in
every later step. Making training data (`mtpd distill-data`) is thousands of requests of very different
lengths (SmolLM2's answers ran 14 to 256 tokens; a batch of 16 left 28% of its row-steps idle, and sampled
questions waited for their longest the same way). Here a row that ends takes the next request at once:
its prompt is prefilled apart (with the other new prompts of that step, in a fresh cache) and loaded into
the row, and the next step decodes it with the rest. Rows keep their own positions (the cache masks by
position), budget and sampling rule, so questions (sampled) and answers (greedy) share the batch.

Each request's tokens are what `autoregressive_generate` would give for its prompt alone (tested, fp32).
A cache that cannot take rows apart (the transformers adapter's `HFCache`, which grows with its passes) is
refilled only once every row is free: batches one after the other, as `autoregressive_generate` decodes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

import torch

from mtpd.decode.acceptance import Greedy
from mtpd.decode.generation import make_batch, token_budget
from mtpd.decode.passes import EAGER
from mtpd.model import KVCache


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_new_tokens: int  # fewer near the end of the model's context
    rule: object = Greedy()  # how its tokens are chosen (decode/acceptance.py)
    tag: object = None  # the caller's: handed back with the tokens


@torch.no_grad()
def stream_generate(decoder, next_request: Callable[[], Request | None], rows: int,
                    stop_ids: Collection[int] = (), generator: torch.Generator | None = None,
                    ) -> Iterator[tuple[Request, list[int]]]:
    """Yield (request, generated tokens) as each request ends (at a stop token, included, or its budget).
    `next_request()` is asked for work whenever a row is free: None means nothing now (it is asked again
    next step, so answering a finished request with a new one works); the stream ends when no row is busy
    and it has nothing. The cache grows (doubling, up to the model's context) when a request needs more
    room than it has."""
    device = next(decoder.parameters()).device
    context = decoder.max_seq_len
    stops = set(stop_ids)
    capacity = 0
    cache = EAGER.main_cache(decoder, rows, 1)
    loads_rows = isinstance(cache, KVCache)
    busy: list[Request | None] = [None] * rows
    generated: list[list[int]] = [[] for _ in range(rows)]
    budget = [0] * rows
    position = torch.zeros(rows, dtype=torch.long, device=device)  # of the token each row feeds next
    last = None  # [rows, d]: each row's hidden state at its last fed token
    while True:
        free = [row for row in range(rows) if busy[row] is None]
        if free and (loads_rows or len(free) == rows):
            group = []
            for row in free:
                request = next_request()
                if request is None:
                    break
                group.append((row, request))
            needed = max((_room(request, context) for _, request in group), default=0)
            if needed > capacity:
                capacity = min(context, max(2 * capacity, needed))
                cache = _grown(decoder, cache, rows, capacity, loads_rows)
            if group:
                cache, hidden = _prefill(decoder, cache, group, rows, capacity, loads_rows, device)
                if not loads_rows:  # the whole batch is new
                    last = hidden
                elif last is None:
                    last = hidden.new_zeros(rows, hidden.shape[-1])
                for index, (row, request) in enumerate(group):
                    busy[row], generated[row] = request, []
                    budget[row] = token_budget(len(request.prompt), request.max_new_tokens, context)
                    position[row] = len(request.prompt)
                    if loads_rows:
                        last[row] = hidden[index]
        active = [row for row in range(rows) if busy[row] is not None]
        if not active:
            return
        token = _choose(decoder.logits(last[active]), [busy[row].rule for row in active], generator)
        feed = torch.zeros(rows, dtype=torch.long, device=device)
        going = []
        for row, chosen in zip(active, token.tolist()):
            generated[row].append(chosen)
            if chosen in stops or len(generated[row]) == budget[row]:
                request, busy[row] = busy[row], None
                yield request, generated[row]
            else:
                feed[row] = chosen
                going.append(row)
        if going:  # free rows feed a placeholder at position 0, which their next prefill overwrites
            fed = torch.zeros(rows, dtype=torch.long, device=device)
            fed[going] = position[going]
            last = EAGER.main(decoder, feed[:, None], fed[:, None], cache)[:, 0]
            position[going] += 1


def _room(request: Request, context: int) -> int:
    """Cache slots a request needs: its prompt and every token it may generate but the last (never fed)."""
    return len(request.prompt) + token_budget(len(request.prompt), request.max_new_tokens, context)


def _grown(decoder, cache, rows: int, capacity: int, loads_rows: bool):
    """A cache of `capacity` slots per row holding what `cache` holds (a growing cache, HFCache, as it is)."""
    if not loads_rows:
        return cache
    bigger = EAGER.main_cache(decoder, rows, capacity)
    bigger.load_rows(torch.arange(rows, device=cache.k.device), cache)
    return bigger


def _prefill(decoder, cache, group: list[tuple[int, Request]], rows: int, capacity: int, loads_rows: bool,
             device: torch.device):
    """Run the group's prompts, left-aligned, through a fresh cache: loaded into their rows, or (a cache that
    cannot take rows) the fresh cache becomes the batch's, every row in it (free ones prefill a placeholder).
    Returns (cache, hidden [len(group) or rows, d] at each prompt's last token)."""
    prompts = [request.prompt for _, request in group]
    if not loads_rows:
        prompts += [prompts[0]] * (rows - len(prompts))
    # Laid out (and checked: non-empty, inside the context, a budget of >= 1) as every decode lays out prompts.
    batch = make_batch(prompts, min(request.max_new_tokens for _, request in group), decoder.max_seq_len, 0, device)
    lengths, longest = batch.prompt_len, batch.max_prompt_len
    tokens = batch.seq[:, :longest]
    fresh = EAGER.main_cache(decoder, len(prompts), longest if loads_rows else capacity)
    positions = torch.arange(longest, device=device).expand(len(prompts), longest)
    hidden = EAGER.main(decoder, tokens, positions, fresh)
    hidden = hidden[torch.arange(len(prompts), device=device), lengths - 1]
    if not loads_rows:
        return fresh, hidden
    cache.load_rows(torch.tensor([row for row, _ in group], device=device), fresh)
    return cache, hidden


def _choose(logits: torch.Tensor, rules: list, generator: torch.Generator | None) -> torch.Tensor:
    """Each row's token by its own rule (one call per distinct rule)."""
    token = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for rule in dict.fromkeys(rules):
        members = torch.tensor([index for index, other in enumerate(rules) if other == rule], device=logits.device)
        token[members] = rule.choose(logits[members], generator)[0]
    return token
