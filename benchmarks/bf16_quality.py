"""Does bf16 training move quality? softprompt trained in float32 and in bfloat16 on held-out splits, side by side.

Every trained prompt is scored in float32 by the same code, so only the training dtype differs:
- SST-2 (--sst2, GLUE JSONL): --sst2-train records train, --sst2-held-out held out (sst2_common.sst2_split, a fixed
  instruction and the review as input), rank-classification accuracy; softprompt train's defaults;
- Alpaca (--alpaca, instruction / input / output JSONL): a seeded sample of short records (prompt + answer at most
  --max-chars characters), --alpaca-train to train and --alpaca-held-out held out, mean answer-token loss;
  softprompt train's defaults;
- the demo (--demo): `run_demo` with the base model loaded in each dtype (its own accuracy is measured in that
  dtype; the trained adapter is also re-scored in float32).
Each part runs for every --seeds value (training seed), so the seed-to-seed spread in one dtype can be set against
the float32-bfloat16 difference at the same seed.

    python benchmarks/bf16_quality.py --sst2 path/to/sst2_train.jsonl --alpaca path/to/alpaca_en.jsonl --demo

One JSON line per trained prompt as it finishes; last line: a JSON object with, per part, the values per seed and
dtype, the largest |bf16 - fp32| difference at equal seed and the largest seed-to-seed spread within a dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sst2_common import accuracy, encode_choices, sst2_split  # noqa: E402

DTYPES = ("float32", "bfloat16")


def alpaca_split(path: str, train: int, held_out: int, max_chars: int, seed: int = 0):
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    rows = [
        {"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
        for r in rows
        if r["output"].strip() and len(r["instruction"]) + len(r.get("input") or "") + len(r["output"]) <= max_chars
    ]
    random.Random(seed).shuffle(rows)
    return rows[:train], rows[train : train + held_out]


def summarise(values: dict) -> dict:
    """values[seed][dtype] -> the largest |bf16 - fp32| at equal seed, the largest spread across seeds per dtype."""
    seeds = list(values)
    diff = max(abs(values[s]["bfloat16"] - values[s]["float32"]) for s in seeds)
    spread = {d: max(values[s][d] for s in seeds) - min(values[s][d] for s in seeds) for d in DTYPES}
    mean = {d: sum(values[s][d] for s in seeds) / len(seeds) for d in DTYPES}
    return {
        "values": values,
        "mean": mean,
        "max_abs_diff_bf16_fp32": round(diff, 4),
        "seed_spread": {d: round(v, 4) for d, v in spread.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sst2", metavar="FILE.jsonl")
    parser.add_argument("--sst2-train", type=int, default=1000)
    parser.add_argument("--sst2-held-out", type=int, default=300)
    parser.add_argument("--alpaca", metavar="FILE.jsonl")
    parser.add_argument("--alpaca-train", type=int, default=256)
    parser.add_argument("--alpaca-held-out", type=int, default=100)
    parser.add_argument("--max-chars", type=int, default=400)
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if not (args.sst2 or args.alpaca or args.demo):
        parser.error("give --sst2, --alpaca and/or --demo")

    import torch

    from softprompt.core.models import load_base
    from softprompt.core.prompt import SoftPrompt
    from softprompt.data.batching import encode_records
    from softprompt.data.records import load_records
    from softprompt.data.templates import Template
    from softprompt.formats.adapter import load_adapter
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train
    from softprompt.training.scoring import evaluate_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="bf16-quality-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    bases = {d: load_base(args.model, device="cpu", dtype=d) for d in DTYPES}
    scorer = bases["float32"]
    parts = {}

    def trained(name: str, records: list[dict], dtype: str, seed: int):
        start = time.perf_counter()
        result = train(
            TrainConfig(
                data=records,
                out=str(out / f"{name}-{dtype}-{seed}"),
                model=bases[dtype],
                seed=seed,
                progress=False,
                threads=args.threads,
            )
        )
        return load_adapter(result.adapter_dir, scorer), result, time.perf_counter() - start

    if args.sst2:
        train_records, held_out = sst2_split(args.sst2, args.sst2_train, args.sst2_held_out)
        examples = encode_choices(scorer, held_out, ["negative", "positive"])
        values = {}
        for seed in seeds:
            for dtype in DTYPES:
                adapter, result, seconds = trained("sst2", train_records, dtype, seed)
                acc = accuracy(scorer, adapter.virtual(), held_out, examples)
                values.setdefault(seed, {})[dtype] = acc
                print(
                    json.dumps(
                        {
                            "part": "sst2",
                            "seed": seed,
                            "dtype": dtype,
                            "accuracy": round(acc, 4),
                            "train_loss": result.train_loss,
                            "seconds": round(seconds),
                            "tokens_per_s": round(result.tokens_per_second, 1),
                            "loadavg": [round(x, 2) for x in os.getloadavg()],
                        }
                    ),
                    flush=True,
                )
        parts["sst2_accuracy"] = {
            "train": len(train_records),
            "held_out": len(held_out),
            "zero_shot": round(accuracy(scorer, None, held_out, examples), 4),
            **summarise(values),
        }

    if args.alpaca:
        train_records, held_out = alpaca_split(args.alpaca, args.alpaca_train, args.alpaca_held_out, args.max_chars)
        examples, _, _ = encode_records(load_records(held_out).items, scorer.tokenizer, Template(), 256)
        pad = scorer.tokenizer.pad_token_id
        values = {}
        for seed in seeds:
            for dtype in DTYPES:
                adapter, result, seconds = trained("alpaca", train_records, dtype, seed)
                loss = evaluate_loss(scorer.model, SoftPrompt(adapter.embeddings), examples, 4096, pad)
                values.setdefault(seed, {})[dtype] = loss
                print(
                    json.dumps(
                        {
                            "part": "alpaca",
                            "seed": seed,
                            "dtype": dtype,
                            "held_out_loss": round(loss, 4),
                            "train_loss": result.train_loss,
                            "seconds": round(seconds),
                            "tokens_per_s": round(result.tokens_per_second, 1),
                            "loadavg": [round(x, 2) for x in os.getloadavg()],
                        }
                    ),
                    flush=True,
                )
        initial = SoftPrompt.initialise(scorer, "vocab", 20, seed=seeds[0])
        parts["alpaca_held_out_loss"] = {
            "train": len(train_records),
            "held_out": len(held_out),
            "initial_prompt": round(evaluate_loss(scorer.model, initial, examples, 4096, pad), 4),
            **summarise(values),
        }

    if args.demo:
        from softprompt import evaluate, run_demo
        from softprompt.demo import task as demo_task

        own, rescored = {}, {}
        for seed in seeds:
            for dtype in DTYPES:
                folder = out / f"demo-{dtype}-{seed}"
                start = time.perf_counter()
                metrics = run_demo(folder, bases[dtype], print_fn=lambda *a, **k: None, seed=seed, progress=False)
                after = metrics["after"]["accuracy"]
                eval_file = next(folder.rglob("eval.jsonl"))
                again = evaluate(
                    str(eval_file),
                    scorer,
                    [str(folder)],
                    choices=demo_task.CHOICES,
                    template=demo_task.TEMPLATE,
                    max_new_tokens=0,
                    progress=False,
                )["results"][0]
                own.setdefault(seed, {})[dtype] = after
                rescored.setdefault(seed, {})[dtype] = again["accuracy"]
                print(
                    json.dumps(
                        {
                            "part": "demo",
                            "seed": seed,
                            "dtype": dtype,
                            "accuracy_own_dtype": after,
                            "accuracy_fp32_scored": round(again["accuracy"], 4),
                            "seconds": round(time.perf_counter() - start),
                            "loadavg": [round(x, 2) for x in os.getloadavg()],
                        }
                    ),
                    flush=True,
                )
        parts["demo_accuracy"] = {"scored_in_training_dtype": summarise(own), "scored_fp32": summarise(rescored)}
    print(json.dumps({"seeds": seeds, **parts}))


if __name__ == "__main__":
    main()
