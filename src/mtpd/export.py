"""`mtpd export-hf`: a built-in main model as a Hugging Face `LlamaForCausalLM` directory.

The built-in decoder is a Llama (model/convert.py holds the weight map, used both ways). The directory gets
config.json, model.safetensors, generation_config.json and the run's tokenizer (loadable with AutoTokenizer),
so any Hugging Face tool, and `mtpd train --hf`, can use it.
Only the main model is exported: a Llama has no MTP heads.
"""

from __future__ import annotations

from pathlib import Path

from mtpd.atomic import atomic_directory
from mtpd.checkpoint import is_head_only, load_checkpoint
from mtpd.data import eos_id
from mtpd.errors import MtpdError, first_line
from mtpd.model import Decoder
from mtpd.model.convert import llama_config, to_llama_names
from mtpd.model.source import quiet_transformers


def to_llama(decoder: Decoder, eos: int):
    """A LlamaForCausalLM computing the same function as `decoder` (the weight map is model/convert.py)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(decoder.cfg, eos)).to(next(decoder.parameters()).dtype)
    missing, unexpected = model.load_state_dict(to_llama_names(decoder.state_dict(), decoder.cfg), strict=False)
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
            with quiet_transformers():  # no "Writing model shards" bar
                to_llama(checkpoint.model.main, eos_id(checkpoint.tokenizer)).save_pretrained(tmp)
            PreTrainedTokenizerFast(tokenizer_object=checkpoint.tokenizer, eos_token=eos_token).save_pretrained(tmp)
    except OSError as exc:
        raise MtpdError(f"cannot write {out_dir} ({exc.strerror or first_line(exc)}): choose another --out") from None
    return out_dir
