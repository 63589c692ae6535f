"""Prepacked bf16 linear layers for decoding on a CPU (docs/design.md §10.3).

A decode step multiplies a few rows by every weight matrix once, so on a CPU it is bound by how fast the
weights stream from memory. oneDNN reads a bf16 weight far faster when it has been reordered once into its
own blocked layout ("prepacked", as inductor's freezing pass does) than from PyTorch's row-major layout:
on the development CPU (Zen 4, 2 threads) SmolLM2's layers ran 1.8-2.3x faster for 1-17 rows, 1.05-1.3x
for 256, with results bit-identical to `F.linear` in bf16. fp32 gains too but rounds differently, and fp32
is the reference for token-for-token equality, so only bf16 is packed.

`pack_linears(model)` swaps every `nn.Linear` in a model for a `PackedLinear` that keeps the same `weight`
and `bias` parameters (the state dict, tied weights and everything that reads `weight`, such as the draft
vocabulary's rows of W_out, are unchanged) and computes through the packed copy. It is for decoding only:
the packed product has no backward, so a layer whose result needs a gradient, or whose weight is no longer
bf16 on a CPU, computes through `F.linear` as before, as does compiled code (`--compile`: inductor picks its
own kernels); a weight changed in place is repacked.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `pack_linears` speeds up decoding in `dtype` on `device`: bf16 on a CPU whose oneDNN packs it."""
    return dtype == torch.bfloat16 and device.type == "cpu" and _onednn_packs_bf16()


@functools.cache
def _onednn_packs_bf16() -> bool:
    """Whether oneDNN prepacks bf16 weights on this CPU: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT and
    refuses on others (seen on a Zen 1 EPYC: AVX2 only), where bf16 then computes through `F.linear`. Asked of
    oneDNN itself, once, on a 16 x 16 weight, rather than restating its rule from the CPU's flags."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 16, dtype=torch.bfloat16), weight, None, "none", [], "")
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """An `nn.Linear`'s parameters, multiplied through a oneDNN-prepacked copy of the weight when possible."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._packed: tuple | None = None  # (weight data_ptr, version, packed weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (torch.compiler.is_compiling() or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return F.linear(x, weight, self.bias)
        key = (weight.data_ptr(), weight._version)
        if self._packed is None or self._packed[:2] != key:
            self._packed = (*key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
        rows = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.detach()
        out = torch.ops.mkldnn._linear_pointwise(rows, self._packed[2], bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` under `model` for a `PackedLinear` over the same parameters, in place; returns
    how many were swapped."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child))
                swapped += 1
    return swapped


def pack_for_decoding(model: nn.Module) -> bool:
    """Pack a model cast for decoding where that is faster (`packing_available`: bf16 on a CPU; results
    unchanged); returns whether it did. For mtpd's own models: transformers' peers in a bench stay stock."""
    weight = next(model.parameters())
    return packing_available(weight.dtype, weight.device) and pack_linears(model) > 0
