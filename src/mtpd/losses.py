"""The MTP-D objective (docs/design.md §2) as pure functions.

Alignment, for a window of tokens t_0..t_T (inputs t_0..t_{T-1}):
  main head at position i predicts t_{i+1};
  head k at position i (i = 0..T-k-1) predicts t_{i+k+1}, and its teacher is the main head at position
  i+k, which predicts the same token from the same information (t_<=i+k).

    L = CE(z0, t_{+1}) + sum_k alpha_k CE(zk, t_{+k+1}) + sum_k beta KL_k
    KL_k = mean_i KL(q_i || r_i),  q = softmax(sg(z0_{i+k})[S] / tau),  r = softmax(zk_i[S] / tau),
    S = top-N indices of the teacher's logits (both renormalised over S).

With a draft vocabulary V' (the heads score only its N tokens, model/draft_vocab.py; docs/design.md §10) head logits
are over V': a head's CE leaves out the targets outside V' (it cannot propose them) and its KL is over V',
the teacher restricted to V' and then to its top-N there, both renormalised. The main head's CE is unchanged.

`mtp_d_loss` is the whole objective from the main head's full logits; `heads_loss` is its head terms from a
teacher already restricted to V', what head-only training computes (the frozen main head is then only the
teacher, scored over V' alone: MTPModel.forward's main_scores="draft").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtpd.config import LossConfig
from mtpd.model.draft_vocab import draft_index_map


def head_targets(window: torch.Tensor, k: int) -> torch.Tensor:
    """Targets of head k (k = 0: the main head) for a window [B, T+1]: t_{i+k+1} for i = 0..T-k-1."""
    return window[:, k + 1:]


def head_teacher(main_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher of head k at positions i = 0..T-k-1: the main head at i + k."""
    return main_logits[:, k:]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def draft_cross_entropy(log_probs: torch.Tensor, draft_targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of draft_targets [...] (draft indices) under log_probs [..., N], over the
    targets inside the draft vocabulary (-1 marks the others); 0 when there are none."""
    targets = draft_targets.reshape(-1)
    nll = F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), targets, ignore_index=-1, reduction="sum")
    return nll / (targets >= 0).sum().clamp_min(1)


def top_n_support(teacher_logits: torch.Tensor, top_n: int | None) -> torch.Tensor | None:
    """Indices [..., N] of the teacher's top-N logits; None when N covers the vocabulary (full KL)."""
    if top_n is None or top_n >= teacher_logits.shape[-1]:
        return None
    return teacher_logits.topk(top_n, dim=-1).indices


def kl_from_log_probs(log_q: torch.Tensor, log_r: torch.Tensor, direction: str = "forward") -> torch.Tensor:
    """Mean over positions of KL(q || r) (forward) or KL(r || q) (reverse), from log-probabilities."""
    if direction == "forward":
        kl = (log_q.exp() * (log_q - log_r)).sum(-1)
    elif direction == "reverse":
        kl = (log_r.exp() * (log_r - log_q)).sum(-1)
    else:
        raise ValueError(f"unknown KL direction {direction!r}")
    return kl.mean()


def restricted_log_probs(logits: torch.Tensor, support: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """log softmax(logits[support] / temperature): the distribution renormalised over the support."""
    if support is not None:
        logits = logits.gather(-1, support)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def top_n_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, support: torch.Tensor | None = None,
             temperature: float = 1.0, direction: str = "forward") -> torch.Tensor:
    """KL between teacher and student, both renormalised over `support` (None: the whole vocabulary).

    The caller decides whether the teacher carries gradient (stop-gradient is `teacher.detach()`).
    """
    return kl_from_log_probs(restricted_log_probs(teacher_logits, support, temperature),
                             restricted_log_probs(student_logits, support, temperature), direction)


def top_n_for_mass(logits: torch.Tensor, mass: float, max_positions: int = 1024) -> int:
    """Smallest N whose top-N probability mass, averaged over positions, reaches `mass`."""
    probs = logits.detach().reshape(-1, logits.shape[-1])[:max_positions].float().softmax(-1)
    coverage = probs.sort(dim=-1, descending=True).values.cumsum(-1).mean(0)
    return min(int((coverage < mass).sum()) + 1, logits.shape[-1])


@dataclass
class LossTerms:
    total: torch.Tensor
    main_ce: torch.Tensor | None  # None when not computed (head-only training reports it at evaluation)
    head_ce: list[torch.Tensor]
    head_kl: list[torch.Tensor]


def mtp_d_loss(window: torch.Tensor, main_logits: torch.Tensor, head_logits: list[torch.Tensor],
               cfg: LossConfig, top_n: int | None = None, draft_ids: torch.Tensor | None = None) -> LossTerms:
    """The MTP-D objective for a window [B, T+1], main logits [B, T, V] and head logits [B, T-k, N] over the
    draft vocabulary `draft_ids` [N] (None: the whole vocabulary, N = V).

    `top_n` overrides `cfg.top_n` (the trainer resolves cfg.top_n = None to a mass-covering N).
    """
    main_ce = cross_entropy(main_logits, head_targets(window, 0))
    teacher = None
    if cfg.resolved_beta(len(head_logits)):
        teacher = main_logits.detach() if cfg.stop_grad else main_logits
        if draft_ids is not None:
            teacher = teacher.index_select(-1, draft_ids)
    draft_index = None if draft_ids is None else draft_index_map(draft_ids, main_logits.shape[-1])
    heads = heads_loss(window, teacher, head_logits, cfg, top_n, draft_index)
    return LossTerms(cfg.main_weight * main_ce + heads.total, main_ce, heads.head_ce, heads.head_kl)


def heads_loss(window: torch.Tensor, teacher_logits: torch.Tensor | None, head_logits: list[torch.Tensor],
               cfg: LossConfig, top_n: int | None = None, draft_index: torch.Tensor | None = None) -> LossTerms:
    """The heads' part of the MTP-D objective, sum_k alpha_k CE_k + beta KL_k, from the main head's logits
    over the draft vocabulary [B, T, N] (the teacher; None when beta is 0) and head logits [B, T-k, N].
    `draft_index` [V]: the draft index of each token id, -1 outside (`draft_index_map`; None: N = V).

    What head-only training computes (main_ce None): the frozen main head is only the teacher, so it need not
    score the whole vocabulary. Every head's teacher is a shifted slice of the main head, so the teacher's
    support and log-probabilities are computed once and sliced per head.
    """
    K = len(head_logits)
    alpha = cfg.alpha_lambda / K if K else 0.0
    beta = cfg.resolved_beta(K)
    if beta:
        support = top_n_support(teacher_logits.detach(), top_n if top_n is not None else cfg.top_n)
        teacher_log_probs = restricted_log_probs(teacher_logits, support, cfg.temperature)
    total = torch.zeros((), device=window.device)
    head_ce, head_kl = [], []
    for k, logits in enumerate(head_logits, start=1):
        log_probs = F.log_softmax(logits.float(), dim=-1)
        targets = head_targets(window, k)
        ce = draft_cross_entropy(log_probs, targets if draft_index is None else draft_index[targets])
        if beta:
            student_log_probs = (log_probs if support is None and cfg.temperature == 1.0 else
                                 restricted_log_probs(logits, None if support is None else support[:, k:],
                                                      cfg.temperature))
            kl = kl_from_log_probs(head_teacher(teacher_log_probs, k), student_log_probs, cfg.kl_direction)
        else:
            kl = torch.zeros((), device=logits.device)
        total = total + alpha * ce + beta * kl
        head_ce.append(ce)
        head_kl.append(kl)
    return LossTerms(total, None, head_ce, head_kl)
