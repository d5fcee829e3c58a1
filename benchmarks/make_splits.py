"""Convert RTE / SST-2 / Alpaca JSONL to instruction / input / output records and cut disjoint splits.

    python benchmarks/make_splits.py --task sst2 --data path/to/sst2_train.jsonl --out splits/sst2
    python benchmarks/make_splits.py --task rte --data path/to/rte_train.jsonl --out splits/rte
    python benchmarks/make_splits.py --task alpaca --data path/to/alpaca_en.jsonl --out splits/alpaca

Writes OUT/train.jsonl, OUT/dev.jsonl (for choosing defaults) and OUT/test.jsonl (reported only), disjoint, from one
seeded shuffle. SST-2: label 0/1 -> "negative"/"positive"; RTE: label_id 0 (entailment) / 1 -> "yes"/"no", with the
hypothesis as `input`; Alpaca: records kept as they are, but only short ones (prompt + answer under --max-chars
characters), so that a CPU run stays small. TEMPLATES holds the prompt format each task is trained with.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATES = {
    "sst2": "Review: {instruction}\nSentiment: ",
    "rte": '{instruction}\nQuestion: does this mean that "{input}"? Answer yes or no.\nAnswer: ',
    "alpaca": "human-assistant",
}


def convert(task: str, row: dict) -> dict | None:
    if task == "sst2":
        return {"instruction": row["sentence"].strip(), "output": ["negative", "positive"][int(row["label"])]}
    if task == "rte":
        return {
            "instruction": row["sentence1"].strip(),
            "input": row["sentence2"].strip(),
            "output": ["yes", "no"][int(row["label_id"])],
        }
    return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TEMPLATES), required=True)
    parser.add_argument("--data", required=True, help="the source JSONL file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--dev", type=int, default=150)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--max-chars", type=int, default=400, help="alpaca: longest prompt + answer kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [r for r in (convert(args.task, row) for row in rows) if r is not None]
    if args.task == "alpaca":
        records = [r for r in records if len(r["instruction"]) + len(r["input"]) + len(r["output"]) <= args.max_chars]
    random.Random(args.seed).shuffle(records)
    need = args.train + args.dev + args.test
    if len(records) < need:
        raise SystemExit(f"{args.data}: {len(records)} usable records, {need} needed")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, count in (("train", args.train), ("dev", args.dev), ("test", args.test)):
        part = records[start : start + count]
        start += count
        (out / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8"
        )
        print(f"{out / name}.jsonl: {len(part)} records")
    (out / "template.txt").write_text(TEMPLATES[args.task], encoding="utf-8")


if __name__ == "__main__":
    main()
