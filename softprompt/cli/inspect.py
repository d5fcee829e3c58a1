"""`softprompt inspect`: flags generated from evaluation.config.InspectConfig."""

from __future__ import annotations

import argparse
import json

from softprompt.cli.args import config_from_args
from softprompt.evaluation.config import InspectConfig

HELP = "show an adapter's config, size and what its virtual tokens are near in the vocabulary"
DESCRIPTION = (
    "Show an adapter's config, its size on disk, its trainable parameter count, and for every virtual "
    "token its norm and the vocabulary tokens whose input embeddings are nearest by cosine similarity "
    "(the mean vocabulary embedding norm is printed for scale)."
)

OPTIONS = (InspectConfig,)


def run(args: argparse.Namespace) -> int:
    from softprompt.core.models import load_base
    from softprompt.evaluation.inspect import base_for, format_report, inspect_adapter
    from softprompt.formats.adapter import load_adapter

    config = config_from_args(InspectConfig, args)
    adapter = load_adapter(config.adapter)  # fail fast on a bad folder, before loading a model
    base = None
    if config.top_k > 0:
        base = load_base(base_for(adapter.config, config.model), device=config.device, dtype="float32")
    info = inspect_adapter(config.adapter, base, config.top_k)
    print(json.dumps(info, indent=2, ensure_ascii=False) if config.json else format_report(info))
    return 0
