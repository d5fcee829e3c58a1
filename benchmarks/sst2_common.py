"""Shared by the classification benchmarks: classification JSONL files as instruction records (a fixed instruction,
the text as input, the label's word as output), a seeded, disjoint train / held-out split of GLUE SST-2 with the
default "Human: ... Assistant: " template, and held-out accuracy of a soft prompt by rank classification
(softprompt's scorer, fp32)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

INSTRUCTION = "Is the sentiment of this movie review positive or negative?"
WORDS = ["negative", "positive"]


def instruction_records(
    path: str, limit: int, instruction: str, text_field: str, answer: Callable[[dict], str]
) -> list[dict]:
    """The first `limit` JSONL rows of a classification file as records: `instruction`, the row's `text_field` as
    input, `answer(row)` as output."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if len(records) == limit:
                break
            if line.strip():
                row = json.loads(line)
                records.append({"instruction": instruction, "input": row[text_field].strip(), "output": answer(row)})
    return records


def sst2_split(path: str, train: int, held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """`train` and `held_out` records from one seeded shuffle of the file (disjoint)."""
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    random.Random(seed).shuffle(rows)
    records = [
        {"instruction": INSTRUCTION, "input": r["sentence"].strip(), "output": WORDS[int(r["label"])]}
        for r in rows[: train + held_out]
    ]
    if len(records) < train + held_out:
        raise SystemExit(f"{path}: {len(records)} records, {train + held_out} needed")
    return records[:train], records[train:]


def encode_choices(base, records: list[dict], choices: list[str], template=None):
    from softprompt.data import batching
    from softprompt.data.templates import Template, encode_example

    template = template or Template()
    return [
        batching.Example(
            *encode_example(template, base.tokenizer, r["instruction"], r.get("input", ""), c, 2048)[:2], ""
        )
        for r in records
        for c in choices
    ]


def accuracy(base, virtual, records: list[dict], examples=None, choices: list[str] = WORDS) -> float:
    """Rank-classification accuracy of a soft prompt (a tensor, forward.Virtual or None) on records."""
    import torch

    from softprompt.training.scoring import nll_per_group

    examples = examples or encode_choices(base, records, choices)
    nll, _ = nll_per_group(base.model, virtual, examples, len(choices), base.tokenizer.pad_token_id, 4096, 64)
    picked = nll.view(len(records), len(choices)).argmin(1)
    gold = torch.tensor([choices.index(r["output"]) for r in records])
    return float((picked == gold).double().mean())
