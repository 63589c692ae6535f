"""Acceptance metrics (docs/design.md §5): one definition, used by training evaluation, decoding and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def offline_acceptance(head_top1: torch.Tensor, main_logits: torch.Tensor, k: int) -> tuple[int, int]:
    """Teacher-forced acceptance of head k: (matches, positions) where head k's top-1 token [B, T-k] (a token
    id, also with a draft vocabulary) equals the main head's top-1 for the same target token (the main head
    at position i + k)."""
    teacher = main_logits[:, k:k + head_top1.shape[1]]
    matches = (head_top1 == teacher.argmax(-1)).sum()
    return int(matches), head_top1.shape[0] * head_top1.shape[1]


def acceptance_rates(accepted_per_step: Sequence[int], num_drafts: int,
                     drafted_per_step: Sequence[int] | None = None) -> list[float]:
    """AR_k: among steps that reached draft k (drafts 1..k-1 accepted, and draft k proposed: with dynamic
    draft length a step may stop drafting earlier), the fraction that accepted draft k."""
    drafted_per_step = drafted_per_step or [num_drafts] * len(accepted_per_step)
    rates = []
    for k in range(1, num_drafts + 1):
        reached = [a for a, d in zip(accepted_per_step, drafted_per_step) if a >= k - 1 and d >= k]
        rates.append(sum(1 for a in reached if a >= k) / len(reached) if reached else 0.0)
    return rates


def cumulative_acceptance(accepted_per_step: Sequence[int], num_drafts: int) -> list[float]:
    """CAR_k: fraction of steps that accepted at least k drafts (= AR_1 * ... * AR_k)."""
    n = len(accepted_per_step)
    return [sum(1 for a in accepted_per_step if a >= k) / n if n else 0.0 for k in range(1, num_drafts + 1)]


def teacher_forced_accepts(head_top1: Sequence[torch.Tensor], tokens: Sequence[int], prompt_len: int,
                           accepted: Sequence[int]) -> list[int]:
    """Accepted drafts per step of a greedy chain decode, as the heads' teacher-forced predictions on its output
    say they should be. tokens: prompt + output; head_top1[k-1][i]: head k's top-1 token id at position i of a
    teacher-forced pass over them (it proposes token i+1+k); accepted: the decode's accepted drafts per step,
    which say where each step starts (its pending token at prompt_len, then one past each step's tokens).

    A step whose pending token sits at position c drafts with head k from position c-1, on the cascade of the
    true tokens as long as heads 1..k-1 were accepted: it accepts as many leading heads as match the output.
    The last step can accept drafts past the output's end (the budget or a stop token cuts them), which
    cannot be checked here: its prediction counts only those inside."""
    predicted, pending = [], prompt_len
    for step_accepted in accepted:
        n = 0
        for k, top1 in enumerate(head_top1, start=1):
            if pending + k >= len(tokens) or int(top1[pending - 1]) != tokens[pending + k]:
                break
            n += 1
        predicted.append(n)
        pending += step_accepted + 1
    return predicted


def first_divergence(output: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first token where `output` departs from `reference` (where the shorter one ends, if one
    is a prefix of the other); None when they are equal."""
    for index, (token, expected) in enumerate(zip(output, reference)):
        if token != expected:
            return index
    return None if len(output) == len(reference) else min(len(output), len(reference))


def mean_accepted_tokens(accepted_per_step: Sequence[int]) -> float:
    """tau: tokens emitted per main-model verification = 1 + mean accepted drafts."""
    return 1.0 + sum(accepted_per_step) / len(accepted_per_step) if accepted_per_step else 0.0
