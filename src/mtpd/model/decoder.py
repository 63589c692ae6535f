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

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mtpd.config import ModelConfig

if TYPE_CHECKING:
    from mtpd.model.source import ModelSource


class KVCache:
    """Keys and values for `n_layers` attention layers: [n_layers, batch, n_kv_heads, max_len, head_dim]."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, static_shapes: bool = False):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Static shapes (compiled decoding): every pass attends to all max_len slots through its mask and
        # writes by scatter, so a pass's shapes depend on its token count only and nothing is read on the
        # host. Otherwise a pass attends to slots 0..max(positions), read on the host: cheaper eagerly when
        # the cache is much longer than what is filled.
        self.static_shapes = static_shapes

    @property
    def attended_len(self) -> int | None:
        """The slots every pass attends to with static shapes (all of them); None: up to its last position."""
        return self.k.shape[3] if self.static_shapes else None

    def layer(self, index: int) -> "KVCache":
        """Layer `index` alone, as a one-layer cache sharing this one's storage (written through, not copied).
        Its tensors alias the storage without being views of the whole: torch.compile guards on a view's base,
        whose layer count would set the main model's blocks (many layers) apart from the heads' (one)."""
        one = copy.copy(self)
        one.k, one.v = _alias(self.k[index:index + 1]), _alias(self.v[index:index + 1])
        return one

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

    def load_rows(self, rows: torch.Tensor, other: "KVCache") -> None:
        """Rows `rows` [R] take `other`'s R rows (every layer, its slots 0..other's length-1): a prompt
        prefilled apart joins a batch in progress (decode/continuous.py). The rows' later slots keep stale
        entries, which no query attends to before it overwrites them (the module doc)."""
        length = other.k.shape[3]
        self.k[:, rows, :, :length] = other.k
        self.v[:, rows, :, :length] = other.v

    def copy_slots(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Per row, copy the entries at slots source [B, T] to slots target [B, T] (every layer); all sources
        are read before any target is written."""
        L, B, H, _, D = self.k.shape
        src = source[None, :, None, :, None].expand(L, B, H, -1, D)
        dst = target[None, :, None, :, None].expand(L, B, H, -1, D)
        for buffer in (self.k, self.v):
            buffer.scatter_(3, dst, buffer.gather(3, src))


def _alias(view: torch.Tensor) -> torch.Tensor:
    """A tensor over `view`'s memory that is not a view (no `_base`)."""
    return view.new_empty(0).set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())


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

    def cached_span(self, positions: torch.Tensor, attended_len: int | None = None) -> Span:
        """A pass over per-row positions [B, T] that reads and writes a KV cache: it attends to slots
        0..max(positions), or to `attended_len` slots (a static-shape cache, `KVCache.attended_len`)."""
        if attended_len is not None:  # no host read: what a compiled pass needs
            # Compiled code specialises on how its inputs were made (expanded, a view of another tensor): a
            # fresh copy looks the same to it in every pass.
            positions = positions.clone(memory_format=torch.contiguous_format)
            key_positions = torch.arange(attended_len, device=positions.device)
            mask = key_positions[None, None, None, :] <= positions[:, None, :, None]
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
            return Span(positions, cos, sin, mask, attended_len, None)
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

    def tree_span(self, positions: torch.Tensor, tree: TreeAttention, check_bounds: bool = True) -> Span:
        """A pass over per-row positions [B, T] written at tree.slots, attending through tree.mask.
        `check_bounds` False: no host read (a static-shape cache; its caller keeps positions in the context)."""
        if check_bounds and int(positions.max()) >= self.cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} is beyond the context length {self.cos.shape[0]}")
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        return Span(positions, cos, sin, tree.mask[:, None], tree.mask.shape[-1], None, tree.slots)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # The tables are fp32 (precision.cast_for_decoding leaves them so) and are cast to the activations'
    # dtype before rotating, as transformers' Llama does: a bf16 model then rounds as transformers' bf16
    # Llama does, and fp32 is unchanged.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


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
            y = attend_cached(q, k, v, span.mask, gqa)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, gqa: bool) -> torch.Tensor:
    """Attention of a cached pass. One bf16 query per row on a CPU is computed in fp32: PyTorch's CPU kernel
    took 3-5x longer for it in bf16 than in fp32 (torch 2.13, SmolLM2's layer over 384 keys: 0.25 against
    0.07 ms at batch 1, 4.3 against 1.0 ms at batch 16), which made attention most of a batched bf16 decode
    step. Passes of several queries (prefills, verifications) keep the bf16 kernel, which is the faster there
    (docs/design.md §10.3)."""
    if q.shape[2] == 1 and q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                              enable_gqa=gqa).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


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


