"""`softprompt generate`: flags generated from inference.config.GenerateConfig."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from softprompt.cli.args import check_output, config_from_args, values_of
from softprompt.inference.config import BatchOptions, GenerateConfig, GenerationOptions

HELP = "generate answers with a base model and an optional soft-prompt adapter"
DESCRIPTION = (
    "Answer one INSTRUCTION (printed as it is generated) or every record of a --batch JSONL file. Rows of "
    "a batch may each use a different adapter; they are batched together."
)

OPTIONS = (GenerateConfig,)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(GenerateConfig, args)  # every flag checked before the model loads (seconds)
    check_output(config.out, "--out", {"--batch": config.batch})
    from softprompt.core.models import load_base
    from softprompt.formats.compose import load_spec
    from softprompt.inference.generate import check_batch, generate, generate_batch, read_batch

    records = read_batch(config.batch) if config.batch else None
    if records is None and config.logprobs is not None:  # the answer and its log-probabilities as one JSON record
        records = [{"instruction": config.instruction, "input": config.input}]
    if records is not None:
        check_batch(records, config.adapters_dir)
    if config.adapter is not None:
        load_spec(config.adapter)  # fail on a missing or malformed folder (or composition) before loading the model
    base = load_base(config.model, device=config.device, dtype=config.dtype)
    if records is None:
        options = GenerationOptions(**values_of(config, GenerationOptions))
        generate(options, config.instruction, config.input, base=base, on_text=lambda t: print(t, end="", flush=True))
        print(flush=True)
        return 0
    options = BatchOptions(**{**values_of(config, BatchOptions), "progress": config.progress and sys.stderr.isatty()})
    out = generate_batch(records, options, base=base)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        Path(config.out).write_text(lines, encoding="utf-8")
        print(f"wrote {len(out)} records to {config.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0
