"""A Hugging Face causal LM as mtpd's main model: the `Backbone` adapter (model/backbone.py).

Everything goes through the model's public API: the base model's `last_hidden_state` is h0 (after the final
norm; the MTP heads normalise their inputs again, so that is fine), the output embedding is W_out, the input
embedding is Emb, and the KV cache is a `transformers.DynamicCache`. No model file is copied or edited.

The cache contract of `Backbone` is position-indexed (a pass writes keys/values at per-row positions, and a
row is cut back just by starting its next pass earlier), while a `DynamicCache` only appends. `HFCache`
bridges the two with bookkeeping of *slots*: each pass appends one slot per token to every row, and
`slot_positions[b, s]` records the position slot s holds for row b, or -1 once the slot is stale. Before a
pass, a row's slots at or beyond its first new position become stale (that is the cut-back); the 2-D
`attention_mask` hides stale slots, `position_ids` carry the true positions, and trailing slots stale in
every row are dropped with `DynamicCache.crop`. A row's live slots hold positions 0..n-1 in increasing order,
so the model's causal rule over slots is the causal rule over positions. Rows of a batch that accepted
different numbers of drafts leave stale slots in the middle; they are masked, not removed, so the cache holds
at most max_new_tokens * (drafts + 1) slots beyond the prompt.

Supported: decoder-only models whose every layer attends to the full context (Qwen2, GPT-2, Phi-3, ...) and
whose logits are exactly `output_embedding(last_hidden_state)`; others are refused at load time with the
reason. Llama-family models do not use the adapter: their weights load into mtpd's own decoder
(model/backbone.py `load_backbone`), which has tree attention and a static cache.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from mtpd.config import ModelConfig
from mtpd.errors import MtpdError
from mtpd.model.source import ModelSource

# Context cap for the heads' RoPE table and the decoders' buffers when the model allows longer contexts.
DEFAULT_MAX_SEQ_LEN = 4096


class HFCache:
    """A `DynamicCache` plus the position each of its slots holds per row (-1: stale). See the module doc."""

    def __init__(self, kv, batch_size: int, max_len: int, device: torch.device):
        self.kv = kv
        self.max_len = max_len
        self.slot_positions = torch.empty(batch_size, 0, dtype=torch.long, device=device)

    def admit(self, positions: torch.Tensor) -> torch.Tensor:
        """Make room for a pass over per-row positions [B, T]: cut each row back to its first new position,
        drop slots stale in every row from the end, and append T slots. Returns the attention mask
        [B, slots] (1 where a slot is live) for the pass."""
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is beyond the cache length {self.max_len}")
        slots = self.slot_positions
        slots = slots.masked_fill(slots >= positions[:, :1], -1)
        live_anywhere = (slots >= 0).any(0)
        slot_numbers = torch.arange(1, slots.shape[1] + 1, device=slots.device)
        keep = int((slot_numbers * live_anywhere).max()) if slots.numel() else 0  # up to the last live slot
        if keep < slots.shape[1]:
            self.kv.crop(keep - slots.shape[1])
        self.slot_positions = torch.cat([slots[:, :keep], positions], dim=1)
        return (self.slot_positions >= 0).long()


class HFBackbone(nn.Module):
    """A `transformers` causal LM behind mtpd's `Backbone` interface. The wrapped model is a frozen teacher:
    it stays in eval mode (no dropout) whatever mode the heads train in. `source` is where it was loaded
    from, which checkpoints of heads trained on it reference."""

    runtime = "transformers"  # what computes the main model (recorded with the heads: h0 differs per runtime)

    def __init__(self, model: nn.Module, max_seq_len: int, source: ModelSource):
        super().__init__()
        self.model = model
        self.max_seq_len = max_seq_len
        self.source = source
        self.body = model.base_model  # the transformer without the LM head: returns last_hidden_state
        # The cache keyword is `cache` in recent transformers 5.x, `past_key_values` before.
        self.cache_keyword = "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"
        self.model.eval()

    # Tree drafting would need each drafted node to attend to its ancestors only (a per-query mask over cache
    # slots, not the 2-D padding mask HFCache builds) and cache entries moved between slots; transformers
    # models take such 4-D masks differently per architecture and attention kernel, so HF backbones draft
    # chains only (decode/tree_draft.py refuses a tree with a one-line error).
    supports_tree_attention = False

    def train(self, mode: bool = True) -> "HFBackbone":
        super().train(mode)
        self.model.eval()
        return self

    @property
    def config(self):
        return self.model.config

    def head_config(self, num_heads: int) -> ModelConfig:
        """The MTP heads' shape: the model's width, attention layout and MLP size."""
        return _head_config(self, num_heads)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: HFCache | None = None) -> torch.Tensor:
        """tokens [B, T] -> h0 [B, T, d]. Without a cache: a causal pass over positions 0..T-1. With one: the
        tokens sit at `positions` [B, T] (contiguous per row) and attend to the row's cached positions below."""
        if cache is None:
            return self.body(input_ids=tokens, use_cache=False).last_hidden_state
        attention_mask = cache.admit(positions)
        output = self.body(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                           **{self.cache_keyword: cache.kv})
        return output.last_hidden_state

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(tokens)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(x)

    @property
    def output_layer(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(hidden)  # h0 is already after the final norm

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def new_cache(self, batch_size: int, max_len: int | None = None) -> HFCache:
        from transformers import DynamicCache

        device = next(self.parameters()).device
        return HFCache(DynamicCache(), batch_size, max_len or self.max_seq_len, device)


# ------------------------------------------------------------------------------------------------ checks


def check_supported(config, source: ModelSource) -> None:
    """Refuse what neither the adapter nor the built-in decoder can drive: encoder-decoders, and layers that do
    not attend to the whole context."""
    text = config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False):
        raise MtpdError(f"{source} is an encoder-decoder model ({config.model_type}): mtpd needs a decoder-only causal LM")
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if getattr(text, "sliding_window", None) is not None or layer_types != {"full_attention"}:
        kinds = ", ".join(sorted(layer_types | ({"sliding_attention"} if getattr(text, "sliding_window", None) else set())))
        raise MtpdError(f"{source} ({config.model_type}) has layers that do not attend to the full context ({kinds}): "
                        f"mtpd's cache bookkeeping supports full attention only; use a model without a sliding "
                        f"window (for Mistral-style configs, set \"sliding_window\": null)")


