"""Options of `softprompt demo`, each declared once. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.core import INIT_METHODS, METHODS
from softprompt.options import SEED_MAX, check_options, dtype_option, model_option, option, progress_option

DEFAULT_OUT = "softprompt-demo"


@dataclass
class DemoConfig:
    """The demo's recipe (measured for the compass game; pinned so that the demo does not change when train's
    general-purpose defaults are retuned). `model` may also be a preloaded core.models.FrozenModel."""

    out: str = option(DEFAULT_OUT, "output folder", metavar="DIR")
    model: str | object | None = model_option()
    dtype: str = dtype_option(training=True)
    method: str = option(
        "prompt",
        "prompt-learning method to demonstrate: prompt (prompt tuning), prefix (prefix "
        "tuning), ptuning (P-tuning), cartridge (keys/values learned directly) or cpt (in-context examples moved within "
        "bounds), as softprompt train --method",
        choices=tuple(m for m in METHODS if m != "multitask"),  # the compass game is one task
        group="training",
    )
    steps: int = option(100, "optimiser steps", minimum=1, maximum=100_000, group="training")
    batch_size: int = option(16, "records per step", minimum=1, maximum=4096, group="training")
    lr: float = option(3e-2, "peak learning rate of AdamW", above=0, maximum=10, group="training")
    num_virtual_tokens: int = option(20, "soft-prompt length", minimum=4, maximum=4096, group="training")
    init: str = option(
        "labels",
        "prompt initialisation (labels: the four answer words, then sampled vocabulary)",
        choices=INIT_METHODS,
        group="training",
    )
    train_records: int | None = option(
        None, "training records to generate (default: steps x batch size)", minimum=1, group="training"
    )
    examples: int = option(4, "answers to show before and after", minimum=0, maximum=44, group="output")
    seed: int = option(0, "seed for the data order and initialisation", minimum=0, maximum=SEED_MAX, group="training")
    progress: bool = progress_option()

    def __post_init__(self) -> None:
        check_options(self)
