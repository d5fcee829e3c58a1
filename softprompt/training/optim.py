"""Optimisers and learning-rate schedules for the one trainable tensor.

The schedule is a pure function of the step (no scheduler object to save): resuming at step s gives the same
learning rate as an uninterrupted run.
"""

from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "linear", "constant")


def build_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW, or torch's Adafactor (its update is relative to the parameter's scale, lr caps the relative step)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str = "cosine") -> float:
    """Learning rate for 0-based `step`: linear warmup over `warmup` steps, then cosine / linear decay to 0 at
    `total` steps, or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
