"""`softprompt demo`: the whole story in one command, on the embedded default model.

1. Write the compass-game task (demo_task.py: generated here, held-out words for evaluation) to OUT/data.
2. Evaluate the frozen model zero-shot: rank-classification accuracy over the four directions, greedy exact match.
3. Prompt-tune a soft prompt on the training words (progress bar), saving a PEFT-format adapter into OUT.
4. Evaluate again with the soft prompt and print a before/after table and a few answers before and after.

OUT ends up holding the adapter (adapter_config.json + adapter_model.safetensors), metrics.jsonl and
loss_curve.png from training, and demo_results.json with both evaluations.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from softprompt.demo import task as demo_task
from softprompt.evaluation.evaluate import evaluate, format_examples, format_table
from softprompt.core.models import FrozenModel, load_base

DEFAULT_OUT = "softprompt-demo"
RESULTS_FILE = "demo_results.json"
# The recipe measured for this task (88.6% held-out accuracy in 100 steps, see README); pinned so that the demo does
# not change when train.py's general-purpose defaults are retuned.
DEMO_OPTIMIZER = "adamw"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run_demo(out: str | Path = DEFAULT_OUT, model: str | FrozenModel | None = None, steps: int = 100,
             batch_size: int = 16, lr: float = 3e-2, num_virtual_tokens: int = 20, init: str = "labels",
             train_records: int | None = None, examples: int = 4, seed: int = 0, progress: bool = True,
             print_fn=print) -> dict:
    """Run the demo; returns the metrics written to OUT/demo_results.json."""
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train

    start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out)
    base = model if isinstance(model, FrozenModel) else load_base(model)
    loaded = time.perf_counter()
    train_rows, eval_rows = demo_task.make_records(train_records or steps * batch_size, seed)
    data_dir = out / "data"
    train_file, eval_file = write_jsonl(data_dir / "train.jsonl", train_rows), write_jsonl(data_dir / "eval.jsonl",
                                                                                          eval_rows)
    print_fn(f"The compass game: every word points to a direction by a rule the model is never told "
             f"({', '.join(f'{k}s -> {v}' for k, v in demo_task.RULE.items())}).\n"
             f"{len(train_rows)} training records from {len(demo_task.word_split()[0])} words, {len(eval_rows)} "
             f"evaluation records from other words; template {demo_task.TEMPLATE!r}; base model {base.name}.")
    eval_kwargs = {"choices": demo_task.CHOICES, "batch_size": 16, "template": demo_task.TEMPLATE,
                   "progress": False}

    print_fn("\n[1/3] zero-shot evaluation ...")
    before = evaluate(str(eval_file), base, [], **eval_kwargs)["results"][0]
    print_fn(f"      accuracy {before['accuracy']:.1%}, exact match {before['exact_match']:.1%}")
    evaluated = time.perf_counter()

    print_fn(f"\n[2/3] prompt tuning {num_virtual_tokens} virtual tokens for {steps} steps of {batch_size} records ...")
    trained = train(TrainConfig(
        data=train_rows, out=str(out), model=base, num_virtual_tokens=num_virtual_tokens, init=init,
        label_words=demo_task.CHOICES, template=demo_task.TEMPLATE, optimizer=DEMO_OPTIMIZER, lr=lr,
        max_steps=steps, batch_size=batch_size, max_batch_tokens=4096,
        save_every=steps, log_every=max(1, steps // 30), keep_checkpoints=1, seed=seed, progress=progress,
    ))
    tuned_at = time.perf_counter()

    print_fn("\n[3/3] evaluation with the soft prompt ...")
    after = evaluate(str(eval_file), base, [str(out)], **eval_kwargs)["results"][0]
    done = time.perf_counter()

    labels = ["zero-shot", "prompt-tuned"]
    print_fn("\n" + format_table([before, after], labels))
    print_fn("\nexamples (held-out words):\n" + format_examples([before, after], examples, labels))
    results = {
        "task": "compass game (softprompt.demo.task)", "model": base.name, "template": demo_task.TEMPLATE,
        "choices": demo_task.CHOICES, "train_records": len(train_rows), "eval_records": len(eval_rows),
        "steps": trained.steps, "batch_size": batch_size, "lr": lr, "num_virtual_tokens": num_virtual_tokens,
        "init": init, "optimizer": DEMO_OPTIMIZER, "train_loss": trained.train_loss,
        "tokens_per_second": round(trained.tokens_per_second, 1),
        "before": {k: v for k, v in before.items() if k != "examples"},
        "after": {k: v for k, v in after.items() if k != "examples"},
        "examples": [{"input": b["input"], "expected": b["output"], "before": b.get("generation"),
                      "after": a.get("generation")} for b, a in zip(before["examples"], after["examples"])],
        "seconds": {"load_model": round(loaded - start, 1), "zero_shot_eval": round(evaluated - loaded, 1),
                    "train": round(tuned_at - evaluated, 1), "tuned_eval": round(done - tuned_at, 1),
                    "total": round(done - start, 1), "cpu_total": round(time.process_time() - cpu_start, 1)},
    }
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    curve = out / "loss_curve.png"
    cpu = results["seconds"]["cpu_total"]
    print_fn(f"\nDone in {done - start:.0f} s ({cpu:.0f} s of CPU time). In {out}/:\n"
             f"  adapter (PEFT format)   {out}/adapter_config.json, {out}/adapter_model.safetensors\n"
             f"  training metrics        {out}/metrics.jsonl\n"
             + (f"  loss curve              {curve}\n" if curve.exists() else "")
             + f"  before/after metrics    {out / RESULTS_FILE}\n"
             f"  task data               {train_file}, {eval_file}\n"
             f"Next:\n  softprompt inspect {out}\n"
             f"  softprompt generate --adapter {out} --greedy {json.dumps(demo_task.QUESTION)} --input tiger\n"
             f"  softprompt eval --data {eval_file} --adapter {out} --compare-base "
             f"--choices {','.join(demo_task.CHOICES)}")
    return results


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, args.model, args.steps, args.batch_size, args.lr, args.num_virtual_tokens, args.init,
             args.train_records, args.examples, args.seed, progress=not args.no_progress)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="evaluate zero-shot, prompt-tune, evaluate again on a built-in task (a few minutes on a CPU)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps (default 100)")
    p.add_argument("--batch-size", type=int, default=16, help="records per step (default 16)")
    p.add_argument("--lr", type=float, default=3e-2, help="peak learning rate of AdamW (default 0.03)")
    p.add_argument("--num-virtual-tokens", type=int, default=20, help="soft-prompt length (default 20)")
    p.add_argument("--init", default="labels", choices=("labels", "vocab", "random", "text"),
                   help="prompt initialisation (default: the four answer words, then sampled vocabulary)")
    p.add_argument("--train-records", type=int, help="training records to generate (default steps x batch size)")
    p.add_argument("--examples", type=int, default=4, help="answers to show before and after (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for the data order and initialisation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)
