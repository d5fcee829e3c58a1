"""`softprompt demo`: the whole story in one command, on the embedded default model.

1. Write the compass-game task (demo_task.py: generated here, held-out words for evaluation) to OUT/data.
2. Evaluate the frozen model zero-shot: rank-classification accuracy over the four directions, greedy exact match.
3. Train a soft prompt of --method (prompt tuning by default; prefix tuning, P-tuning or a cartridge) on the training words
   (progress bar), saving a PEFT-format adapter into OUT.
4. Evaluate again with the soft prompt and print a before/after table and a few answers before and after.

OUT ends up holding the adapter (adapter_config.json + adapter_model.safetensors), metrics.jsonl and
loss_curve.png from training, and demo_results.json with both evaluations.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from softprompt.core.models import FrozenModel, load_base, resolve_device, training_dtype, training_dtype_note
from softprompt.demo import task as demo_task
from softprompt.demo.config import DemoConfig
from softprompt.evaluation.config import EvalConfig
from softprompt.evaluation.evaluate import evaluate, format_examples, format_table

RESULTS_FILE = "demo_results.json"
# The optimiser measured for this task (held-out accuracy over seeds and dtypes in docs/evaluation.md); pinned so
# that the demo does not change when train's general-purpose defaults are retuned.
DEMO_OPTIMIZER = "adamw"
METHOD_NAMES = {"prompt": "prompt tuning", "prefix": "prefix tuning", "ptuning": "P-tuning", "cartridge": "cartridge"}
TUNED = {"prompt": "prompt-tuned", "prefix": "prefix-tuned", "ptuning": "p-tuned", "cartridge": "cartridge-tuned"}
METHOD_NAMES["cpt"], TUNED["cpt"] = "CPT (context-aware prompt tuning)", "CPT-tuned"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def run_demo(config: DemoConfig, *, print_fn=print) -> dict:
    """Run the demo; returns the metrics written to OUT/demo_results.json (the keyword form is
    `softprompt.run_demo(out, model, **options)`)."""
    model = config.model
    clock = {"start": time.perf_counter(), "cpu": time.process_time()}
    out = Path(config.out)
    base = model if isinstance(model, FrozenModel) else _load(config, print_fn)
    clock["loaded"] = time.perf_counter()
    task = _write_task(out, config, base, print_fn)
    eval_options = {"choices": demo_task.CHOICES, "batch_size": 16, "template": demo_task.TEMPLATE, "progress": False}

    print_fn("\n[1/3] zero-shot evaluation ...")
    before = evaluate(EvalConfig(str(task["eval_file"]), base, [], **eval_options))["results"][0]
    print_fn(f"      accuracy {before['accuracy']:.1%}, exact match {before['exact_match']:.1%}")
    clock["evaluated"] = time.perf_counter()

    print_fn(
        f"\n[2/3] {METHOD_NAMES[config.method]}: {config.num_virtual_tokens} virtual tokens for {config.steps} "
        f"steps of {config.batch_size} records ..."
    )
    trained = _train(config, base, task["train_rows"])
    clock["tuned"] = time.perf_counter()

    print_fn("\n[3/3] evaluation with the soft prompt ...")
    after = evaluate(EvalConfig(str(task["eval_file"]), base, [str(out)], **eval_options))["results"][0]
    clock["done"] = time.perf_counter()

    labels = ["zero-shot", TUNED[config.method]]
    print_fn("\n" + format_table([before, after], labels))
    print_fn("\nexamples (held-out words):\n" + format_examples([before, after], config.examples, labels))
    results = _results(config, base, task, trained, before, after, clock)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_fn(_closing_lines(out, task, results["seconds"]))
    return results


def _load(config: DemoConfig, print_fn) -> FrozenModel:
    """The base model in the dtype train would train it in: the whole demo (training and both evaluations) runs in
    it, so `--dtype auto` shows what `softprompt train --dtype auto` gives (fp32 on a CPU)."""
    device = resolve_device(None)
    note = training_dtype_note("demo", config.dtype, device)
    if note is not None:
        print_fn(note)
    return load_base(config.model, dtype=training_dtype(config.dtype, device))


def _write_task(out: Path, config: DemoConfig, base: FrozenModel, print_fn) -> dict:
    """Generate the compass-game records, write them to OUT/data and say what the task is."""
    train_rows, eval_rows = demo_task.make_records(
        config.train_records or config.steps * config.batch_size, config.seed
    )
    data_dir = out / "data"
    task = {
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "train_file": write_jsonl(data_dir / "train.jsonl", train_rows),
        "eval_file": write_jsonl(data_dir / "eval.jsonl", eval_rows),
    }
    print_fn(
        f"The compass game: every word points to a direction by a rule the model is never told "
        f"({', '.join(f'{k}s -> {v}' for k, v in demo_task.RULE.items())}).\n"
        f"{len(train_rows)} training records from {len(demo_task.word_split()[0])} words, {len(eval_rows)} "
        f"evaluation records from other words; template {demo_task.TEMPLATE!r}; base model {base.name}."
    )
    return task


def _train(config: DemoConfig, base: FrozenModel, train_rows: list[dict]):
    from softprompt.training.loop import train

    return train(train_config(config, base, train_rows))


def train_config(config: DemoConfig, base: FrozenModel, train_rows: list[dict]):
    """The demo's training run as a TrainConfig (benchmarks/demo_seeds.py varies it)."""
    from softprompt.training.config import TrainConfig

    return TrainConfig(
        data=train_rows,
        out=config.out,
        model=base,
        method=config.method,
        num_virtual_tokens=config.num_virtual_tokens,
        init=config.init if config.method != "cpt" else None,  # a CPT prompt starts as its context examples
        label_words=demo_task.CHOICES,
        template=demo_task.TEMPLATE,
        optimizer=DEMO_OPTIMIZER,
        lr=config.lr,
        max_steps=config.steps,
        batch_size=config.batch_size,
        max_batch_tokens=4096,
        save_every=config.steps,
        log_every=max(1, config.steps // 30),
        keep_checkpoints=1,
        seed=config.seed,
        progress=config.progress,
    )


def _results(
    config: DemoConfig, base: FrozenModel, task: dict, trained, before: dict, after: dict, clock: dict
) -> dict:
    """What OUT/demo_results.json holds."""
    return {
        "task": "compass game (softprompt.demo.task)",
        "model": base.name,
        "template": demo_task.TEMPLATE,
        "choices": demo_task.CHOICES,
        "train_records": len(task["train_rows"]),
        "eval_records": len(task["eval_rows"]),
        "steps": trained.steps,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "method": config.method,
        "num_virtual_tokens": config.num_virtual_tokens,
        "init": config.init,
        "optimizer": DEMO_OPTIMIZER,
        "train_loss": trained.train_loss,
        "tokens_per_second": round(trained.tokens_per_second, 1),
        "before": {k: v for k, v in before.items() if k != "examples"},
        "after": {k: v for k, v in after.items() if k != "examples"},
        "examples": [
            {"input": b["input"], "expected": b["output"], "before": b.get("generation"), "after": a.get("generation")}
            for b, a in zip(before["examples"], after["examples"])
        ],
        "seconds": {
            "load_model": round(clock["loaded"] - clock["start"], 1),
            "zero_shot_eval": round(clock["evaluated"] - clock["loaded"], 1),
            "train": round(clock["tuned"] - clock["evaluated"], 1),
            "tuned_eval": round(clock["done"] - clock["tuned"], 1),
            "total": round(clock["done"] - clock["start"], 1),
            "cpu_total": round(time.process_time() - clock["cpu"], 1),
        },
    }


def _closing_lines(out: Path, task: dict, seconds: dict) -> str:
    """Where everything went, and the next commands to try."""
    curve = out / "loss_curve.png"
    return (
        f"\nDone in {seconds['total']:.0f} s ({seconds['cpu_total']:.0f} s of CPU time). In {out}/:\n"
        f"  adapter (PEFT format)   {out}/adapter_config.json, {out}/adapter_model.safetensors\n"
        f"  training metrics        {out}/metrics.jsonl\n"
        + (f"  loss curve              {curve}\n" if curve.exists() else "")
        + f"  before/after metrics    {out / RESULTS_FILE}\n"
        f"  task data               {task['train_file']}, {task['eval_file']}\n"
        f"Next:\n  softprompt inspect {out}\n"
        f"  softprompt generate --adapter {out} --greedy {json.dumps(demo_task.QUESTION)} --input tiger\n"
        f"  softprompt eval --data {task['eval_file']} --adapter {out} --compare-base "
        f"--choices {','.join(demo_task.CHOICES)}"
    )
