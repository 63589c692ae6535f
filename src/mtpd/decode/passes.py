"""How a decode runs the model: eagerly (the default), or compiled (`--compile`, docs/design.md §4.8).

Both decode loops (decode/autoregressive.py, decode/speculative.py and its drafters) make their caches and
run every main-model pass and head step through a `Passes`, so compiling changes no loop:

    EAGER                   the backbone's own forward, any backbone (the Hugging Face adapter too)
    passes_for(main, True)  mtpd's decoder only: static-shape caches, and each transformer block through
                            one torch.compile'd function (`run_compiled_block`)

What is compiled is the transformer block, not a whole pass. One compiled block serves every layer of the
main model and every head (they share its code and its shapes; the weights are graph inputs), so neither
the number of graphs nor compile time grows with depth: on the development CPU a cold compile of the
`small` model's block took 10-15 s, of its whole 12-layer pass 100-190 s (SmolLM2 has 30 layers), and the
two ran within noise per 1-token pass. Spans, gathers, the output layer, the acceptance rule and the loop
stay eager: a few operations per pass, not per layer.

Shapes are dynamic (`dynamic=True`): token count, batch and cache length are symbols, so a prefill, a
verification of any number of drafts and a head's chunk of any length share graphs. Dynamo still
specialises sizes of 1 and the kind of pass: batch 1 or more x one token or more x a sequence or a tree
pass, 6 graphs per model and dtype, plus one where a size happens to equal a model dimension
(`graphs_compiled` counts them; `RECOMPILE_LIMIT` leaves room for several models and dtypes in a process).
Graphs specialised to each shape (`dynamic=False`) ran 3-9% faster per pass on this CPU, but would compile
once per pass length, batch size and cache length.

Static shapes: a compiled decode's caches have `static_shapes` (model/decoder.py: every pass attends to
every slot through its mask and writes by scatter), so no pass reads its positions on the host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mtpd.errors import MtpdError, first_line
from mtpd.model import KVCache, MTPModel, TreeAttention
from mtpd.model.decoder import Block, BlockRunner, Decoder, Span

RECOMPILE_LIMIT = 32  # graphs of the compiled block per process before torch.compile gives up (8 per model and dtype)


@dataclass(frozen=True)
class Passes:
    """How a decode makes its caches and runs its passes. `runner` None: eagerly, through the backbone's own
    forward; else mtpd's decoder with static-shape caches, each block run by `runner`."""

    runner: BlockRunner | None = None

    @property
    def compiled(self) -> bool:
        return self.runner is not None

    def main_cache(self, main, batch_size: int, max_len: int):
        if self.runner is None:
            return main.new_cache(batch_size, max_len)
        return main.new_cache(batch_size, max_len, static_shapes=True)

    def head_caches(self, model: MTPModel, batch_size: int, max_len: int) -> list[KVCache]:
        return model.new_head_caches(batch_size, max_len, static_shapes=self.runner is not None)

    def main(self, main, tokens: torch.Tensor, positions: torch.Tensor | None, cache,
             tree: TreeAttention | None = None) -> torch.Tensor:
        """The main model over tokens [B, T] -> h0 [B, T, d] (the backbone's forward)."""
        options = {} if tree is None else {"tree": tree}  # a backbone without tree attention takes no `tree`
        if self.runner is not None:
            options["runner"] = self.runner
        return main(tokens, positions, cache, **options)

    def head(self, model: MTPModel, k: int, prev_hidden: torch.Tensor, positions: torch.Tensor,
             next_tokens: torch.Tensor, cache: KVCache, tree: TreeAttention | None = None) -> torch.Tensor:
        """Head k's step (MTPModel.head_step) -> hk [B, T, d]."""
        if self.runner is None:
            return model.head_step(k, prev_hidden, positions, next_tokens, cache, tree)
        return model.head_step(k, prev_hidden, positions, next_tokens, cache, tree, self.runner)


EAGER = Passes()


def passes_for(main, compile: bool) -> Passes:
    """EAGER, or compiled passes for this main model (refused, in one line, for one mtpd cannot compile)."""
    if not compile:
        return EAGER
    if not isinstance(main, Decoder):
        raise MtpdError("--compile needs a model that runs on mtpd's own decoder; this one runs on the Hugging Face "
                        "adapter, which decodes eagerly: run without --compile")
    return Passes(run_compiled_block)


def run_compiled_block(block: Block, x: torch.Tensor, span: Span, cache: KVCache | None, layer: int) -> torch.Tensor:
    """decoder.run_block through the compiled block. The layer's cache is handed over as a one-layer view, so
    that the compiled code does not see (and specialise on) the layer index: one graph serves every layer."""
    view = None if cache is None else cache.layer(layer)
    try:
        return _compiled_block(x.device.type)(block, x, span, view)
    except _compile_errors() as exc:
        raise MtpdError(f"--compile failed: torch.compile could not compile a transformer block "
                        f"({first_line(exc)}): run without --compile") from None


def _block(block: Block, x: torch.Tensor, span: Span, cache: KVCache | None) -> torch.Tensor:
    return block(x, span, cache, 0)


@functools.cache
def _compiled_block(device_type: str):
    # On a GPU "reduce-overhead" (CUDA graphs) is the next step, once measured there: it needs caches at fixed
    # addresses across decodes and a step boundary marked per step (docs/design.md §4.8).
    return torch.compile(_block, dynamic=True, fullgraph=True, recompile_limit=RECOMPILE_LIMIT)


def _compile_errors() -> tuple[type[Exception], ...]:
    from torch._dynamo.exc import TorchDynamoException  # imported on first use: torch._dynamo is slow to import

    return (TorchDynamoException,)


def graphs_compiled() -> int:
    """Graphs torch.compile has compiled in this process so far (torch._dynamo's counters; 0 before any)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
