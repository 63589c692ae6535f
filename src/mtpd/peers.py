"""What users of a Hugging Face model would run instead of mtpd, for `mtpd bench` on heads trained with --hf:

    hf_generate        `model.generate`, KV-cached, on the same batches as mtpd's decoders
    hf_prompt_lookup   `model.generate(prompt_lookup_num_tokens=N)`: drafts copied from the prompt, verified by
                       the model (lossless like mtpd's); transformers runs it one prompt at a time

Both get the same prompts, budget and decoding rule as mtpd's methods, and never stop early: EOS is not a
stop token here, so every row produces exactly max_new_tokens, as in the rest of the benchmark.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from mtpd.config import LOOKUP_TOKENS  # transformers' documented example value, as mtpd's own lookup
from mtpd.decode import Greedy
from mtpd.decode.generation import Generation

def hf_peer_methods(model, max_new_tokens: int, rule) -> dict[str, Callable[[list[list[int]], torch.Generator], Generation]]:
    """Benchmark methods (prompts, generator) -> Generation for a `transformers` causal LM."""
    def plain(prompts, generator):
        return hf_generate(model, prompts, max_new_tokens, rule, generator)

    def prompt_lookup(prompts, generator):
        rows = [hf_generate(model, [prompt], max_new_tokens, rule, generator,
                            prompt_lookup_num_tokens=LOOKUP_TOKENS).tokens[0] for prompt in prompts]
        return Generation(rows)

    return {"hf_generate": plain, "hf_prompt_lookup": prompt_lookup}


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, rule=Greedy(),
                generator: torch.Generator | None = None, **options) -> Generation:
    """`model.generate` on left-padded prompts; `options` go to its generation config."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, device=device)
        attention_mask[row, width - len(prompt):] = 1
    if generator is not None:  # transformers samples from the global generator
        torch.manual_seed(generator.initial_seed())
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                            generation_config=_generation_config(model, max_new_tokens, rule, **options))
    return Generation(output[:, width:].tolist())


def _generation_config(model, max_new_tokens: int, rule, **options):
    """The model's generation config with mtpd's budget and decoding rule.

    `generate` fills every field left None from `model.generation_config` (transformers 5: a None means "not
    set"), so None cannot switch anything off: a model's EOS came back that way, and SmolLM2 stopped after
    2 tokens on a prompt whose greedy continuation is "\\n<|im_end|>". Every field that could stop a row early
    or change the main model's choice therefore gets an explicit neutral value instead."""
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    # No stop token: every row produces exactly max_new_tokens, like mtpd's methods (and a min_length or
    # min_new_tokens the model ships has no EOS left to suppress, so the argmax stays the model's).
    config.eos_token_id = []
    config.repetition_penalty, config.no_repeat_ngram_size = 1.0, 0  # greedy means the model's own argmax
    config.pad_token_id = 0  # only used for padding, and nothing is padded after the prompts
    sampling = not isinstance(rule, Greedy)
    config.do_sample = sampling
    config.temperature = rule.temperature if sampling else None
    config.top_k = (rule.top_k or 0) if sampling else None  # 0: no top-k (transformers' default is 50)
    config.top_p = (rule.top_p or 1.0) if sampling else None
    for name, value in options.items():
        setattr(config, name, value)
    return config
