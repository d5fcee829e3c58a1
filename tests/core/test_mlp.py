"""The lean SwiGLU MLP (core/mlp.py) keeps a third less for the backward pass and changes no bit of the results."""

import copy

import pytest
import torch
from helpers import loss_and_grad, saved_bytes, stock_copy, text_logits, tiny_llama

from softprompt.core import mlp
from softprompt.core.forward import label_nll


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_mlp_gives_bit_identical_logits_and_gradients(tiny, dtype):
    lean = copy.deepcopy(tiny.model).to(dtype)
    stock = stock_copy(lean, mlp.is_swiglu)
    assert all(not mlp.is_swiglu(m) or "forward" not in vars(m) for m in stock.modules())
    torch.manual_seed(3)
    ids = torch.randint(5, len(tiny.tokenizer), (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    prompt = (torch.randn(4, tiny.hidden_size) * 0.1).to(dtype)
    with torch.no_grad():
        assert torch.equal(text_logits(lean, prompt, ids, mask), text_logits(stock, prompt, ids, mask))
    lean_loss, lean_grad = loss_and_grad(lean, prompt, ids, mask)
    stock_loss, stock_grad = loss_and_grad(stock, prompt, ids, mask)
    assert torch.equal(lean_loss, stock_loss)
    assert torch.equal(lean_grad, stock_grad)
    assert lean_grad.abs().sum() > 0


def test_lean_mlp_keeps_one_intermediate_tensor_less_per_layer(tiny):
    lean, stock = tiny.model, stock_copy(tiny.model, mlp.is_swiglu)
    ids = torch.randint(5, len(tiny.tokenizer), (2, 9))
    mask = torch.ones_like(ids)
    prompt = torch.randn(3, tiny.hidden_size) * 0.1
    config = lean.config
    tokens = 3 + 2 * 9  # the virtual tokens run once for the batch, then each row's text
    expected = tokens * config.intermediate_size * config.num_hidden_layers * 4  # silu(gate(x)), fp32
    assert saved_bytes(stock, prompt, ids, mask) - saved_bytes(lean, prompt, ids, mask) == expected


def test_only_gated_silu_mlps_are_switched():
    model = tiny_llama(vocab_size=50, layers=3)
    assert sum("forward" in vars(m) for m in model.modules() if mlp.is_swiglu(m)) == 3
    gelu = copy.deepcopy(model)
    for module in gelu.modules():
        if mlp.is_swiglu(module):
            module.act_fn = torch.nn.GELU()
    assert not any(mlp.is_swiglu(m) for m in gelu.modules())
    assert mlp.use_lean_mlp(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU())) == 0


def test_without_gradients_no_autograd_function_is_recorded(tiny):
    x = torch.randn(2, 5, tiny.hidden_size)
    block = next(m for m in tiny.model.modules() if mlp.is_swiglu(m))
    with torch.no_grad():
        assert block(x).grad_fn is None
    out = block(x.requires_grad_())
    assert type(out.grad_fn).__name__ == "MmBackward0" or "Backward" in type(out.grad_fn).__name__
    assert torch.equal(
        out.detach(),
        torch.nn.functional.linear(
            torch.nn.functional.silu(block.gate_proj(x)) * block.up_proj(x), block.down_proj.weight
        ).detach(),
    )
