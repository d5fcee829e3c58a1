"""lm-evaluation-harness through `softprompt serve`: prompt scoring batched vs one prompt at a time, in one run.

The task: a multiple-choice task defined here on SST-2 records (`--data`, e.g. ../shared/data/sst2_train.jsonl;
`--records` of them), the review in the default "Human: ... Assistant: " template, choices " negative" / " positive"
(+ EOS). lm-eval's `local-completions` model sends each (record, choice) as token ids with `echo`, `logprobs` 1 and
`max_tokens` 1 (`--batch-size` prompts per request), which the server scores as prompt-scoring jobs, and continues
each by one token (a generation job).

- shared (the default): the scheduler scores up to max_batch prompts' slices in one forward, prompts that begin
  alike (a record's two choices) run their common start once (`scheduler.share_starts`), and each one-token
  generation continues from its scored prompt instead of running the prompt again (`scheduler.hand_over`);
- batched: the same without shared starts (`share_starts = False`);
- one at a time: `score_batch = 1`, no shared starts, no hand-over: every generation prefills its prompt again (how
  it ran before any of the three).

All runs use the same app, model and dtype; they alternate `--repeats` times. Reported: seconds per run, records/s,
the ratios to one at a time, accuracy of each, and whether every per-sample log-likelihood is equal (bf16: bit for
bit; fp32: the max difference, batched kernels round differently by ~1e-6).

    python benchmarks/lm_eval_throughput.py --data ../shared/data/sst2_train.jsonl --records 500

Last line: a JSON object with `speedup` (shared / one at a time, median over repeats), `speedups` (per mode),
`same_choices`, `max_loglik_diff`, `accuracy`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import softprompt  # noqa: F401  (before torch: softprompt chooses the OpenMP waits at start-up)

# isort: split
import torch

TASK = """\
task: sp_sst2
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
doc_to_text: "Human: Is the sentiment of this movie review positive or negative?\\n\\n{{{{sentence}}}}\\n\\nAssistant:"
doc_to_target: label
doc_to_choice: {choices}
target_delimiter: " "
output_type: multiple_choice
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def write_task(folder: Path, data: str, records: int, eos: str) -> Path:
    with open(data, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    random.Random(0).shuffle(rows)
    picked = [{"sentence": r["sentence"].strip(), "label": int(r["label"])} for r in rows[:records]]
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked), encoding="utf-8")
    tasks = folder / "tasks"
    tasks.mkdir()
    choices = json.dumps(["negative" + eos, "positive" + eos])
    (tasks / "sp_sst2.yaml").write_text(TASK.format(data=path, cache=folder / "hf-cache", choices=choices))
    return tasks


def run_lm_eval(url: str, tokenizer_dir: str, tasks: Path, batch_size: int) -> tuple[float, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = simple_evaluate(
        model="local-completions",
        model_args={
            "model": "base",
            "base_url": url + "/v1/completions",
            "tokenizer": tokenizer_dir,
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "batch_size": batch_size,
            "max_retries": 1,
            "max_length": 2048,
        },
        tasks=["sp_sst2"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        num_fewshot=0,
        bootstrap_iters=0,
    )
    return time.perf_counter() - start, out


def logliks(out: dict) -> list[list[float]]:
    samples = sorted(out["samples"]["sp_sst2"], key=lambda s: s["doc_id"])
    return [[resp[0] for resp in s["filtered_resps"]] for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="SST-2 JSONL (sentence, label)")
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per lm-eval request")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (alternating)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from softprompt import create_app, load_base
    from softprompt.serve import BackgroundServer

    base = load_base(dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base.tokenizer.save_pretrained(folder / "tokenizer")
        tasks = write_task(folder, args.data, args.records, base.tokenizer.eos_token)
        modes = {"one_at_a_time": (1, False, False), "batched": (16, False, True), "shared": (16, True, True)}
        runs = {name: [] for name in modes}
        outs = {}
        with BackgroundServer(create_app(base, None, max_batch=16, max_queue=256)) as server:
            scheduler = server.app.state.softprompt.scheduler
            for _ in range(args.repeats):
                for name, (score_batch, share, hand_over) in modes.items():
                    scheduler.score_batch, scheduler.share_starts, scheduler.hand_over = score_batch, share, hand_over
                    seconds, outs[name] = run_lm_eval(server.url, str(folder / "tokenizer"), tasks, args.batch_size)
                    runs[name].append(seconds)
                    print(f"{name:>14}: {seconds:7.1f} s ({args.records / seconds:.1f} records/s)", flush=True)
            shared_tokens = scheduler.stats.score_shared_tokens
            hand_overs = scheduler.stats.score_hand_overs
    reference = logliks(outs["one_at_a_time"])
    diff = max(
        abs(x - y)
        for name in ("batched", "shared")
        for ra, rb in zip(reference, logliks(outs[name]))
        for x, y in zip(ra, rb)
    )
    pick = lambda rows: [max(range(len(r)), key=r.__getitem__) for r in rows]  # noqa: E731
    choices = all(pick(logliks(outs[name])) == pick(reference) for name in ("batched", "shared"))
    speedups = {
        name: statistics.median(a / b for a, b in zip(runs["one_at_a_time"], runs[name]))
        for name in ("batched", "shared")
    }
    acc = {name: out["results"]["sp_sst2"]["acc,none"] for name, out in outs.items()}
    print(f"vs one at a time: batched {speedups['batched']:.2f}x, shared starts {speedups['shared']:.2f}x; accuracy "
          f"{acc}; same choices {choices}; max log-likelihood difference {diff:.3g} ({base.dtype}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f})")  # fmt: skip
    result = {
        "speedup": speedups["shared"],
        "speedups": speedups,
        "seconds": runs,
        "same_choices": choices,
        "max_loglik_diff": diff,
        "shared_tokens": shared_tokens,
        "hand_overs": hand_overs,
        "accuracy": acc,
        "records": args.records,
        "dtype": str(base.dtype),
        "threads": torch.get_num_threads(),
        "load": os.getloadavg()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
