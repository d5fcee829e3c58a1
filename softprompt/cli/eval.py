"""`softprompt eval`: flags generated from evaluation.config.EvalConfig, plus how the report is shown."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from softprompt.cli.args import check_output, config_from_args
from softprompt.evaluation.config import EvalConfig
from softprompt.options import check_options, option

HELP = "evaluate the base model and/or adapters: loss, perplexity, accuracy, exact match, ROUGE-L"
DESCRIPTION = (
    "Evaluate the base model and/or adapters on records. Every model gets the loss and perplexity of the "
    "answer tokens; with --choices, rank-classification accuracy (each choice's full token sequence "
    "scored after the prompt); greedy answers give exact match and ROUGE-L. An adapter always uses the "
    "template saved with it."
)


@dataclass
class Report:
    """How the command line shows the evaluation (options of the CLI only)."""

    examples: int = option(3, "print this many records with each model's answer", minimum=0, group="report")
    json: str | None = option(
        None, "write all metrics and per-record answers to this JSON file", metavar="OUT", group="report"
    )

    def __post_init__(self) -> None:
        check_options(self)


OPTIONS = (EvalConfig, Report)


def run(args: argparse.Namespace) -> int:
    shown = config_from_args(Report, args)  # every flag checked before the model loads (seconds)
    config = config_from_args(EvalConfig, args)
    check_output(shown.json, "--json", {"--data": config.data})
    from softprompt.evaluation.evaluate import evaluate, format_examples, format_table

    report = evaluate(config)
    for reason in report["skipped"]:
        print(f"skipped: {reason}")
    print(f"{report['data']}: {report['n']} records, model {report['model']}")
    print(format_table(report["results"]))
    if shown.examples:
        print("\nexamples:")
        print(format_examples(report["results"], shown.examples))
    if shown.json:
        Path(shown.json).parent.mkdir(parents=True, exist_ok=True)
        Path(shown.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {shown.json}")
    return 0
