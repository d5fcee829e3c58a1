"""`softprompt demo`: flags generated from demo.config.DemoConfig."""

from __future__ import annotations

import argparse

from softprompt.cli.args import config_from_args
from softprompt.demo.config import DemoConfig

HELP = "evaluate zero-shot, prompt-tune, evaluate again on a built-in task (a few minutes on a CPU)"
DESCRIPTION = (
    "The whole story in one command, on the embedded default model: write the compass-game task (every "
    "word points to a compass direction by a rule the model is never told), evaluate the frozen model "
    "zero-shot, prompt-tune a soft prompt on the training words, evaluate again on held-out words, and "
    "print a before/after table. OUT ends up holding the adapter (PEFT format), metrics.jsonl, "
    "loss_curve.png and demo_results.json."
)

OPTIONS = (DemoConfig,)


def run(args: argparse.Namespace) -> int:
    from softprompt.demo.run import run_demo

    config = config_from_args(DemoConfig, args)
    run_demo(config)
    return 0
