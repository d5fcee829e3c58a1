"""`softprompt compose`: flags generated from formats.compose.ComposeConfig."""

from __future__ import annotations

import argparse

from softprompt.cli.args import config_from_args
from softprompt.formats.config import ComposeConfig

HELP = "write several prefix or cartridge adapters as one PEFT CARTRIDGE folder (their keys/values concatenated)"
DESCRIPTION = (
    "Concatenate the keys/values of two or more prefix or cartridge adapters, in order, and write them as one "
    "CARTRIDGE adapter folder (what PEFT's compose_cartridge_adapters writes; PEFT loads it). The first part's "
    "frozen tokens, template and label words are kept. Generate, eval and serve compose at run time too: "
    "--adapter a+b, or the model name a+b. See docs/adapter-format.md."
)

OPTIONS = (ComposeConfig,)


def run(args: argparse.Namespace) -> int:
    from softprompt.formats.compose import write_composition

    config = config_from_args(ComposeConfig, args)
    out = write_composition(config.parts, config.out)
    print(f"softprompt compose: wrote {out}")
    return 0
