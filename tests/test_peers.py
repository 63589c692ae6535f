"""The transformers peers of `mtpd bench` produce exactly max_new_tokens per row, whatever stop token the
model's own generation config names, and their greedy output is the model's own argmax."""

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import VOCAB, save_tiny_model  # noqa: E402
from mtpd.config import LOOKUP_TOKENS  # noqa: E402
from mtpd.peers import hf_generate  # noqa: E402


@torch.no_grad()
def greedy_loop(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """argmax of the model's logits, one full pass per token: no generation config involved."""
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def test_peers_ignore_the_models_stop_tokens(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, "llama"), dtype=torch.float64).eval()
    prompts = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 7)]
    expected = [greedy_loop(model, prompt, 12) for prompt in prompts]
    # The model's generation config names tokens it writes early as EOS: `generate` would stop there (and
    # before the fix, setting eos_token_id to None brought them back).
    model.generation_config.eos_token_id = [expected[0][1], expected[1][2]]
    for prompt, reference in zip(prompts, expected):
        assert hf_generate(model, [prompt], 12).tokens == [reference]
        assert hf_generate(model, [prompt], 12, prompt_lookup_num_tokens=LOOKUP_TOKENS).tokens == [reference]
