"""Teacher-forced evaluation on validation windows: main-head loss and perplexity, per-head cross-entropy,
and offline acceptance per head (docs/design.md §5).

With a draft vocabulary a head's cross-entropy is the training one, over the targets inside it; offline
acceptance compares token ids, so a target outside it counts as a miss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mtpd.losses import cross_entropy, draft_cross_entropy, head_targets
from mtpd.metrics import offline_acceptance
from mtpd.model import MTPModel


@torch.no_grad()
def evaluate(model: MTPModel, windows: torch.Tensor, batch_size: int = 8, autocast_dtype: torch.dtype | None = None) -> dict:
    """Metrics over windows [N, T+1]. Losses are averaged over windows, acceptance over positions."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    K = model.num_heads
    main_loss, head_loss = 0.0, [0.0] * K
    matches, positions = [0] * K, [0] * K
    for start in range(0, len(windows), batch_size):
        window = windows[start:start + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            main_logits, head_logits = model(window[:, :-1])
        main_logits = main_logits.float()
        # Weighted by the batch's windows: the last batch may be smaller, and every window counts once.
        main_loss += cross_entropy(main_logits, head_targets(window, 0)).item() * len(window)
        for k, logits in enumerate(head_logits, start=1):
            draft_targets = model.to_draft_indices(head_targets(window, k))
            ce = draft_cross_entropy(F.log_softmax(logits.float(), dim=-1), draft_targets)
            head_loss[k - 1] += ce.item() * len(window)
            m, n = offline_acceptance(model.to_token_ids(logits.argmax(-1)), main_logits, k)
            matches[k - 1] += m
            positions[k - 1] += n
    model.train(was_training)
    n_windows = max(len(windows), 1)
    val_loss = main_loss / n_windows
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "head_ce": [loss / n_windows for loss in head_loss],
        "offline_acceptance": [m / n if n else 0.0 for m, n in zip(matches, positions)],
        "val_tokens": int(windows.shape[0] * (windows.shape[1] - 1)),
    }
