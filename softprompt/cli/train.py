"""`softprompt train`: flags generated from training.config.TrainConfig."""

from __future__ import annotations

import argparse
import json

from softprompt.cli.args import config_from_args
from softprompt.training.config import TrainConfig

HELP = "train a soft prompt on a data file"
DESCRIPTION = (
    "Train a soft prompt (N virtual tokens) in front of a frozen causal LM. The final adapter is written to "
    "--out as a PEFT-format folder; checkpoints go to OUT/checkpoints, the best-eval adapter to OUT/best, "
    "metrics to OUT/metrics.jsonl and OUT/loss_curve.png."
)

OPTIONS = (TrainConfig,)


def run(args: argparse.Namespace) -> int:
    from softprompt.training.loop import train

    result = train(config_from_args(TrainConfig, args))
    for reason in result.skipped:
        print(f"skipped: {reason}")
    summary = {
        "adapter": result.adapter_dir,
        "steps": result.steps,
        "train_loss": result.train_loss,
        "best_eval_loss": result.best_eval_loss,
        "best_step": result.best_step,
        "stopped": result.stopped,
        "tokens_per_s": round(result.tokens_per_second, 1),
        "skipped": len(result.skipped),
        "truncated": result.truncated,
    }
    print(json.dumps(summary))
    return 0
