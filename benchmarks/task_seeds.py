"""`softprompt train`'s defaults on classification tasks, over seeds: held-out accuracy per seed, min / mean / max.

For every task, one fixed-seed split of the shared data (SST-2: 1,000 train / 500 held-out; TREC, 6 coarse classes:
2,000 / 500; RTE: 1,000 / 500), written as instruction / input / output JSONL into --out (a temporary folder by
default). The instruction states the task, so the default template ('human-assistant') needs no flag. Then for every
dtype and seed the real command line, with only the flags the defaults leave to the user:

    softprompt train --data TRAIN --out RUN --seed S --dtype D [--threads T] [--no-progress]
    softprompt eval --data HELDOUT --adapter RUN --dtype D [--threads T] --max-new-tokens 0 --json RUN.json

(eval ranks the label words train detected and saved with the adapter). One JSON line per run as it finishes, then a
table per task and dtype: per-seed accuracy, min / mean / max, with the machine, thread count and load average.

    python benchmarks/task_seeds.py --data-dir ../shared/data --tasks sst2 trec rte --seeds 0 1 2 3 4 \
        --dtypes auto float32 --threads 1

Choosing defaults: `--dev N` trains on the train split less its last N records and evaluates on those N instead of
the held-out split, so a recipe is chosen without looking at the held-out records; `--train-flag=--FLAG=VALUE`
(repeatable) adds a flag to every train command, for comparing a recipe against the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPLIT_SEED = 20  # the one shuffle every split is cut from; fixed so every run sees the same records

TREC_WORDS = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "person",
    "LOC": "location",
    "NUM": "number",
}


def sst2(row: dict) -> dict:
    return {
        "instruction": "Is this movie review positive or negative?",
        "input": row["sentence"].strip(),
        "output": ["negative", "positive"][int(row["label"])],
    }


def trec(row: dict) -> dict:
    return {
        "instruction": "What kind of answer does this question ask for: abbreviation, description, entity, person, "
        "location or number?",
        "input": row["text"].strip(),
        "output": TREC_WORDS[row["coarse_label"]],
    }


def rte(row: dict) -> dict:
    return {
        "instruction": "Does the first sentence imply that the second sentence is true? Answer yes or no.",
        "input": f"{row['sentence1'].strip()}\n{row['sentence2'].strip()}",
        "output": ["yes", "no"][int(row["label_id"])],
    }


# task: (source file, record converter, train records, held-out records)
TASKS = {
    "sst2": ("sst2_train.jsonl", sst2, 1000, 500),
    "trec": ("trec_train.jsonl", trec, 2000, 500),
    "rte": ("rte_train.jsonl", rte, 1000, 500),
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_split(task: str, data_dir: Path, out: Path, dev: int) -> tuple[Path, Path]:
    """Write OUT/TASK/{train,heldout}.jsonl (with --dev: train less its last N, and those N as the evaluation file)."""
    name, convert, n_train, n_heldout = TASKS[task]
    lines = (data_dir / name).read_text(encoding="utf-8").splitlines()
    rows = [convert(json.loads(line)) for line in lines if line.strip()]
    random.Random(SPLIT_SEED).shuffle(rows)
    n_train = min(n_train, len(rows) - 1)
    train, heldout = rows[:n_train], rows[n_train : n_train + n_heldout]
    if dev:
        train, heldout = train[:-dev], train[-dev:]
    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / ("dev.jsonl" if dev else "heldout.jsonl"), heldout)
    return folder / "train.jsonl", folder / ("dev.jsonl" if dev else "heldout.jsonl")


def run(cmd: list[str]) -> str:
    """Run one softprompt command; its output, or exit with it when the command fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def one_run(train: Path, evaluate: Path, run_dir: Path, seed: int, dtype: str, args) -> dict:
    """Train with the defaults (plus --train-flag), evaluate on the evaluation file; the figures of the run."""
    sp = [sys.executable, "-m", "softprompt"]
    start = time.perf_counter()
    summary_path = run_dir.with_suffix(".train.json")
    if not summary_path.exists():  # a finished run in --out is kept, so an interrupted sweep resumes
        threads = ["--threads", str(args.threads)] if args.threads else []
        out = run(
            sp
            + ["train", "--data", str(train), "--out", str(run_dir), "--seed", str(seed), "--no-progress"]
            + ["--dtype", dtype]
            + threads
            + args.train_flag
        )
        summary_path.write_text(out.strip().splitlines()[-1], encoding="utf-8")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    train_s = time.perf_counter() - start
    report_path = run_dir.with_suffix(".json")
    run(  # eval has no --threads: main() sets OMP_NUM_THREADS, which torch reads at start-up
        sp
        + ["eval", "--data", str(evaluate), "--adapter", str(run_dir), "--max-new-tokens", "0", "--no-progress"]
        + ["--dtype", dtype, "--json", str(report_path)]
    )
    result = json.loads(report_path.read_text(encoding="utf-8"))["results"][0]
    return {
        "accuracy": result["accuracy"],
        "loss": round(result["loss"], 4),
        "predicted": result.get("predicted_counts"),
        "steps": summary.get("steps"),
        "train_loss": summary.get("train_loss"),
        "train_s": round(train_s, 1),
        "eval_s": round(time.perf_counter() - start - train_s, 1),
    }


