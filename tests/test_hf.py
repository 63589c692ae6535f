"""Hugging Face backbones: the adapter keeps the position-indexed cache contract, speculative decoding
reproduces `model.generate` token for token, head-only checkpoints round-trip and refuse another backbone,
and head training leaves the backbone bit-identical.

Every model is a tiny random one built here and saved with save_pretrained (hf_models.py). Decoding
comparisons run in float64: random tiny models have near-tied logits, and fp32 rounding could flip an argmax.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import ARCHITECTURES, EOS, VOCAB, save_tiny_model  # noqa: E402
from mtpd.checkpoint import HEADS_FILE, WEIGHTS_FILE, list_checkpoints, load_checkpoint  # noqa: E402
from mtpd.config import LossConfig  # noqa: E402
from mtpd.decode import SpeculativeSampling, autoregressive_generate, speculative_generate  # noqa: E402
from mtpd.errors import MtpdError  # noqa: E402
from mtpd.model import MTPModel  # noqa: E402
from mtpd.model.backbone import load_backbone  # noqa: E402
from mtpd.run import train_heads  # noqa: E402
from mtpd.train import TrainConfig  # noqa: E402


@pytest.fixture(scope="module", params=ARCHITECTURES)
def hf_dir(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def load_hf_backbone(path, **options):
    """The transformers adapter, also for Llama models (which `--hf` loads into mtpd's own decoder)."""
    return load_backbone(path, runtime="transformers", **options)


def float64_model(path, heads: int) -> MTPModel:
    backbone = load_hf_backbone(path, dtype=torch.float64)
    torch.manual_seed(1)
    return MTPModel(backbone.head_config(heads), backbone).to(torch.float64).eval()


def random_prompts(lengths: list[int], seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """What `model.generate(do_sample=False)` writes, cut after EOS as mtpd does."""
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=EOS, pad_token_id=EOS)[0, len(prompt):].tolist()
    return out[:out.index(EOS) + 1] if EOS in out else out


@torch.no_grad()
def test_cached_passes_with_cut_backs_match_a_full_pass(hf_dir):
    """The Backbone cache contract: rows advance by different amounts, drafts beyond the accepted prefix are
    garbage, and every hidden state computed from true tokens equals the uncached pass over the sequence."""
    backbone = load_hf_backbone(hf_dir, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    B, L, T = 3, 60, 4
    true = torch.randint(0, VOCAB, (B, L), generator=g)
    full = backbone(true)
    cache = backbone.new_cache(B, L + T)
    backbone(true[:, :6], torch.arange(6).expand(B, 6), cache)  # a prefill longer than some rows' prompts
    length = torch.tensor([2, 6, 3])
    while int(length.max()) + T < L:
        good = torch.randint(1, T + 1, (B,), generator=g)  # the first `good` tokens of the pass are true
        positions = length[:, None] + torch.arange(T)
        is_true = torch.arange(T)[None] < good[:, None]
        tokens = torch.where(is_true, true.gather(1, positions), torch.randint(0, VOCAB, (B, T), generator=g))
        hidden = backbone(tokens, positions, cache)
        expected = full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
        torch.testing.assert_close(hidden[is_true], expected[is_true], rtol=0, atol=1e-9)
        length = length + good


def test_the_main_head_is_the_models_own_logits(hf_dir):
    backbone = load_hf_backbone(hf_dir)
    tokens = torch.arange(1, 20)[None]
    torch.testing.assert_close(backbone.logits(backbone(tokens)), backbone.model(tokens).logits)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_greedy_speculative_equals_hf_generate(hf_dir, num_heads):
    model = float64_model(hf_dir, num_heads)
    prompts = random_prompts([5, 1, 12, 3])
    expected = [hf_greedy(model.main.model, prompt, 24) for prompt in prompts]
    for prompt, reference in zip(prompts, expected):  # batch size 1
        assert speculative_generate(model, [prompt], 24, stop_ids={EOS}).tokens[0] == reference
    assert speculative_generate(model, prompts, 24, stop_ids={EOS}).tokens == expected  # rows of different lengths
    assert autoregressive_generate(model.main, prompts, 24, stop_ids={EOS}).tokens == expected


@pytest.fixture(scope="module")
def drafting_llama(llama_dir):
    """The tiny Llama with 2 heads trained briefly on its own greedy continuations, so that drafts are often
    accepted and every cut-back path of the decode loop runs (random heads are almost always rejected)."""
    model = float64_model(llama_dir, 2)
    prompts = torch.randint(1, VOCAB, (32, 3), generator=torch.Generator().manual_seed(5))
    text = model.main.model.generate(prompts, do_sample=False, max_new_tokens=40, eos_token_id=None, pad_token_id=EOS)
    optimizer = torch.optim.AdamW(model.heads.parameters(), lr=1e-2)
    for _ in range(40):
        _, head_logits = model(text[:, :-1])
        loss = sum(torch.nn.functional.cross_entropy(logits.flatten(0, 1), text[:, k + 1:].flatten())
                   for k, logits in enumerate(head_logits, start=1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_greedy_speculative_equals_hf_generate_when_drafts_are_accepted(drafting_llama):
    prompts = random_prompts([4, 2, 9, 6], seed=11)
    expected = [hf_greedy(drafting_llama.main.model, prompt, 30) for prompt in prompts]
    accepted = []
    for prompt, reference in zip(prompts, expected):
        result = speculative_generate(drafting_llama, [prompt], 30, stop_ids={EOS})
        assert result.tokens[0] == reference
        accepted += result.accepted
    batched = speculative_generate(drafting_llama, prompts, 30, stop_ids={EOS})
    assert batched.tokens == expected
    assert 0 < sum(accepted) and len(set(batched.accepted)) > 1  # rows accept different numbers of drafts


def test_speculative_sampling_runs_on_the_same_rule(llama_dir):
    """Sampling goes through the same decode loop and acceptance rule as the built-in decoder (whose
    losslessness test_decode checks); here: every row gets its full budget, reproducibly for a seed."""
    model = float64_model(llama_dir, 2)
    prompts = random_prompts([4, 9])
    rule = SpeculativeSampling(temperature=1.0, top_k=50)
    first = speculative_generate(model, prompts, 16, rule, generator=torch.Generator().manual_seed(0))
    again = speculative_generate(model, prompts, 16, rule, generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in first.tokens] == [16, 16] and first.tokens == again.tokens
    assert sum(first.accepted) > 0  # near-uniform random heads and model: many drafts pass min(1, p/q)


def test_models_that_transform_their_logits_are_refused(tmp_path):
    """Granite divides its logits by `logits_scaling` after the output layer: output_embedding(h0) would not be
    the model's distribution, so speculative decoding would not reproduce it."""
    import transformers

    config = transformers.GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(MtpdError, match="transforms its logits"):
        load_hf_backbone(tmp_path)


def test_sliding_window_models_are_refused(tmp_path):
    save_tiny_model(tmp_path, "qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    with pytest.raises(MtpdError, match="full attention only"):
        load_hf_backbone(tmp_path)


def test_a_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(MtpdError, match="not a Hugging Face model directory"):
        load_hf_backbone(tmp_path)


# ------------------------------------------------------------------------------------- head-only training

TRAIN = TrainConfig(batch_size=4, seq_len=32, max_steps=3, eval_every=100, eval_windows=2, warmup_steps=1)


@pytest.fixture(scope="module")
def trained_heads(llama_dir, tmp_path_factory):
    """Heads trained for a few steps on the tiny Llama; the run directory and the backbone before training."""
    corpus = tmp_path_factory.mktemp("corpus")
    from conftest import SAMPLE_TEXT

    for i in range(30):
        (corpus / f"m{i}.py").write_text(SAMPLE_TEXT.replace("fibonacci", f"fib_{i}") * 3)
    before = {k: v.clone() for k, v in load_backbone(llama_dir).state_dict().items()}  # in mtpd's decoder
    run = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTPD_CACHE", str(tmp_path_factory.mktemp("cache")))
        train_heads(llama_dir, 2, TRAIN, LossConfig(), run, str(corpus), device="cpu", show_progress=False,
                    log=lambda _: None)
    return run, before


def test_head_training_leaves_the_backbone_bit_identical(trained_heads, llama_dir):
    run, before = trained_heads
    checkpoint = load_checkpoint(run)
    after = checkpoint.model.main.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in load_backbone(llama_dir).parameters())


def test_head_only_checkpoint_holds_only_the_heads_and_a_backbone_reference(trained_heads, llama_dir):
    from safetensors import safe_open

    run, _ = trained_heads
    path = list_checkpoints(run)[-1][1]
    assert (path / HEADS_FILE).is_file() and not (path / WEIGHTS_FILE).exists()
    with safe_open(str(path / HEADS_FILE), framework="pt") as f:
        assert f.keys() and all(name.startswith("heads.") for name in f.keys())
    reference = json.loads((path / "config.json").read_text())["backbone"]
    assert reference["path"] == str(llama_dir.resolve()) and reference["config"]["model_type"] == "llama"
    assert len(reference["config_sha256"]) == 64 and len(reference["weights_sha256"]) == 64


def test_head_only_checkpoint_round_trip(trained_heads):
    run, _ = trained_heads
    first, second = load_checkpoint(run), load_checkpoint(run)
    for (name, a), (_, b) in zip(first.model.heads.state_dict().items(), second.model.heads.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    main_a, heads_a = first.model(tokens)
    main_b, heads_b = second.model(tokens)
    assert torch.equal(main_a, main_b) and all(torch.equal(a, b) for a, b in zip(heads_a, heads_b))
    assert first.config["state"]["step"] == TRAIN.max_steps


def test_loading_against_another_backbone_names_the_mismatch(trained_heads, tmp_path):
    run, _ = trained_heads
    other = save_tiny_model(tmp_path / "deeper", "llama", num_hidden_layers=3)
    with pytest.raises(MtpdError, match=r"backbone mismatch: .*num_hidden_layers=2, but .* has num_hidden_layers=3"):
        load_checkpoint(run, backbone_path=other)
    qwen = save_tiny_model(tmp_path / "qwen", "qwen2")
    with pytest.raises(MtpdError, match="backbone mismatch"):
        load_checkpoint(run, backbone_path=qwen)


def test_a_moved_backbone_is_found_with_hf(trained_heads, llama_dir, tmp_path):
    import shutil

    run, _ = trained_heads
    moved = shutil.copytree(llama_dir, tmp_path / "moved")
    checkpoint = load_checkpoint(run, backbone_path=moved)
    assert checkpoint.model.num_heads == 2


def test_head_training_resumes(trained_heads, llama_dir, tmp_path, monkeypatch):
    import shutil

    run, _ = trained_heads
    copy = shutil.copytree(run, tmp_path / "run")
    monkeypatch.setenv("MTPD_CACHE", str(tmp_path / "cache"))
    longer = TrainConfig(max_steps=TRAIN.max_steps + 2)
    metrics, path = train_heads(None, 2, longer, LossConfig(), copy, resume=True, device="cpu",
                                show_progress=False, log=lambda _: None)
    assert load_checkpoint(path).config["state"]["step"] == TRAIN.max_steps + 2
    assert len(metrics["offline_acceptance"]) == 2


# ---------------------------------------------------------------------------------------------- export


def test_export_hf_writes_a_llama_with_the_same_logits_and_tokenizer(tmp_path, corpus_dir):
    import transformers

    from mtpd.checkpoint import checkpoint_dir, save_checkpoint
    from mtpd.data import load_corpus, train_tokenizer
    from mtpd.export import export_hf
    from conftest import micro_model

    tokenizer = train_tokenizer(load_corpus(str(corpus_dir)).train, 300)
    model = micro_model(2, vocab_size=tokenizer.get_vocab_size(), n_kv_heads=2)
    run = tmp_path / "run"
    save_checkpoint(checkpoint_dir(run, 1), model, tokenizer, {"data": {"path": str(corpus_dir)}})
    out = export_hf(run, tmp_path / "llama")

    llama = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(llama).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, tokenizer.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llama(tokens).logits, model.main.logits(model.main(tokens)), rtol=1e-4, atol=1e-5)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "def fib(n):\n    return n"
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text, add_special_tokens=False).ids
    assert hf_tokenizer.eos_token == "<|endoftext|>"

    # and mtpd drives it like any Hugging Face model: greedy decoding equals the built-in model's
    backbone = load_hf_backbone(out, dtype=torch.float64)
    prompts = random_prompts([3, 8], seed=4)
    assert (autoregressive_generate(backbone, prompts, 20).tokens
            == autoregressive_generate(model.main.to(torch.float64), prompts, 20).tokens)


def test_export_refuses_a_non_empty_directory(tmp_path, capsys):
    from mtpd.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert main(["export-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "out" / "x")]) == 2  # a file
    assert "not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_train_generate_bench_with_hf(llama_dir, tmp_path, capsys, corpus_dir):
    from mtpd.cli import main

    run = tmp_path / "run"
    train = ["train", "--hf", llama_dir, "--heads", "2", "--data", corpus_dir, "--max-steps", "2",
             "--batch-size", "2", "--seq-len", "32", "--eval-windows", "2", "--out", run, "--quiet"]
    assert main([str(a) for a in train]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run), "--prompt", "def fib", "--max-new-tokens", "8", "--dtype", "fp32"]) == 0
    assert main(["generate", "--ckpt", str(run), "--prompt", "def fib", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-p", "0.9"]) == 0
    report_path = tmp_path / "bench.json"
    assert main(["bench", "--ckpt", str(run), "--dtype", "fp32", "--num-prompts", "2", "--prompt-tokens", "8",
                 "--max-new-tokens", "8",
                 "--batch-size", "2", "--rounds", "1", "--skip-no-cache", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["identical_to_baseline"] is True
    assert set(report["peers"]) == {"hf_generate", "hf_prompt_lookup"}
    assert all(peer["identical_to_spec"] and peer["tokens_per_s"] > 0 for peer in report["peers"].values())
    assert "transformers prompt lookup" in capsys.readouterr().out
    assert main(["bench", "--ckpt", str(run), "--dtype", "fp32", "--num-prompts", "2", "--prompt-tokens", "8",
                 "--max-new-tokens", "4", "--rounds", "1", "--skip-no-cache", "--skip-peers",
                 "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["peers"] == {} and report["identical_to_baseline"] is True


def test_cli_rejects_shape_flags_with_hf(llama_dir, tmp_path, capsys):
    from mtpd.cli import main

    assert main(["train", "--hf", str(llama_dir), "--d-model", "64", "--max-steps", "1", "--out", str(tmp_path)]) == 2
    assert "--d-model cannot be combined with --hf" in capsys.readouterr().err


def test_cli_refuses_fsdp_with_hf_before_loading_anything(tmp_path, capsys):
    from mtpd.cli import main

    # the model path does not even exist: the refusal comes before the model or the corpus is read
    assert main(["train", "--hf", str(tmp_path / "absent"), "--heads", "2", "--max-steps", "1", "--fsdp",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "heads on a Hugging Face model train with DDP" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_missing_backbone_is_one_line(trained_heads, tmp_path, capsys):
    from mtpd.cli import main

    run, _ = trained_heads
    assert main(["generate", "--ckpt", str(run), "--prompt", "x", "--hf", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not at" in err[0] and "--hf" in err[0]


@pytest.fixture(scope="module")
def qwen_heads(tmp_path_factory):
    """Heads trained for a few steps on a tiny Qwen2, which runs through the transformers adapter."""
    from conftest import SAMPLE_TEXT

    corpus = tmp_path_factory.mktemp("qwen-corpus")
    for i in range(30):
        (corpus / f"m{i}.py").write_text(SAMPLE_TEXT.replace("fibonacci", f"fib_{i}") * 3)
    qwen = save_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")
    run = tmp_path_factory.mktemp("qwen-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTPD_CACHE", str(tmp_path_factory.mktemp("cache")))
        train_heads(qwen, 2, TRAIN, LossConfig(), run, str(corpus), device="cpu", show_progress=False,
                    log=lambda _: None)
    return run


@pytest.mark.parametrize("command", [["bench", "--tree"], ["bench", "--tree-shape", "0 1"], ["bench", "--tree-dynamic"],
                                     ["generate", "--prompt", "x", "--tree-shape", "0 1"]])
def test_cli_tree_on_the_adapter_is_one_line(qwen_heads, command, capsys):
    """The transformers adapter has no tree attention: tree flags are refused before any work, naming the limit."""
    from mtpd.cli import main

    run = qwen_heads
    assert main([command[0], "--ckpt", str(run), "--max-new-tokens", "4", *command[1:]]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # beside transformers' loading bar
    assert "Traceback" not in err and len(errors) == 1
    assert "tree attention" in errors[0] and "Hugging Face" in errors[0] and "drop --tree" in errors[0]


def test_cli_trees_on_a_llama_in_mtpds_decoder(trained_heads, capsys):
    """A Llama loaded with --hf runs in mtpd's own decoder, so it drafts trees too."""
    from mtpd.cli import main

    run, _ = trained_heads
    assert main(["generate", "--ckpt", str(run), "--prompt", "def fib", "--max-new-tokens", "8", "--dtype", "fp32",
                 "--tree-shape", "0 1 0.0"]) == 0


def test_looped_extension_of_heads_on_a_hf_model(trained_heads, tmp_path, monkeypatch):
    """`mtpd extend` on a head-only checkpoint: the new heads start as copies, the checkpoint again holds only
    the heads and references the same backbone, and the old heads are bit-identical afterwards."""
    from mtpd.run import extend

    run, _ = trained_heads
    monkeypatch.setenv("MTPD_CACHE", str(tmp_path / "cache"))
    source = load_checkpoint(run)
    _, path = extend(run, 4, tmp_path / "extended", budget={"max_steps": 2}, device="cpu", show_progress=False,
                     log=lambda _: None)
    assert (path / HEADS_FILE).is_file() and not (path / WEIGHTS_FILE).exists()
    config = json.loads((path / "config.json").read_text())
    assert config["backbone"] == source.config["backbone"] and config["model"]["mtp_heads"] == 4
    extended = load_checkpoint(path)
    for k in range(2):
        for (name, a), (_, b) in zip(source.model.heads[k].state_dict().items(),
                                     extended.model.heads[k].state_dict().items()):
            assert torch.equal(a, b), (k, name)
