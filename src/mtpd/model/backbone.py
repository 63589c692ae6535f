"""What MTP heads, the trainer and the decoders need from the main model: the `Backbone` interface.

The built-in `Decoder` satisfies it; an adapter around a Hugging Face causal LM can too. Nothing else in
mtpd looks inside the main model.

The cache contract is position-indexed: a cached pass receives per-row positions [B, T] for its tokens,
stores their keys/values at those positions, and lets each token attend to every position <= its own.
Cutting a row back to a prefix of length n therefore needs no call at all: the next pass for that row
starts at position n and everything cached beyond is never read again before it is overwritten.

Tree drafting (decode/tree.py) needs more: a pass whose tokens share positions, written at explicit cache
slots and attending through an explicit mask, and a cache that can move entries between slots. A backbone
that offers it sets `supports_tree_attention = True`; speculative decoding with a tree refuses the others
with a clear error (the chain works with every backbone).

`load_backbone` turns `--hf SPEC` into a backbone. A Llama-family model (a directory or a GGUF file) loads
its weights into mtpd's own `Decoder` (the weight map is model/convert.py), so it gets the static
position-indexed cache, tree attention and the one decode loop; the load checks that the decoder reproduces
transformers' logits. Other architectures (and Llama variants the decoder does not compute, such as RoPE
scaling) run through the transformers adapter, `HFBackbone` (model/hf.py), which drafts chains only.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from mtpd.atomic import atomic_directory
from mtpd.config import ModelConfig
from mtpd.errors import MtpdError
from mtpd.model.convert import MAPPED_TYPES, Unmappable, decoder_config, from_llama_names
from mtpd.model.decoder import Decoder
from mtpd.model.hf import (DEFAULT_MAX_SEQ_LEN, HFBackbone, check_logits_match, check_supported, context_length,
                           logits_mismatch)
from mtpd.model.source import ModelSource, load_config, load_transformers_model, resolve_source
from mtpd.precision import cast_for_decoding

RUNTIMES = ("auto", "mtpd", "transformers")


class Backbone(Protocol):
    max_seq_len: int  # context length: positions 0..max_seq_len-1
    # True: __call__ accepts tree=TreeAttention(slots, mask) (model/decoder.py) with a cache, and the cache has
    # copy_slots(source, target). False: tree drafting is refused, chain drafting still works.
    supports_tree_attention: bool
    # Where the weights came from when mtpd does not own them (None: a model mtpd trained); checkpoints of heads
    # trained on it reference it instead of copying it.
    source: ModelSource | None
    runtime: str  # "mtpd" (the built-in decoder) or "transformers" (the adapter): h0 differs between the two

    def head_config(self, num_heads: int) -> ModelConfig:
        """The shape of MTP heads on this main model."""

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                 cache: Any | None = None) -> torch.Tensor:
        """tokens [B, T] -> h0 [B, T, d], the last hidden state. No cache: a causal pass over 0..T-1."""

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input embedding Emb, shared with the heads."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection W_out, shared with the heads (applied after each head's own norm)."""

    @property
    def output_layer(self) -> torch.nn.Linear:
        """The layer `project` applies: the heads of a draft vocabulary score with rows of its weight."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The main head: h0 -> next-token logits (the final norm, if any, then W_out)."""

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the main head applies to h0 before W_out (identity when h0 is normed already): with it the
        main head can score a subset of the vocabulary, `logits(h)[..., ids] == W_out[ids] · final_norm(h)`."""

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Any:
        """An empty cache for `batch_size` rows and up to `max_len` positions."""


def load_backbone(spec: str | Path | ModelSource, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  max_seq_len: int | None = None, runtime: str = "auto",
                  log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Backbone:
    """A frozen main model from `--hf SPEC` (a directory, a .gguf file or `smollm2`; never downloads).

    runtime "auto": mtpd's decoder for Llama-family models it computes, else the transformers adapter (with a
    note saying why); "mtpd" or "transformers" force one (a head-only checkpoint loads the runtime its heads
    were trained on)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    source = spec if isinstance(spec, ModelSource) else resolve_source(spec)
    context_cap = max_seq_len or DEFAULT_MAX_SEQ_LEN
    if runtime != "transformers":
        cached = _cached_decoder(source, context_cap)
        if cached is not None:
            return cast_for_decoding(cached.to(device), dtype)
    config = load_config(source)
    check_supported(config, source)
    text = config.get_text_config(decoder=True)
    if source.gguf_file and text.model_type not in MAPPED_TYPES:
        raise MtpdError(f"{source} is a GGUF of a {text.model_type} model: mtpd reads GGUF files of Llama-family "
                        f"models ({', '.join(MAPPED_TYPES)}) only; convert it to a Hugging Face directory "
                        f"(transformers: from_pretrained(..., gguf_file=...) then save_pretrained) and pass that")
    model = load_transformers_model(source, torch.float32, config)
    model.requires_grad_(False)
    context = min(context_length(config), context_cap)
    unmapped = None
    if runtime != "transformers":
        try:
            backbone = _decoder_backbone(model, text, context, source)
            _store_decoder(source, backbone, context_length(config))
        except Unmappable as reason:
            if runtime == "mtpd":
                raise MtpdError(f"the heads were trained on {source} in mtpd's decoder, which cannot compute it now "
                                f"({reason}): pass the backbone they were trained on with --hf") from None
            unmapped = reason
        else:
            return cast_for_decoding(backbone.to(device), dtype)
    backbone = HFBackbone(model, context, source)
    check_logits_match(backbone)
    if unmapped is not None:  # said once the adapter has accepted the model: a refusal is one line alone
        log(f"note: {source} runs through the transformers adapter (chains only, no tree drafting): {unmapped}")
    return cast_for_decoding(backbone.to(device), dtype)


