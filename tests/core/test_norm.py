"""The lean RMSNorm (core/norm.py): the model's own forward bits, gradients as accurate as autograd's, and half the
saved bytes of a bf16 norm."""

import copy

import pytest
import torch
from helpers import loss_and_grad, saved_bytes, stock_copy, text_logits, tiny_llama

from softprompt.core import norm
from softprompt.core.forward import label_nll


def _batch(tiny):
    torch.manual_seed(3)
    ids = torch.randint(5, len(tiny.tokenizer), (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norm_gives_the_models_bits_forward_and_its_gradients_to_rounding(tiny, dtype):
    lean = copy.deepcopy(tiny.model).to(dtype)
    stock = stock_copy(lean, norm.is_llama_rms_norm)
    assert sum("forward" in vars(m) for m in lean.modules() if norm.is_llama_rms_norm(m)) == 5
    assert not any("forward" in vars(m) for m in stock.modules() if norm.is_llama_rms_norm(m))
    ids, mask = _batch(tiny)
    prompt = (torch.randn(4, tiny.hidden_size) * 0.1).to(dtype)
    with torch.no_grad():
        assert torch.equal(text_logits(lean, prompt, ids, mask), text_logits(stock, prompt, ids, mask))
    lean_loss, lean_grad = loss_and_grad(lean, prompt, ids, mask)
    stock_loss, stock_grad = loss_and_grad(stock, prompt, ids, mask)
    assert torch.equal(lean_loss, stock_loss)  # the forward pass is the same
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert lean_grad.abs().sum() > 0
    assert (lean_grad - stock_grad).abs().max() <= tolerance * stock_grad.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gradient_agrees_with_fp64_as_well_as_autograds(tiny, dtype):
    module = copy.deepcopy(tiny.model.model.norm).to(dtype)
    generator = torch.Generator().manual_seed(0)
    module.weight.data = (torch.randn(module.weight.shape, generator=generator) * 0.3 + 1).to(dtype)
    x = (torch.randn(4, 7, module.weight.shape[0], generator=generator) * 3).to(dtype)
    grad = torch.randn(x.shape, generator=generator).to(dtype)
    results = []
    for forward in (module.forward, lambda t: type(module).forward(module, t)):
        leaf = x.clone().requires_grad_()
        out = forward(leaf)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    # fp64 with the bf16 rounding autograd applies to (grad * weight) before the upcast
    x64 = x.double().requires_grad_()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    (x64 * rstd).backward((grad * module.weight).double())
    (lean_out, lean_grad), (stock_out, stock_grad) = results
    assert torch.equal(lean_out, stock_out)
    scale = x64.grad.abs().max()
    lean_err = ((lean_grad.double() - x64.grad).abs().max() / scale).item()
    stock_err = ((stock_grad.double() - x64.grad).abs().max() / scale).item()
    assert lean_grad.dtype == dtype
    assert lean_err <= max(stock_err, 1e-6 if dtype == torch.float32 else 1e-3)


def test_lean_norm_keeps_a_bf16_input_instead_of_its_fp32_copy(tiny):
    lean = copy.deepcopy(tiny.model).to(torch.bfloat16)
    stock = stock_copy(lean, norm.is_llama_rms_norm)
    ids = torch.randint(5, len(tiny.tokenizer), (2, 9))
    mask = torch.ones_like(ids)
    prompt = (torch.randn(3, tiny.hidden_size) * 0.1).to(torch.bfloat16)
    layers, hidden = lean.config.num_hidden_layers, lean.config.hidden_size
    # every norm the virtual tokens pass (2 per layer + the final one) and the text's, but layer 0's first (its
    # input, the token embeddings, needs no gradient): fp32 (4 bytes) kept by autograd, bf16 (2) by RmsNorm
    norms = 3 * (2 * layers + 1) + 2 * 9 * 2 * layers
    assert saved_bytes(stock, prompt, ids, mask) - saved_bytes(lean, prompt, ids, mask) == norms * hidden * 2


def test_only_llama_rms_norms_are_switched_and_no_grad_records_nothing(tiny):
    model = tiny_llama(vocab_size=50, layers=3)
    assert sum("forward" in vars(m) for m in model.modules() if norm.is_llama_rms_norm(m)) == 7
    assert norm.use_lean_norm(torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))) == 0

    class Scaled(torch.nn.Module):  # a norm with the same attributes but its own forward
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.ones(4)), 1e-6

        def forward(self, x):
            return x * (1 + self.weight)

    assert not norm.is_llama_rms_norm(Scaled())
    x = torch.randn(2, 5, tiny.hidden_size, requires_grad=True)
    with torch.no_grad():
        assert tiny.model.model.norm(x).grad_fn is None
    assert type(tiny.model.model.norm(x).grad_fn).__name__ == "RmsNormBackward"
    assert type(tiny.model.model.norm(x.detach()).grad_fn).__name__ != "RmsNormBackward"
