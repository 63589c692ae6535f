"""Prepacked bf16 linear layers (model/packed.py): the same results as the unpacked model, bit for bit, in every
pass of a decode; the parameters, their ties and the state dict untouched; training and fp32 unaffected."""

import copy

import pytest
import torch
from torch import nn

from conftest import micro_model
from mtpd.decode import autoregressive_generate, speculative_generate
from mtpd.decode.tree import TreeShape
from mtpd.decode.tree_draft import StaticTree
from mtpd.model.packed import PackedLinear, pack_for_decoding, pack_linears, packing_available
from mtpd.precision import cast_for_decoding

pytestmark = pytest.mark.skipif(not packing_available(torch.bfloat16, torch.device("cpu")),
                                reason="this torch build has no oneDNN")


def packed_pair(heads: int = 2):
    plain = cast_for_decoding(micro_model(heads=heads), torch.bfloat16).eval()
    packed = copy.deepcopy(plain)
    assert pack_for_decoding(packed)
    return plain, packed


def test_packing_swaps_every_linear_and_keeps_the_parameters():
    plain, packed = packed_pair()
    linears = sum(type(m) is nn.Linear for m in plain.modules())
    assert linears > 0 and sum(type(m) is PackedLinear for m in packed.modules()) == linears
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert packed.main.lm_head.weight is packed.main.embed.weight  # still tied
    assert packed.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(packed.state_dict().values(), plain.state_dict().values()))
    assert pack_linears(packed) == 0  # nothing left to swap


def test_packed_passes_and_decodes_are_bit_identical_to_unpacked_bf16():
    plain, packed = packed_pair()
    tokens = torch.randint(0, plain.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        main_a, heads_a = plain(tokens)
        main_b, heads_b = packed(tokens)
    assert torch.equal(main_a, main_b) and all(torch.equal(a, b) for a, b in zip(heads_a, heads_b))
    prompts = [tokens[0, :9].tolist(), tokens[1, :14].tolist()]
    assert autoregressive_generate(plain.main, prompts, 16).tokens == autoregressive_generate(packed.main, prompts, 16).tokens
    tree = StaticTree(TreeShape.parse("0 1 0.0"))
    for drafter in (None, tree):
        a = speculative_generate(plain, prompts, 16, drafter=drafter)
        b = speculative_generate(packed, prompts, 16, drafter=drafter)
        assert a.tokens == b.tokens and a.accepted == b.accepted


def test_a_changed_weight_is_repacked_and_gradients_and_fp32_bypass_the_packing():
    linear = nn.Linear(16, 24, bias=True).to(torch.bfloat16)
    packed = PackedLinear(linear)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(packed(x), linear(x))
        linear.weight.mul_(2)  # in place: a new version
        assert torch.equal(packed(x), linear(x))
    y = packed(x.requires_grad_())  # a result that needs a gradient: F.linear, which has one
    y.sum().backward()
    assert x.grad is not None and linear.weight.grad is not None
    fp32 = PackedLinear(nn.Linear(16, 24))
    with torch.no_grad():
        assert torch.equal(fp32(x.detach().float()), torch.nn.functional.linear(x.detach().float(), fp32.weight,
                                                                                 fp32.bias))


def test_packing_is_for_bf16_on_a_cpu_only():
    assert not packing_available(torch.float32, torch.device("cpu"))
    assert not packing_available(torch.bfloat16, torch.device("cuda"))
    model = micro_model(heads=1)  # fp32: left as it is
    assert not pack_for_decoding(model) and not any(type(m) is PackedLinear for m in model.modules())
