"""What every decode loop shares: batching prompts, per-row token budgets, stop conditions, outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtpd.errors import MtpdError


@dataclass
class Generation:
    tokens: list[list[int]]  # generated tokens per row, prompt excluded, cut after EOS and at the budget
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

    @property
    def max_prompt_len(self) -> int:
        return int(self.prompt_len.max())


def make_batch(prompts: list[list[int]], max_new_tokens: int, context: int, extra: int,
               device: torch.device) -> Batch:
    """Lay out prompts; `extra` is room past the last generated token (speculative drafts)."""
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
    budget = torch.clamp(context - lengths, max=max_new_tokens)
    return Batch(seq, lengths, budget)


def finished(batch: Batch, count: torch.Tensor, new_start: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Rows that reached their budget, or emitted EOS among seq[new_start:count]."""
    done = count - batch.prompt_len >= batch.budget
    if eos_id is not None:
        positions = torch.arange(batch.seq.shape[1], device=count.device)
        fresh = (positions >= new_start[:, None]) & (positions < count[:, None])
        done |= ((batch.seq == eos_id) & fresh).any(-1)
    return done


def collect(batch: Batch, count: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    """Each row's generated tokens, cut at its budget and after its first EOS."""
    outputs = []
    for row in range(batch.seq.shape[0]):
        start = int(batch.prompt_len[row])
        tokens = batch.seq[row, start:min(int(count[row]), start + int(batch.budget[row]))].tolist()
        if eos_id is not None and eos_id in tokens:
            tokens = tokens[:tokens.index(eos_id) + 1]
        outputs.append(tokens)
    return outputs
