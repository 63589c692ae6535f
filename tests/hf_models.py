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


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _permute_for_gguf(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved per head for its RoPE kernel (its converter's `permute`);
    transformers undoes this when it reads a Llama GGUF."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def save_tiny_gguf(path: Path, seed: int = 0, architecture: str = "llama", **overrides):
    """A random tiny Llama written as an F32 GGUF file the way llama.cpp's converter lays it out (metadata,
    BPE tokenizer with a chat template, q/k permuted); returns (path, the transformers model, the tokenizer)."""
    import gguf

    torch.manual_seed(seed)
    config = tiny_config("llama", **overrides)
    model = transformers.LlamaForCausalLM(config).eval()
    tokenizer = train_tokenizer([SAMPLE_TEXT], 300)
    spec = __import__("json").loads(tokenizer.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    special = {t["id"] for t in spec["added_tokens"]}

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab] + [f"<unused{i}>" for i in range(config.vocab_size - len(vocab))])
    writer.add_token_types([3 if i in special else 1 for i in range(config.vocab_size)])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for theirs, ours in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", state[f"{prefix}{theirs}.weight"])
        for proj, ours in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
            weight = torch.from_numpy(state[f"{prefix}self_attn.{proj}.weight"])
            writer.add_tensor(f"blk.{i}.{ours}.weight", _permute_for_gguf(weight, heads[proj]).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path), model, tokenizer