def _decoder_backbone(model, text_config, context: int, source: ModelSource) -> Decoder:
    """The transformers model's weights in mtpd's decoder, checked to give the same logits (fp32)."""
    cfg = decoder_config(text_config, context)
    decoder = Decoder.from_weights(cfg, from_llama_names(model.state_dict(), cfg), source).eval().requires_grad_(False)
    mismatch = logits_mismatch(model, lambda tokens: decoder.logits(decoder(tokens)), cfg.vocab_size)
    if mismatch is not None:
        raise Unmappable(f"mtpd's decoder does not reproduce its logits (largest difference {mismatch:.2g} of "
                         f"their scale)")
    return decoder


# Mapped weights are kept in the source's cache directory (model/source.py `ModelSource.cache_dir`): a GGUF is
# dequantised, and its logits checked against transformers', once; later loads read one safetensors file.
_CACHED_WEIGHTS, _CACHED_CONFIG = "decoder.safetensors", "decoder.json"


def _store_decoder(source: ModelSource, decoder: Decoder, full_context: int) -> None:
    from safetensors.torch import save_file

    if not source.gguf_file:  # a directory's safetensors load fast already
        return
    cfg = dataclasses.replace(decoder.cfg, max_seq_len=full_context)  # the model's own limit; callers cap it
    try:
        with atomic_directory(source.cache_dir() / "decoder") as tmp:
            state = {name: t.contiguous() for name, t in decoder.state_dict().items()
                     if name != "lm_head.weight" or not cfg.tie_embeddings}  # a tied one is the embedding
            save_file(state, str(tmp / _CACHED_WEIGHTS))
            (tmp / _CACHED_CONFIG).write_text(json.dumps(cfg.to_dict()))
    except OSError:
        pass  # a read-only cache costs the next load time, not correctness


def _cached_decoder(source: ModelSource, context_cap: int) -> Decoder | None:
    from safetensors.torch import load_file

    entry = source.cache_dir() / "decoder"
    if not source.gguf_file or not (entry / _CACHED_CONFIG).is_file():
        return None
    try:
        cfg = ModelConfig.from_dict(json.loads((entry / _CACHED_CONFIG).read_text()))
        state = load_file(str(entry / _CACHED_WEIGHTS))
    except (OSError, ValueError, MtpdError):
        return None  # unreadable: convert again (and overwrite it)
    cfg = dataclasses.replace(cfg, max_seq_len=min(cfg.max_seq_len, context_cap))
    return Decoder.from_weights(cfg, state, source).eval().requires_grad_(False)
