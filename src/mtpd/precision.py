"""The dtype a model decodes (and evaluates) in: which one `--dtype` picks, why, and how the model is cast.

fp32 is the reference: greedy speculative decoding equals greedy autoregressive decoding token for token.
bf16 is faster where the hardware computes it natively (a CUDA GPU; a CPU with avx512_bf16 or AMX), but a
k-token verification pass and a 1-token pass add up their products in different orders and round
differently, so in bf16 the two greedy outputs can part where the main model's top two logits nearly tie
(`mtpd bench` reports where: bench.py `baseline_agreement`).

Training has its own `--dtype` (train.py `autocast_dtype`: bf16 autocast over fp32 weights); here the
weights themselves are cast, since decoding has no optimizer that needs fp32 master weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mtpd.errors import MtpdError

DTYPE_NAMES = ("auto", "fp32", "bf16")  # the values of --dtype, as on `mtpd train`
CPUINFO = Path("/proc/cpuinfo")
# CPU features with native bf16 dot products; without them torch emulates bf16 on CPU, slower than fp32.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_dtype(name: str, device: torch.device | str, cpuinfo: Path = CPUINFO) -> torch.dtype:
    """The dtype `--dtype name` decodes in on `device`: "fp32" and "bf16" as asked; "auto" bf16 where the
    device computes it natively, else fp32."""
    return _decide(name, torch.device(device), cpuinfo)[0]


def dtype_reason(name: str, device: torch.device | str, cpuinfo: Path = CPUINFO) -> str:
    """Why `resolve_dtype` chose what it chose, for reports."""
    return _decide(name, torch.device(device), cpuinfo)[1]


def _decide(name: str, device: torch.device, cpuinfo: Path) -> tuple[torch.dtype, str]:
    if name == "fp32":
        return torch.float32, "fp32 as asked (--dtype fp32): the reference for token-for-token equality"
    if name == "bf16":
        return torch.bfloat16, "bf16 as asked (--dtype bf16)"
    if name != "auto":
        raise MtpdError(f"unknown --dtype '{name}': use auto, fp32 or bf16")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bf16, the CUDA device computes it natively"
        return torch.float32, "auto: fp32, the CUDA device has no native bf16"
    if device.type == "cpu":
        flags = cpu_flags(cpuinfo)
        if flags is None:
            return torch.float32, f"auto: fp32, cannot tell whether the CPU computes bf16 natively (no {cpuinfo})"
        native = [flag for flag in CPU_BF16_FLAGS if flag in flags]
        if native:
            return torch.bfloat16, f"auto: bf16, the CPU computes it natively ({', '.join(native)})"
        return torch.float32, (f"auto: fp32, the CPU lacks {' and '.join(CPU_BF16_FLAGS)} (bf16 would be emulated, "
                               f"slower than fp32)")
    return torch.float32, f"auto: fp32 on device type '{device.type}'"


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux; None where it cannot be read). Torch's own
    `get_cpu_capability()` names the vector ISA (e.g. AVX512) but not whether bf16 dot products are native."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def cast_for_decoding(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the model's floating-point weights to `dtype`, in place; KV caches and the heads' hidden buffers
    take the weights' dtype when decoding allocates them. Buffers are left as they are: the rotary tables
    (the built-in decoder's cos/sin, transformers' inv_freq) stay fp32 and are cast at use, as transformers
    does. `Module.to(bf16)` would round transformers' inv_freq to 8 bits, and since the rotary angle is
    position x frequency, the error grows with the position (0.05 rad at position 500)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)  # in place: tied weights (embedding = output layer) stay tied
    return model


def weights_dtype(model: nn.Module) -> str:
    """The dtype a model decodes in, as reports write it ("float32", "bfloat16"): its weights'."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")
