"""Gated (SwiGLU) MLPs that keep less for the backward pass.

Llama-style blocks (Llama, Mistral, Qwen2, SmolLM, ...) compute down(silu(gate(x)) * up(x)). With the weights frozen,
autograd keeps three [tokens, intermediate] tensors per layer for the backward pass: gate(x) for silu's derivative,
and silu(gate(x)) and up(x) for the product's. silu(gate(x)) is one elementwise operation away from gate(x), so
`SiluMul` keeps gate(x) and up(x) only and recomputes silu in the backward pass. On SmolLM2-135M that is 6 KB less
per token per layer, a fifth of what soft-prompt training keeps, for a few milliseconds per step. The gradients are
bit-identical: the backward pass runs the same kernels in the same order as autograd's own graph.

`use_lean_mlp(model)` switches every such block of a loaded model to it; other MLPs are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation

from softprompt.core.patch import route_forward

SILU_MODULES = (torch.nn.SiLU, SiLUActivation)


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping (gate, up) for the backward pass instead of (gate, silu(gate), up)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:  # autograd's order: the product's gradient, then silu's
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMul.apply(gate, up)
    return F.silu(gate) * up


def _lean_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))


def is_swiglu(module: torch.nn.Module) -> bool:
    """A Llama-style gated MLP: gate_proj, up_proj, down_proj linear layers and a SiLU activation."""
    linears = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(layer, torch.nn.Linear) for layer in linears) and isinstance(
        getattr(module, "act_fn", None), SILU_MODULES
    )


def use_lean_mlp(model: torch.nn.Module) -> int:
    """Route every Llama-style gated MLP of `model` through `SiluMul`; returns how many were switched."""
    return route_forward(model, is_swiglu, _lean_forward)
