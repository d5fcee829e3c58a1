"""Training speed of each prompt-learning method, measured back to back in one process on the same records.

    python benchmarks/methods_step_time.py --data splits/sst2/train.jsonl --template "Review: {instruction}
    Sentiment: " --steps 10

Trains each method for --steps optimiser steps of --batch-size records (the same records, the same order) with
`softprompt train`'s loop and prints its text tokens/s, seconds per step and trainable parameter count; the last line
is a JSON object. Measuring all methods in one process, one after the other, keeps the comparison fair on a machine
whose load changes (wall times of separate runs are not comparable there).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

METHODS = {"prompt": {}, "prefix": {}, "prefix --no-prefix-projection": {"prefix_projection": False}, "ptuning": {}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--template", default="human-assistant")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from softprompt.core.models import load_base
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train

    base = load_base(device="cpu", dtype="float32")
    results = {}
    for name, options in METHODS.items():
        method = name.split()[0]
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = train(
                TrainConfig(
                    data=args.data,
                    out=out,
                    model=base,
                    method=method,
                    template=args.template,
                    max_steps=args.steps,
                    batch_size=args.batch_size,
                    save_every=args.steps,
                    limit=args.steps * args.batch_size,
                    progress=False,
                    threads=args.threads,
                    **options,
                )
            )
            wall = time.perf_counter() - start
        tokens_per_s = result.tokens_per_second
        results[name] = {"tokens_per_s": round(tokens_per_s, 1), "seconds_per_step": round(wall / args.steps, 2)}
        print(f"{name}: {tokens_per_s:.1f} text tokens/s, {wall / args.steps:.2f} s/step (with set-up)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
