"""`softprompt serve`: flags generated from serve.config.ServeConfig."""

from __future__ import annotations

import argparse

from softprompt.cli.args import add_options, config_from_args
from softprompt.serve.config import ServeConfig

HELP = "serve adapters over an OpenAI-compatible HTTP API"
DESCRIPTION = ("Serve every adapter sub-folder of --adapters under its folder name, and the base model as `base`, "
               "over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions with streaming). "
               "Requests for different adapters are batched together, continuously.")


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help=HELP, description=DESCRIPTION)
    add_options(parser, ServeConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from softprompt.serve import run_server

    run_server(config_from_args(ServeConfig, args))
    return 0
