"""Instance-level forward overrides of a loaded model's modules (the lean norm and MLP paths use them)."""

from __future__ import annotations

from typing import Callable

import torch


def route_forward(
    model: torch.nn.Module, matches: Callable[[torch.nn.Module], bool], forward: Callable[..., torch.Tensor]
) -> int:
    """Bind `forward(module, *args)` as the forward of every module of `model` that `matches`; returns how many.
    The class's own forward shows again once the instance attribute is deleted (`del module.forward`)."""
    count = 0
    for module in model.modules():
        if matches(module):
            module.forward = forward.__get__(module)
            count += 1
    return count
