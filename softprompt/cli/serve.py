"""`softprompt serve`: flags generated from serve.config.ServeConfig."""

from __future__ import annotations

import argparse

from softprompt.cli.args import config_from_args
from softprompt.serve.config import ServeConfig

HELP = "serve adapters over an OpenAI-compatible HTTP API"
DESCRIPTION = (
    "Serve every adapter sub-folder of --adapters under its folder name, and the base model as `base`, "
    "over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions with streaming). "
    "Requests for different adapters are batched together, continuously."
)

OPTIONS = (ServeConfig,)


def run(args: argparse.Namespace) -> int:
    from softprompt.serve import run_server

    run_server(config_from_args(ServeConfig, args))
    return 0
