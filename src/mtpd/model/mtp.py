"""Cascaded multi-token prediction heads in the DeepSeek-V3 style (DESIGN §1).

Head k at position i combines the previous level's hidden state h{k-1}_i with the embedding of token
t_{i+k}, runs one transformer block, and predicts t_{i+k+1} through the main model's shared output
projection after its own final norm:

    u_i  = M_k · concat(RMSNorm_h(h{k-1}_i), RMSNorm_e(Emb(t_{i+k})))
    hk   = Block_k(u)
    zk_i = W_out · norm_k(hk_i)
"""

from __future__ import annotations

import torch
from torch import nn

from mtpd.config import ModelConfig
from mtpd.model.decoder import Block, Decoder, KVCache, Span, init_weights


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


class MTPModel(nn.Module):
    """The main decoder plus K cascaded MTP heads sharing its embedding and output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.main = Decoder(cfg)
        self.heads = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.mtp_heads))
        init_weights(self, cfg.n_layers)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher-forced pass over tokens [B, T].

        Returns h0 [B, T, d] and, for k = 1..K, hk [B, T-k, d] whose position i predicts t_{i+k+1}.
        """
        h0 = self.main(tokens)
        return h0, self.run_heads(h0, tokens)

    def run_heads(self, h0: torch.Tensor, tokens: torch.Tensor, frozen: int = 0) -> list[torch.Tensor]:
        """The heads' teacher-forced pass; the first `frozen` heads run without autograd."""
        T = tokens.shape[1]
        embeddings = self.main.embed(tokens)
        hidden, prev = [], h0
        for k, head in enumerate(self.heads, start=1):
            if T - k < 1:
                break
            with torch.set_grad_enabled(torch.is_grad_enabled() and k > frozen):
                prev = head(prev[:, :T - k], embeddings[:, k:], self.main.rotary.causal_span(T - k))
            hidden.append(prev)
        return hidden

    def main_logits(self, h0: torch.Tensor) -> torch.Tensor:
        return self.main.logits(h0)

    def head_logits(self, k: int, hk: torch.Tensor) -> torch.Tensor:
        """Logits of head k (1-based) from its hidden states."""
        return self.main.lm_head(self.heads[k - 1].norm(hk))

    def new_head_caches(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        weight = self.main.lm_head.weight
        return [KVCache(1, batch_size, max_len or self.cfg.max_seq_len, self.cfg.n_kv_heads, self.cfg.head_dim,
                        weight.device, weight.dtype) for _ in self.heads]
