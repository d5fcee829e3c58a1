"""The demo's held-out accuracy over seeds and dtypes: how stable is `softprompt demo`'s outcome?

For every dtype and seed: the demo's task and training run (demo.run.train_config, optionally changed by --set
field=value for any TrainConfig field), then rank-classification accuracy on the 44 held-out words (no generation).
One JSON line per run as it finishes; last line: min / mean / max per dtype.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 --dtypes float32 bfloat16 [--set lr=0.01 --set steps=...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time


def parse_value(text: str):
    """JSON when it parses (numbers, true/false/null), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a DemoConfig field (steps, lr, init, ...) or, failing that, a TrainConfig field",
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from softprompt import evaluate
    from softprompt.core.models import load_base
    from softprompt.demo import task as demo_task
    from softprompt.demo.config import DemoConfig
    from softprompt.demo.run import train_config
    from softprompt.training.loop import train

    demo_fields = {f.name for f in dataclasses.fields(DemoConfig)}
    changes = dict(item.split("=", 1) for item in args.set)
    demo_changes = {k: parse_value(v) for k, v in changes.items() if k in demo_fields}
    train_changes = {k: parse_value(v) for k, v in changes.items() if k not in demo_fields}
    summary = {}
    for dtype in args.dtypes:
        base = load_base(None, dtype=dtype)
        accuracies = []
        for seed in args.seeds:
            config = DemoConfig(seed=seed, dtype=dtype, progress=False, **demo_changes)
            rows, eval_rows = demo_task.make_records(config.train_records or config.steps * config.batch_size, seed)
            with tempfile.TemporaryDirectory() as out:
                tc = dataclasses.replace(
                    train_config(dataclasses.replace(config, out=out), base, rows), **train_changes
                )
                start = time.perf_counter()
                result = train(tc)
                report = evaluate(
                    eval_rows,
                    base,
                    [out],
                    choices=demo_task.CHOICES,
                    template=demo_task.TEMPLATE,
                    max_new_tokens=0,
                    progress=False,
                )["results"][0]
            accuracies.append(report["accuracy"])
            print(
                json.dumps(
                    {
                        "dtype": dtype,
                        "seed": seed,
                        "accuracy": round(report["accuracy"], 4),
                        "loss": round(report["loss"], 4),
                        "train_loss": result.train_loss,
                        "steps": result.steps,
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                ),
                flush=True,
            )
        summary[dtype] = {
            "min": min(accuracies),
            "mean": round(sum(accuracies) / len(accuracies), 4),
            "max": max(accuracies),
            "values": accuracies,
        }
    print(
        json.dumps(
            {
                "changes": changes,
                "machine": platform.processor() or platform.machine(),
                "load_average": os.getloadavg()[0],
                "summary": summary,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
