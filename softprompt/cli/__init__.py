"""The `softprompt` command line: one module per verb (cli/<verb>.py), each with `register(subparsers)` and
`run(args)`. The flags come from the library's config dataclasses (cli/args.py), so each option is declared once,
next to the code that uses it. Building the parser imports no torch: `softprompt --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS = {
    "demo": "softprompt.cli.demo",
    "train": "softprompt.cli.train",
    "eval": "softprompt.cli.eval",
    "generate": "softprompt.cli.generate",
    "chat": "softprompt.cli.chat",
    "serve": "softprompt.cli.serve",
    "inspect": "softprompt.cli.inspect",
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
    for sub in subparsers.choices.values():
        sub.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as err:
        if args.debug:
            raise
        print(f"softprompt {args.verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
