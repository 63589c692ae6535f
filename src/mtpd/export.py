"""`mtpd export-hf`: a built-in main model as a Hugging Face `LlamaForCausalLM` directory.

The built-in decoder is a Llama: RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention, no biases. Only
the layout of two weights differs: the fused q/k/v projection and the fused gate/up projection are split
into Llama's separate ones. The directory gets config.json, model.safetensors, generation_config.json and
the run's tokenizer (loadable with AutoTokenizer), so any Hugging Face tool, and `mtpd train --hf`, can use it.
Only the main model is exported: a Llama has no MTP heads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtpd.atomic import atomic_directory
from mtpd.checkpoint import is_head_only, load_checkpoint
from mtpd.data import eos_id
from mtpd.errors import MtpdError, first_line
from mtpd.model import Decoder


def llama_config(decoder: Decoder, eos: int):
    from transformers import LlamaConfig

    cfg = decoder.cfg
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None, eos_token_id=eos, pad_token_id=None)


def llama_state_dict(decoder: Decoder) -> dict[str, torch.Tensor]:
    """The decoder's weights under LlamaForCausalLM's names, fused projections split."""
    cfg = decoder.cfg
    q_size, kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    state = {"model.embed_tokens.weight": decoder.embed.weight, "model.norm.weight": decoder.norm.weight,
             "lm_head.weight": decoder.lm_head.weight}
    for i, block in enumerate(decoder.blocks):
        prefix = f"model.layers.{i}"
        q, k, v = block.attn.qkv.weight.split([q_size, kv_size, kv_size], dim=0)
        gate, up = block.mlp.gate_up.weight.chunk(2, dim=0)
        state |= {f"{prefix}.input_layernorm.weight": block.attn_norm.weight,
                  f"{prefix}.self_attn.q_proj.weight": q, f"{prefix}.self_attn.k_proj.weight": k,
                  f"{prefix}.self_attn.v_proj.weight": v, f"{prefix}.self_attn.o_proj.weight": block.attn.out.weight,
                  f"{prefix}.post_attention_layernorm.weight": block.mlp_norm.weight,
                  f"{prefix}.mlp.gate_proj.weight": gate, f"{prefix}.mlp.up_proj.weight": up,
                  f"{prefix}.mlp.down_proj.weight": block.mlp.down.weight}
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def to_llama(decoder: Decoder, eos: int):
    """A LlamaForCausalLM computing the same function as `decoder`."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(decoder, eos)).to(next(decoder.parameters()).dtype)
    missing, unexpected = model.load_state_dict(llama_state_dict(decoder), strict=False)
    tied = {"lm_head.weight"} if decoder.cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"Llama export is out of date: missing {missing}, unexpected {unexpected}")
    return model.eval()


def export_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Write the main model of a built-in checkpoint (or a run's latest) as a Hugging Face Llama directory."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise MtpdError("export-hf needs the transformers library: pip install 'mtpd[hf]'") from None
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MtpdError(f"{out_dir} exists and is not empty (or not a directory): choose another --out")
    checkpoint = load_checkpoint(ckpt)
    if is_head_only(checkpoint.config):
        raise MtpdError(f"{checkpoint.path} holds heads on a Hugging Face model, which is already in Hugging Face "
                        f"format ({checkpoint.config['backbone']['path']}): nothing to export")
    eos_token = checkpoint.tokenizer.id_to_token(eos_id(checkpoint.tokenizer))
    try:
        with atomic_directory(out_dir) as tmp:  # replaces the empty directory, if any
            to_llama(checkpoint.model.main, eos_id(checkpoint.tokenizer)).save_pretrained(tmp)
            PreTrainedTokenizerFast(tokenizer_object=checkpoint.tokenizer, eos_token=eos_token).save_pretrained(tmp)
    except OSError as exc:
        raise MtpdError(f"cannot write {out_dir} ({exc.strerror or first_line(exc)}): choose another --out") from None
    return out_dir
