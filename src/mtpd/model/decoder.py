"""The built-in decoder: a Llama-style causal transformer with an explicit, position-indexed KV cache.

RMSNorm, rotary position embeddings (the "rotate half" layout used by Hugging Face Llama, so weights
convert one-to-one), SwiGLU MLP, causal attention through `scaled_dot_product_attention`, optional
grouped-query attention.

The KV cache is static storage indexed by position. A forward pass that uses it receives the per-row
positions of its tokens (a `Span`): it writes their keys/values at those positions and lets each query
attend to every cached position <= its own. Cutting the cache back to a prefix therefore costs nothing:
the caller lowers its length, and the entries beyond are never attended to before a later pass
overwrites them (passes always cover a contiguous range starting at or before the valid length).

Tree verification (decode/tree.py) decouples cache slots from positions: several candidate tokens share a
position, so a `TreeAttention` pass writes its tokens at explicit slots and attends through an explicit
mask, and `KVCache.copy_slots` later moves the accepted path's entries to their sequential slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtpd.config import ModelConfig


class KVCache:
    """Keys and values for `n_layers` attention layers: [n_layers, batch, n_kv_heads, max_len, head_dim]."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, span: "Span") -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, hd] at the span's positions; return the keys/values to attend to."""
        if span.start is not None:  # every row writes the same contiguous range: a plain slice copy
            self.k[layer, :, :, span.start:span.start + k.shape[2]] = k
            self.v[layer, :, :, span.start:span.start + k.shape[2]] = v
        else:
            slots = span.positions if span.slots is None else span.slots
            index = slots[:, None, :, None].expand_as(k)
            self.k[layer].scatter_(2, index, k)
            self.v[layer].scatter_(2, index, v)
        return self.k[layer, :, :, :span.kv_len], self.v[layer, :, :, :span.kv_len]

    def copy_slots(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Per row, copy the entries at slots source [B, T] to slots target [B, T] (every layer); all sources
        are read before any target is written."""
        L, B, H, _, D = self.k.shape
        src = source[None, :, None, :, None].expand(L, B, H, -1, D)
        dst = target[None, :, None, :, None].expand(L, B, H, -1, D)
        for buffer in (self.k, self.v):
            buffer.scatter_(3, dst, buffer.gather(3, src))


@dataclass
class Span:
    """Where a forward pass sits: the per-row positions [B, T] of its tokens, and what follows from them."""

    positions: torch.Tensor
    cos: torch.Tensor  # [B or 1, 1, T, head_dim / 2]
    sin: torch.Tensor
    mask: torch.Tensor | None  # [B, 1, T, kv_len] bool; None: plain causal over 0..T-1 (no cache)
    kv_len: int  # keys attended to: slots 0..kv_len-1
    start: int | None  # set when all rows share positions start..start+T-1 (and write them there)
    slots: torch.Tensor | None = None  # [B, T] cache slots written, when they differ from the positions (trees)


@dataclass(frozen=True)
class TreeAttention:
    """A cached pass whose tokens do not form a sequence (a draft tree): the cache slots [B, T] its tokens are
    written at, and mask [B, T, kv_len] of the slots each token attends to. Positions (for RoPE) are passed
    separately, as for any cached pass."""

    slots: torch.Tensor
    mask: torch.Tensor


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def causal_span(self, length: int) -> Span:
        """Positions 0..length-1 of a fresh sequence, no cache: the training pass."""
        positions = torch.arange(length, device=self.cos.device)
        return Span(positions[None], self.cos[None, None, :length], self.sin[None, None, :length], None, length, 0)

    def cached_span(self, positions: torch.Tensor) -> Span:
        """A pass over per-row positions [B, T] that reads and writes a KV cache."""
        kv_len = int(positions.max()) + 1
        max_len = self.cos.shape[0]
        if kv_len > max_len:
            raise ValueError(f"position {kv_len - 1} is beyond the context length {max_len}")
        first = positions[:, :1]
        contiguous = positions.shape[1] == 1 or bool((positions == first + torch.arange(positions.shape[1], device=positions.device)).all())
        start = int(first[0]) if contiguous and bool((first == first[0]).all()) else None
        key_positions = torch.arange(kv_len, device=positions.device)
        mask = key_positions[None, None, None, :] <= positions[:, None, :, None]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        return Span(positions, cos, sin, mask, kv_len, start)

    def tree_span(self, positions: torch.Tensor, tree: TreeAttention) -> Span:
        """A pass over per-row positions [B, T] written at tree.slots, attending through tree.mask."""
        if int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} is beyond the context length {self.cos.shape[0]}")
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        return Span(positions, cos, sin, tree.mask[:, None], tree.mask.shape[-1], None, tree.slots)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, span: Span, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                     self.n_kv_heads * self.head_dim], dim=-1)
        q = apply_rotary(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), span.cos, span.sin)
        k = apply_rotary(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), span.cos, span.sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = cache.update(layer, k, v, span)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=span.mask, enable_gqa=gqa)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, span: Span, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), span, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """The built-in main model; it satisfies the `Backbone` interface (model/backbone.py).

    `forward` returns the last hidden state h0 (before the final norm, DESIGN §1).
    """

    supports_tree_attention = True  # forward accepts `tree`; its KVCache has copy_slots

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, tree: TreeAttention | None = None) -> torch.Tensor:
        """tokens [B, T] -> h0 [B, T, d]. Without a cache: a causal pass over positions 0..T-1. With one: the
        tokens sit at `positions` [B, T] (per row), their keys/values are written there, and each attends to
        every cached position <= its own; with `tree`, they are written at tree.slots and attend through
        tree.mask instead."""
        if cache is None:
            span = self.rotary.causal_span(tokens.shape[1])
        elif tree is None:
            span = self.rotary.cached_span(positions)
        else:
            span = self.rotary.tree_span(positions, tree)
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            x = block(x, span, cache, layer)
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection W_out, shared with the MTP heads."""
        return self.lm_head(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        weight = self.lm_head.weight
        return KVCache(self.cfg.n_layers, batch_size, max_len or self.cfg.max_seq_len, self.cfg.n_kv_heads,
                       self.cfg.head_dim, weight.device, weight.dtype)


def init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 style: N(0, 0.02), output projections of residual branches scaled by 1/sqrt(2 * n_layers)."""
    for name, param in module.named_parameters():
        if param.dim() < 2:
            continue
        std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.out.weight", "mlp.down.weight")) else 0.02
        nn.init.normal_(param, mean=0.0, std=std)
