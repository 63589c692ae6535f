"""Cascaded multi-token prediction heads in the DeepSeek-V3 style (DESIGN §1).

Head k at position i combines the previous level's hidden state h{k-1}_i with the embedding of token
t_{i+k}, runs one transformer block, and predicts t_{i+k+1} through the main model's shared output
projection after its own final norm:

    u_i  = M_k · concat(RMSNorm_h(h{k-1}_i), RMSNorm_e(Emb(t_{i+k})))
    hk   = Block_k(u)
    zk_i = W_out · norm_k(hk_i)
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from mtpd.config import ModelConfig
from mtpd.errors import MtpdError
from mtpd.model.backbone import Backbone
from mtpd.model.decoder import Block, Decoder, KVCache, Rotary, Span, TreeAttention, init_weights


class MTPHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.embed_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, prev_hidden: torch.Tensor, next_embeddings: torch.Tensor, span: Span,
                cache: KVCache | None = None) -> torch.Tensor:
        u = self.proj(torch.cat((self.hidden_norm(prev_hidden), self.embed_norm(next_embeddings)), dim=-1))
        return self.block(u, span, cache, 0)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class MTPModel(nn.Module):
    """A main model (`Backbone`, the built-in decoder by default) plus K cascaded MTP heads that share its
    embedding and output projection. The heads have the main model's width, so every head has the same
    shape and a trained head can initialise another (looped extension)."""

    def __init__(self, cfg: ModelConfig, backbone: Backbone | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        self.main = Decoder(cfg) if backbone is None else backbone
        self.heads = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.mtp_heads))
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # the heads' own positions
        if backbone is None:
            init_weights(self.main, cfg.n_layers)
        for head in self.heads:
            init_weights(head, cfg.n_layers)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher-forced pass over tokens [B, T]: main logits [B, T, V] and, for k = 1..K, head k's logits
        [B, T-k, V], whose position i predicts t_{i+k+1}.

        Frozen parts (no parameter requires grad) run without autograd as long as nothing before them
        trains: head-only training and looped extension then cost no activation memory for them.
        """
        T = tokens.shape[1]
        track = torch.is_grad_enabled() and _trainable(self.main)
        with torch.set_grad_enabled(track):
            hidden = self.main(tokens)
            main_logits = self.main.logits(hidden)
            embeddings = self.main.embed(tokens)
        head_logits = []
        for k, head in enumerate(self.heads[:T - 1], start=1):
            track = track or (torch.is_grad_enabled() and _trainable(head))
            with torch.set_grad_enabled(track):
                hidden = head(hidden[:, :T - k], embeddings[:, k:], self.rotary.causal_span(T - k))
                head_logits.append(self.head_logits(k, hidden))
        return main_logits, head_logits

    def extend_heads(self, num_heads: int) -> None:
        """Looped extension (DESIGN §3.3): grow m heads to num_heads (a multiple of m); head m+j starts as an
        exact copy of head ((j-1) mod m) + 1, so m -> 2m copies heads 1..m into m+1..2m."""
        m = self.num_heads
        if m == 0 or num_heads <= m or num_heads % m:
            raise MtpdError(f"cannot extend {m} heads to {num_heads}: --to must be a multiple of {m} larger than "
                            f"{m} (looped extension copies heads 1..{m}), e.g. --to {2 * max(m, 1)}")
        self.heads.extend(copy.deepcopy(self.heads[j % m]) for j in range(num_heads - m))
        self.cfg = dataclasses.replace(self.cfg, mtp_heads=num_heads)

    def head_logits(self, k: int, hk: torch.Tensor) -> torch.Tensor:
        """Logits of head k (1-based) from its hidden states."""
        return self.main.project(self.heads[k - 1].norm(hk))

    def head_step(self, k: int, prev_hidden: torch.Tensor, positions: torch.Tensor, next_tokens: torch.Tensor,
                  cache: KVCache, tree: TreeAttention | None = None) -> torch.Tensor:
        """Head k over per-row positions [B, T] of a cached pass, reading h{k-1} there and the tokens at
        positions + k; returns hk [B, T, d]. With `tree`, the tokens are written at tree.slots and attend
        through tree.mask (tree drafting: several nodes share a position)."""
        span = self.rotary.cached_span(positions) if tree is None else self.rotary.tree_span(positions, tree)
        return self.heads[k - 1](prev_hidden, self.main.embed(next_tokens), span, cache)

    def new_head_caches(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        weight = self.heads[0].proj.weight if self.heads else self.rotary.cos
        return [KVCache(1, batch_size, max_len or self.cfg.max_seq_len, self.cfg.n_kv_heads, self.cfg.head_dim,
                        weight.device, weight.dtype) for _ in self.heads]
