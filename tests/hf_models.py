"""Tiny random Hugging Face models built locally and saved with save_pretrained: nothing is downloaded."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from mtpd.data import train_tokenizer  # noqa: E402
from conftest import SAMPLE_TEXT  # noqa: E402

VOCAB = 320
EOS = 0  # <|endoftext|> is the first token of the tokenizers built here
ARCHITECTURES = ("llama", "qwen2", "gpt2")


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    shape = dict(vocab_size=VOCAB, eos_token_id=EOS, bos_token_id=EOS, pad_token_id=EOS)
    if arch == "gpt2":
        return transformers.GPT2Config(**shape, n_embd=32, n_layer=2, n_head=4, n_positions=256, **overrides)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    return config_class(**shape, **{**common, **overrides})


def save_tiny_model(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random model of `arch` with a byte-level BPE tokenizer, written like any Hugging Face checkpoint."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model.save_pretrained(directory)
    tokenizer = train_tokenizer([SAMPLE_TEXT], 300)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(directory)
    return Path(directory)