def machine() -> str:
    """CPU model and whether it has AVX-512 BF16 (what --dtype auto looks at), from /proc/cpuinfo when there."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    bf16 = "avx512_bf16" in info
    return f"{model or platform.machine()}, {os.cpu_count()} cores{', AVX-512 BF16' if bf16 else ''}"


def table(results: dict, seeds: list[int], split: str) -> str:
    """A Markdown table: one row per task and dtype, per-seed accuracy, min / mean / max."""
    head = "| task | dtype | " + " | ".join(f"seed {s}" for s in seeds) + " | min / mean / max |"
    lines = [f"{split} accuracy (rank classification)", head, "|---|---|" + "---:|" * (len(seeds) + 1)]
    for (task, dtype), accs in results.items():
        cells = [f"{100 * accs[s]:.1f} %" if s in accs else "—" for s in seeds]
        values = [100 * a for a in accs.values()]
        stats = f"{min(values):.1f} / {sum(values) / len(values):.1f} / {max(values):.1f} %"
        lines.append(f"| {task} | {dtype} | " + " | ".join(cells) + f" | **{stats}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="../shared/data", help="folder with the shared JSONL files")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["sst2", "trec", "rte"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--dtypes", nargs="+", default=["auto"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dev", type=int, default=0, help="evaluate on the train split's last N records instead")
    parser.add_argument("--train-flag", action="append", default=[], help="an extra train flag, e.g. --lr=0.1")
    parser.add_argument("--out", default=None, help="where splits and runs go (default: a temporary folder)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        load_start = os.getloadavg()[0]
        results: dict[tuple[str, str], dict[int, float]] = {}
        for task in args.tasks:
            train, evaluate = make_split(task, Path(args.data_dir), out, args.dev)
            for dtype in args.dtypes:
                for seed in args.seeds:
                    figures = one_run(train, evaluate, out / task / f"{dtype}-seed{seed}", seed, dtype, args)
                    results.setdefault((task, dtype), {})[seed] = figures["accuracy"]
                    print(json.dumps({"task": task, "dtype": dtype, "seed": seed, **figures}), flush=True)
        split = f"dev ({args.dev} records of the train split)" if args.dev else "held-out"
        print(table(results, args.seeds, split))
        print(
            f"machine: {machine()}; threads {args.threads or 'torch default'}; train flags "
            f"{' '.join(args.train_flag) or '(defaults)'}; load average {load_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end"
        )


if __name__ == "__main__":
    main()
