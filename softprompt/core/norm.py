"""Llama-style RMSNorm with a hand-written backward pass for training a prompt on a frozen model.

A Llama block's norm (Llama, Mistral, Qwen2/3, SmolLM, ...) computes w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)
with x32 = x in fp32. Autograd records six operations for it and keeps x32 (in fp32: twice a bf16 input) and the
normalised fp32 tensor for the backward pass, which then runs about a dozen elementwise operations. With the weight
frozen the gradient has a closed form, dx = r (g - x r^2 mean(g x)) with g = (dy * w) in fp32 and r the saved
rsqrt: `RmsNorm` keeps x as given and r (one value per row) and runs that in four operations. The forward pass runs
the module's own operations in the same order (the same bits); the gradient differs from autograd's only in fp32
rounding (tests compare both with fp64).

`use_lean_norm(model)` switches every such norm of a loaded model to it; other norms (Gemma's 1 + w, LayerNorm) are
left alone, and a norm whose weight trains, or that autograd does not need, runs its own forward.
"""

from __future__ import annotations

import torch

from softprompt.core.patch import route_forward

try:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
except ImportError:  # pragma: no cover - transformers without Llama
    LlamaRMSNorm = None


class RmsNorm(torch.autograd.Function):
    """weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), keeping (x, rsqrt) for a closed-form backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        g = (grad * weight).to(torch.float32)  # as autograd rounds it: the weight product in the output dtype
        x32 = x.to(torch.float32)
        dot = (g * x32).mean(-1, keepdim=True).mul_(rstd).mul_(rstd)
        return g.sub_(x32 * dot).mul_(rstd).to(x.dtype), None, None


def _same_code(a, b) -> bool:
    return a.co_code == b.co_code and a.co_names == b.co_names and a.co_consts == b.co_consts


def is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """A norm whose forward is Llama's RMSNorm forward (the families transformers copies it into), with its
    `weight` and `variance_epsilon`."""
    if LlamaRMSNorm is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return False
    forward = getattr(type(module), "forward", None)
    return (
        hasattr(module, "variance_epsilon")
        and forward is not None
        and hasattr(forward, "__code__")
        and _same_code(forward.__code__, LlamaRMSNorm.forward.__code__)
    )


def _lean_forward(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad and not norm.weight.requires_grad:
        return RmsNorm.apply(x, norm.weight, norm.variance_epsilon)
    return type(norm).forward(norm, x)


def use_lean_norm(model: torch.nn.Module) -> int:
    """Route every Llama-style RMSNorm of `model` through `RmsNorm` when autograd needs it; returns how many."""
    return route_forward(model, is_llama_rms_norm, _lean_forward)
