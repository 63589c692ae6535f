"""What every decode loop shares: batching prompts, per-row token budgets, stop conditions, outputs."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from mtpd.errors import MtpdError


@dataclass
class Generation:
    tokens: list[list[int]]  # generated tokens per row, prompt excluded, cut after a stop token and at the budget
    steps: int = 0  # main-model forward passes after the prefill
    accepted: list[int] = field(default_factory=list)  # speculative: drafts accepted, one entry per row-step
    drafted: list[int] = field(default_factory=list)  # speculative: drafts proposed, one entry per row-step
    verified: list[int] = field(default_factory=list)  # speculative: drafted tokens verified, per row-step
                                                       # (a chain verifies its drafts; a tree, all its nodes)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


@dataclass
class Batch:
    """Prompts laid out left-aligned in one token buffer: row b's prompt is seq[b, :prompt_len[b]]."""

    seq: torch.Tensor  # [B, capacity] tokens (prompt, then generated, then room for drafts)
    prompt_len: torch.Tensor  # [B]
    budget: torch.Tensor  # [B] tokens each row may generate: max_new_tokens, or fewer near the context end
    stop_ids: torch.Tensor  # [S] tokens that end a row (EOS, an instruct model's end of turn); empty: none

    @property
    def max_prompt_len(self) -> int:
        return int(self.prompt_len.max())


def token_budget(prompt_len: int, max_new_tokens: int, context: int) -> int:
    """Tokens a prompt may be followed by: max_new_tokens, or fewer where the model's context ends first."""
    return min(max_new_tokens, context - prompt_len)


def make_batch(prompts: list[list[int]], max_new_tokens: int, context: int, extra: int,
               device: torch.device, stop_ids: Collection[int] = ()) -> Batch:
    """Lay out prompts; `extra` is room past the last generated token (speculative drafts); a row ends at
    its budget or after any of `stop_ids`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MtpdError("every prompt needs at least one token: pass non-empty prompts")
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    if longest >= context:
        raise MtpdError(f"a prompt has {longest} tokens but the model's context is {context}: shorten the prompt "
                        f"(it must leave room for at least one new token)")
    if max_new_tokens < 1:
        raise MtpdError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    capacity = min(context, longest + max_new_tokens) + extra + 1
    seq = torch.zeros(len(prompts), capacity, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        seq[row, :len(prompt)] = torch.tensor(prompt, device=device)
    budget = torch.tensor([token_budget(len(p), max_new_tokens, context) for p in prompts], device=device)
    return Batch(seq, lengths, budget, torch.tensor(sorted(stop_ids), dtype=torch.long, device=device))


def finished(batch: Batch, count: torch.Tensor, new_start: torch.Tensor) -> torch.Tensor:
    """Rows that reached their budget, or emitted a stop token among seq[new_start:count]."""
    done = count - batch.prompt_len >= batch.budget
    if batch.stop_ids.numel():
        positions = torch.arange(batch.seq.shape[1], device=count.device)
        fresh = (positions >= new_start[:, None]) & (positions < count[:, None])
        done |= (torch.isin(batch.seq, batch.stop_ids) & fresh).any(-1)
    return done


def collect(batch: Batch, count: torch.Tensor) -> list[list[int]]:
    """Each row's generated tokens, cut at its budget and after its first stop token."""
    stop_ids = set(batch.stop_ids.tolist())
    outputs = []
    for row in range(batch.seq.shape[0]):
        start = int(batch.prompt_len[row])
        tokens = batch.seq[row, start:min(int(count[row]), start + int(batch.budget[row]))].tolist()
        stop = next((i for i, token in enumerate(tokens) if token in stop_ids), None)
        outputs.append(tokens if stop is None else tokens[:stop + 1])
    return outputs