def context_length(config) -> int:
    text_config = config.get_text_config(decoder=True)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 1:
            return value
    return DEFAULT_MAX_SEQ_LEN


@torch.no_grad()
def logits_mismatch(model, logits_of, vocab: int) -> float | None:
    """None when `logits_of(tokens)` reproduces the transformers model's own logits on a probe sequence, else
    the largest difference relative to the logits' scale."""
    tokens = (torch.arange(8, device=next(model.parameters()).device) * 7919 % vocab)[None]
    own = model(input_ids=tokens, use_cache=False).logits
    ours = logits_of(tokens)
    scale = float(own.abs().max().clamp_min(1e-6))
    if torch.allclose(ours.to(own.dtype), own, rtol=1e-3, atol=1e-4 * scale):
        return None
    return float((ours.to(own.dtype) - own).abs().max()) / scale


def check_logits_match(backbone: HFBackbone) -> None:
    """The heads use output_embedding(h0) as the main head; refuse models whose own forward differs (logit
    soft-capping, scaling, ...), since speculative decoding would then not reproduce the model."""
    vocab = backbone.model.get_output_embeddings().weight.shape[0]
    if logits_mismatch(backbone.model, lambda tokens: backbone.logits(backbone(tokens)), vocab) is not None:
        raise MtpdError(f"{backbone.source} ({backbone.config.model_type}) transforms its logits after the output layer "
                        f"(e.g. soft-capping or scaling), so mtpd's main head would not reproduce the model: "
                        f"this architecture is not supported")


# ------------------------------------------------------------------------------------------- head config


def _head_config(backbone: HFBackbone, num_heads: int) -> ModelConfig:
    """The MTP heads' shape for a Hugging Face backbone: its width, attention layout and MLP size."""
    text = backbone.config.get_text_config(decoder=True)
    hidden = text.hidden_size
    n_heads = text.num_attention_heads
    rope = getattr(text, "rope_parameters", None)
    rope_theta = (rope or {}).get("rope_theta") if isinstance(rope, dict) else None
    return ModelConfig(
        vocab_size=backbone.model.get_output_embeddings().weight.shape[0],
        d_model=hidden,
        n_layers=text.num_hidden_layers,  # only scales the heads' initialisation
        n_heads=n_heads,
        n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads,
        ffn_dim=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
        max_seq_len=backbone.max_seq_len,
        mtp_heads=num_heads,
        rope_theta=float(rope_theta or getattr(text, "rope_theta", 10000.0)),
        norm_eps=float(getattr(text, "rms_norm_eps", None) or getattr(text, "layer_norm_epsilon", None) or 1e-5),
    ).validate()
