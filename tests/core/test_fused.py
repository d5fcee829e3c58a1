"""Fused q/k/v and gate/up products (core/fused.py) give the separate products' bits, and step aside when they must."""

import pytest
import torch
from helpers import tiny_llama

from softprompt.core import fused
from softprompt.core.models import cpu_has_native_bf16


def layer_of(dtype, hidden: int = 64, bias: bool = False):
    model = tiny_llama(100, seed=1, hidden=hidden, layers=1).to(dtype).requires_grad_(False)
    layer = model.model.layers[0]
    if bias:  # a Llama with attention_bias: q/k/v carry biases, fused into one
        for name in ("q_proj", "k_proj", "v_proj"):
            module = getattr(layer.self_attn, name)
            module.bias = torch.nn.Parameter(torch.randn(module.out_features).to(dtype), requires_grad=False)
    return layer


def separate(layer, group: str, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([m(x) for m in fused._modules(layer, group)], dim=-1)


DTYPES = [
    torch.float32,
    pytest.param(
        torch.bfloat16, marks=pytest.mark.skipif(not cpu_has_native_bf16(), reason="no native bf16 on this CPU")
    ),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_products_give_the_separate_products_bits(dtype, bias, threads):
    torch.set_num_threads(threads)  # conftest restores it
    layer = layer_of(dtype, bias=bias)
    assert fused.use_fused_projections([layer]) == 2 and fused.use_fused_projections([layer]) == 2  # idempotent
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64).to(dtype)
    with torch.no_grad():
        for group in fused.GROUPS:
            for rows in (x[:1, :1], x[:2, :1], x[:3, :1], x[:5, 0], x):
                # contiguous, as the decode step's norm outputs are: on a CPU with native bf16 the plain bf16 product
                # with a bias rounds a strided input differently from the same rows contiguous
                rows = rows.contiguous()
                assert torch.equal(fused.fused_product(layer, group, rows), separate(layer, group, rows))


def test_a_fused_group_steps_aside_when_its_weights_change_or_autograd_needs_the_product():
    layer = layer_of(torch.float32)
    fused.use_fused_projections([layer])
    x = torch.randn(2, 1, 64)
    with torch.no_grad():
        assert fused.fused_product(layer, "qkv", x) is not None
        layer.self_attn.k_proj.weight.mul_(2)  # changed in place: the stale copy must not be used
        assert fused.fused_product(layer, "qkv", x) is None
        assert fused.fused_product(layer, "gate_up", x) is not None  # the other group is unchanged
        layer.mlp.up_proj.weight = torch.nn.Parameter(torch.randn_like(layer.mlp.up_proj.weight))  # replaced
        assert fused.fused_product(layer, "gate_up", x) is None
    fused.use_fused_projections([layer])  # made again from the current weights
    with torch.no_grad():
        for group in fused.GROUPS:
            assert torch.equal(fused.fused_product(layer, group, x), separate(layer, group, x))
    assert fused.fused_product(layer, "qkv", x.requires_grad_()) is None  # autograd: the modules' own products


def test_a_group_whose_probe_differs_is_left_unfused(monkeypatch):
    layer = layer_of(torch.float32)
    monkeypatch.setattr(fused, "_product", lambda f, x: torch.nn.functional.linear(x, f.weight, f.bias) + 1e-3)
    assert fused.use_fused_projections([layer]) == 0
    assert fused.fused_product(layer, "qkv", torch.randn(1, 1, 64)) is None
    probes = []
    monkeypatch.setattr(fused, "_same_bits", lambda *args: probes.append(1) or True)
    assert fused.use_fused_projections([layer]) == 0 and not probes  # a group that differed is not probed again
