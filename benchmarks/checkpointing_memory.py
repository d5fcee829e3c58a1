"""Peak memory and step time of training with and without --gradient-checkpointing, A/B in one run.

Each (method, checkpointing) pair trains in its own child process (peak RSS only grows, so one process cannot
measure two runs), on the same records, steps and seed; a child reports its peak RSS after loading the model and
after training, so `train_mb` is what training added (activations kept for the backward pass, the prompt and its
optimiser state). The children run one after another, so their wall times are comparable only as ratios taken in
the same run.

    python benchmarks/checkpointing_memory.py --data splits/sst2/train.jsonl --methods prefix cartridge prompt

Last line: a JSON object with one entry per method and mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys, time
from softprompt.core.models import load_base
from softprompt.data.records import load_records
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train
args = json.loads(sys.argv[1])
base = load_base(dtype="float32", device="cpu")
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
train(TrainConfig(data=args["data"], out=args["out"], model=base, method=args["method"], max_steps=args["steps"],
                  batch_size=args["batch_size"], max_batch_tokens=args["max_batch_tokens"], save_every=1000,
                  gradient_checkpointing=args["gc"], progress=False, threads=1, seed=0, limit=args["records"]))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"loaded_mb": round(loaded), "peak_mb": round(peak), "train_mb": round(peak - loaded),
                  "seconds": round(seconds, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--methods", nargs="+", default=["prefix", "cartridge"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=1024)
    parser.add_argument("--out", default="/tmp/checkpointing_memory")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for method in args.methods:
        for gc in (False, True):
            spec = {
                "data": args.data,
                "out": f"{args.out}/{method}-{'gc' if gc else 'plain'}",
                "method": method,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "max_batch_tokens": args.max_batch_tokens,
                "gc": gc,
                "records": args.steps * args.batch_size,
            }
            done = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True, check=True
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results[f"{method}/{'checkpointing' if gc else 'plain'}"] = row
            print(method, "checkpointing" if gc else "plain", row, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
