"""Acceptance rules: how a token is chosen from logits, and how drafts are checked against the main model.

One decode loop serves every mode; the rule is what differs.

    Greedy               choose = argmax; accept drafts while they equal the main model's argmax.
    SpeculativeSampling  choose = sample from the transformed distribution (temperature, top-k, top-p);
                         accept draft d with probability min(1, p(d) / q(d)), on the first rejection sample
                         from norm(max(0, p - q)); if every draft is accepted, sample the next token from p.
                         The output then follows the main model's (transformed) distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtpd.errors import MtpdError


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """The distribution sampling draws from: softmax(logits / T) restricted to top-k and the top-p nucleus."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        probs = nucleus(probs, top_p)
    return probs


# The top-p nucleus is looked for among this many likeliest tokens first: a partial sort (topk) of a 49k
# vocabulary took 5 ms for 16 rows on the development CPU, a full sort 84 ms.
NUCLEUS_CANDIDATES = 256


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [..., V] restricted to the smallest set of likeliest tokens whose mass reaches top_p (the token
    crossing the threshold is kept), renormalised. Found among the NUCLEUS_CANDIDATES likeliest tokens when they
    hold top_p of the mass in every row (one host read), else by sorting the whole vocabulary."""
    candidates = min(NUCLEUS_CANDIDATES, probs.shape[-1])
    sorted_probs, order = probs.topk(candidates, dim=-1)
    if candidates < probs.shape[-1] and not bool((sorted_probs.sum(-1) >= top_p).all()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep_sorted)
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from probs [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def draft_probability(logits: torch.Tensor, tokens: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """The probability the draft distribution gave each drafted token (greedy: the softmax of the logits)."""
    if probs is None:
        probs = logits.float().softmax(-1)
    return probs.gather(-1, tokens[..., None]).squeeze(-1)


@dataclass(frozen=True)
class Greedy:
    needs_draft_probs = False  # greedy verification compares tokens

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None):
        """(tokens, probs): probs is None, greedy drafts need no distribution."""
        return logits.argmax(-1), None

    def verify(self, drafts: torch.Tensor, draft_probs, target_logits: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """drafts [B, D], target_logits [B, D+1, V] -> (accepted count [B], next token [B])."""
        targets = target_logits.argmax(-1)
        accepted = (drafts == targets[:, :-1]).long().cumprod(-1).sum(-1)
        return accepted, targets.gather(1, accepted[:, None]).squeeze(1)


@dataclass(frozen=True)
class SpeculativeSampling:
    needs_draft_probs = True  # min(1, p/q) needs each draft's q
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None):
        probs = self.probs(logits)
        return sample(probs, generator), probs

    def verify(self, drafts: torch.Tensor, draft_probs: torch.Tensor, target_logits: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """drafts [B, D] drawn from draft_probs [B, D, V]; target_logits [B, D+1, V]."""
        p = self.probs(target_logits)
        D = drafts.shape[1]
        p_draft = p[:, :D].gather(-1, drafts[..., None]).squeeze(-1)
        q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
        u = torch.rand(drafts.shape, generator=generator, device=drafts.device)
        accept = u * q_draft < p_draft  # u < p/q without dividing by q = 0
        accepted = accept.long().cumprod(-1).sum(-1)
        # next-token distribution: the residual at the first rejection, or p after the last draft
        residual = (p[:, :D] - draft_probs).clamp_min(0)
        mass = residual.sum(-1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p[:, :D])
        next_dist = torch.cat([residual, p[:, D:]], dim=1).gather(
            1, accepted[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)
        return accepted, sample(next_dist, generator)


def make_rule(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """temperature 0 means greedy."""
    if not temperature >= 0:  # nan too
        raise MtpdError(f"--temperature must be >= 0, 0 = greedy (got {temperature})")
    if top_k is not None and top_k < 1:
        raise MtpdError(f"--top-k must be >= 1 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        raise MtpdError(f"--top-p must be in (0, 1] (got {top_p})")
    if temperature == 0:
        return Greedy()
    return SpeculativeSampling(temperature, top_k, top_p)
