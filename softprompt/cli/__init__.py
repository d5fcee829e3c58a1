"""The `softprompt` command line: one verb per module (litgpt style).

Each verb module defines `register(subparsers)`, which adds its parser and sets `func` to the function that
runs it with the parsed arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS = {
    "demo": "softprompt.demo.run",
    "train": "softprompt.cli.train",
    "eval": "softprompt.evaluation.evaluate",
    "generate": "softprompt.inference.generate",
    "chat": "softprompt.inference.chat",
    "serve": "softprompt.serve",
    "inspect": "softprompt.evaluation.inspect",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompt",
        description="Prompt tuning for frozen causal language models: train a few virtual tokens, "
                    "evaluate, generate and serve them. Adapters are PEFT-format folders.",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for module in VERBS.values():
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"softprompt {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
