"""The `softprompt` command line: one module per verb (cli/<verb>.py), each declaring HELP, DESCRIPTION, OPTIONS
(the config dataclasses whose fields become its flags, see cli/args.py) and `run(args)`. Each option is declared
once, next to the code that uses it. Building the parser imports no torch: `softprompt --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from softprompt.cli.args import add_options, check_argv_text

VERBS = {
    "demo": "softprompt.cli.demo",
    "train": "softprompt.cli.train",
    "eval": "softprompt.cli.eval",
    "generate": "softprompt.cli.generate",
    "chat": "softprompt.cli.chat",
    "serve": "softprompt.cli.serve",
    "inspect": "softprompt.cli.inspect",
    "export-vllm": "softprompt.cli.export_vllm",
    "compose": "softprompt.cli.compose",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompt",
        description="Prompt tuning for frozen causal language models: train a few virtual tokens, "
        "evaluate, generate and serve them. Adapters are PEFT-format folders.",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(verb, help=module.HELP, description=module.DESCRIPTION)
        for options in module.OPTIONS:
            add_options(sub, options)
        sub.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
        sub.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_argv_text(parser, args)
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