BlockRunner = Callable[[Block, torch.Tensor, Span, "KVCache | None", int], torch.Tensor]


def run_block(block: Block, x: torch.Tensor, span: Span, cache: KVCache | None, layer: int) -> torch.Tensor:
    """How a pass runs each block by default: eagerly. Compiled decoding passes its own runner
    (decode/passes.py), which compiles the block once for every layer and head."""
    return block(x, span, cache, layer)


class Decoder(nn.Module):
    """The built-in main model; it satisfies the `Backbone` interface (model/backbone.py).

    `forward` returns the last hidden state h0 (before the final norm, docs/design.md §1).
    """

    supports_tree_attention = True  # forward accepts `tree`; its KVCache has copy_slots
    runtime = "mtpd"  # what computes the main model (recorded with heads trained on an imported model)

    def __init__(self, cfg: ModelConfig, source: "ModelSource | None" = None):
        super().__init__()
        self.cfg = cfg
        self.source = source  # where the weights came from when mtpd does not own them (model/source.py)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)

    @classmethod
    def from_weights(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], source: "ModelSource | None" = None
                     ) -> "Decoder":
        """A decoder holding `state` (its own parameter names; with tied embeddings the output layer may be
        absent), built on the meta device so that a large model is never initialised randomly first."""
        with torch.device("meta"):
            decoder = cls(cfg, source)
        if cfg.tie_embeddings:
            state = {name: t for name, t in state.items() if name != "lm_head.weight"}
            state["lm_head.weight"] = state["embed.weight"]
        decoder.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_embeddings:
            decoder.lm_head.weight = decoder.embed.weight  # assign=True made two parameters of the one tensor
        # The RoPE tables are computed, not loaded: build them for real (on the meta device they are empty).
        decoder.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta).to(decoder.embed.weight.device)
        return decoder

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def head_config(self, num_heads: int) -> ModelConfig:
        """The MTP heads' shape on this main model: its own, with `num_heads` heads."""
        return dataclasses.replace(self.cfg, mtp_heads=num_heads)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, tree: TreeAttention | None = None,
                runner: BlockRunner = run_block) -> torch.Tensor:
        """tokens [B, T] -> h0 [B, T, d]. Without a cache: a causal pass over positions 0..T-1. With one: the
        tokens sit at `positions` [B, T] (per row), their keys/values are written there, and each attends to
        every cached position <= its own; with `tree`, they are written at tree.slots and attend through
        tree.mask instead. `runner` runs each block (`run_block`: eagerly)."""
        if cache is None:
            span = self.rotary.causal_span(tokens.shape[1])
        elif tree is None:
            span = self.rotary.cached_span(positions, cache.attended_len)
        else:
            span = self.rotary.tree_span(positions, tree, check_bounds=cache.attended_len is None)
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            x = runner(block, x, span, cache, layer)
        return x

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection W_out, shared with the MTP heads."""
        return self.lm_head(x)

    @property
    def output_layer(self) -> nn.Linear:
        return self.lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def new_cache(self, batch_size: int, max_len: int | None = None, static_shapes: bool = False) -> KVCache:
        weight = self.lm_head.weight
        return KVCache(self.cfg.n_layers, batch_size, max_len or self.cfg.max_seq_len, self.cfg.n_kv_heads,
                       self.cfg.head_dim, weight.device, weight.dtype, static_shapes)


def init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 style: N(0, 0.02), output projections of residual branches scaled by 1/sqrt(2 * n_layers)."""
    for name, param in module.named_parameters():
        if param.dim() < 2:
            continue
        std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.out.weight", "mlp.down.weight")) else 0.02
        nn.init.normal_(param, mean=0.0, std=std)
