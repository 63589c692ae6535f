"""Weights in and out of mtpd's built-in decoder: one map between its parameter names and Hugging Face
Llama's, used both ways (`mtpd export-hf` writes a LlamaForCausalLM; `--hf` loads a Llama into the decoder).

The built-in decoder *is* a Llama: RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention, no biases.
Two weights differ only in layout: the decoder fuses q/k/v into one `qkv` projection and gate/up into one
`gate_up` projection, where Llama keeps them apart. Everything else maps one to one.

Which Hugging Face configurations map (`decoder_config`): model types `llama` and `mistral` without a
sliding window; SiLU activation; no attention or MLP biases; `head_dim` = hidden / heads; plain RoPE
(`rope_type` "default": no linear/dynamic/yarn/llama3 scaling); `pretraining_tp` 1; tied or untied output
layer. Anything else is `Unmappable` with the reason, and such a model stays on the transformers adapter
(model/hf.py).
"""

from __future__ import annotations

import torch

from mtpd.config import ModelConfig

# Per block: decoder name -> Llama name(s). A tuple is a fused weight: Llama's parts, concatenated on dim 0.
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.out.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down.weight": "mlp.down_proj.weight",
}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
MAPPED_TYPES = ("llama", "mistral")


class Unmappable(ValueError):
    """A Hugging Face configuration the built-in decoder does not compute; the message says why."""


def _names(cfg: ModelConfig) -> dict[str, str | tuple[str, ...]]:
    names = {ours: theirs for ours, theirs in _TOP.items() if ours != "lm_head.weight" or not cfg.tie_embeddings}
    for i in range(cfg.n_layers):
        names |= {f"blocks.{i}.{ours}": (tuple(f"model.layers.{i}.{t}" for t in theirs) if isinstance(theirs, tuple)
                                         else f"model.layers.{i}.{theirs}") for ours, theirs in _BLOCK.items()}
    return names


def _split_sizes(cfg: ModelConfig, fused: str) -> list[int]:
    if fused.endswith("qkv.weight"):
        return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    return [cfg.ffn_dim, cfg.ffn_dim]


def to_llama_names(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A decoder state dict (`Decoder.state_dict()`) under LlamaForCausalLM's names, fused weights split.
    With tied embeddings the output layer is not listed (Llama ties it to the embedding itself)."""
    llama = {}
    for ours, theirs in _names(cfg).items():
        if isinstance(theirs, tuple):
            llama |= dict(zip(theirs, state[ours].split(_split_sizes(cfg, ours), dim=0)))
        else:
            llama[theirs] = state[ours]
    return {name: tensor.detach().clone() for name, tensor in llama.items()}


def from_llama_names(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state dict under the decoder's names, split weights fused. Raises KeyError naming a
    tensor the Llama lacks."""
    ours = {}
    for name, theirs in _names(cfg).items():
        ours[name] = torch.cat([state[t] for t in theirs], dim=0) if isinstance(theirs, tuple) else state[theirs]
    return ours


def decoder_config(hf_config, max_seq_len: int, mtp_heads: int = 0) -> ModelConfig:
    """The built-in decoder's configuration computing the same function as a Hugging Face Llama-family
    model (its text config), with the context capped at `max_seq_len`; raises Unmappable with the reason
    when the decoder cannot compute it."""
    c = hf_config
    model_type = getattr(c, "model_type", None)
    if model_type not in MAPPED_TYPES:
        raise Unmappable(f"model type {model_type!r} is not a Llama (mapped: {', '.join(MAPPED_TYPES)})")
    rope = getattr(c, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    reasons = [
        (getattr(c, "sliding_window", None) is None, f"sliding_window {getattr(c, 'sliding_window', None)}"),
        (getattr(c, "hidden_act", "silu") == "silu", f"activation {getattr(c, 'hidden_act', None)!r} (not silu)"),
        (not getattr(c, "attention_bias", False), "attention biases"),
        (not getattr(c, "mlp_bias", False), "MLP biases"),
        (head_dim * c.num_attention_heads == c.hidden_size,
         f"head_dim {head_dim} x {c.num_attention_heads} heads != hidden_size {c.hidden_size}"),
        (rope_type == "default", f"RoPE scaling {rope_type!r}"),
        (getattr(c, "pretraining_tp", 1) == 1, f"pretraining_tp {getattr(c, 'pretraining_tp', None)}"),
    ]
    refused = [reason for ok, reason in reasons if not ok]
    if refused:
        raise Unmappable(f"{model_type} with {', '.join(refused)}: mtpd's decoder has plain RoPE, SiLU, no biases "
                         f"and no sliding window")
    return ModelConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads, ffn_dim=c.intermediate_size,
        max_seq_len=min(c.max_position_embeddings, max_seq_len), mtp_heads=mtp_heads,
        rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))), norm_eps=float(c.rms_norm_eps),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
    ).validate()


def llama_config(cfg: ModelConfig, eos: int | None = None):
    """The LlamaConfig of a decoder configuration (the inverse of `decoder_config`)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None, eos_token_id=eos, pad_token_id=None)
