"""Time to quality on SST-2: held-out accuracy against wall time, softprompt's defaults vs PEFT, in one run.

Both train on the same records of a seeded split you hold out yourself (sst2_common.sst2_split: --train-records to
train, the next --eval-records held out; a fixed instruction, the review as input, the default "Human: ...
Assistant: " template):
- softprompt `train` with its defaults (--dtype auto, 20 virtual tokens, label-word init, Adafactor 0.3, batch 8,
  cosine, 1 epoch);
- PEFT at its best simple setting: the reference recipe (PromptTuning TEXT init, 13 virtual tokens, Trainer batch 1
  x grad-accum 8, 1 epoch, linear decay) with AdamW LR 3e-2 (--peft-lr), fp32 as written (--peft-bf16: Trainer's
  bf16=True).
About --snapshots times during each run the prompt is copied aside with its wall time since the run started
(copying is not counted); afterwards every snapshot's held-out accuracy is measured with the same scorer (fp32).

    python benchmarks/time_to_quality.py --data path/to/sst2_train.jsonl --train-records 600 --eval-records 300

Last line: a JSON object with each run's curve [(seconds, step, accuracy)], PEFT's final accuracy, the seconds each
run needs to reach it (`seconds_to_peft_final`, null if never) and their ratio (`speedup`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sst2_common import accuracy, encode_choices, sst2_split  # noqa: E402

INIT_TEXT = "The following is a conversation between a person and a robot."


class Clock:
    """Wall time since start, minus the time spent taking snapshots."""

    def __init__(self):
        self.start, self.paused = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.paused


def run_softprompt(args, records: list[dict], every: int) -> list[tuple[float, int, object]]:
    import torch

    from softprompt.core.models import load_base
    from softprompt.training import loop
    from softprompt.training.config import TrainConfig

    base = load_base(args.model, device="cpu", dtype=args.dtype)
    snapshots = []
    clock = None

    def snapshot(run):  # replaces the checkpoint write: the prompt and the time, nothing on disk
        begin = time.perf_counter()
        with torch.no_grad():
            snapshots.append((clock.now(), run.done, run.prompt.virtual().tensor.detach().float().clone()))
        clock.paused += time.perf_counter() - begin

    real = loop._save_checkpoint
    loop._save_checkpoint = snapshot
    try:
        config = TrainConfig(
            data=records,
            out=os.path.join(args.out, "softprompt"),
            model=base,
            save_every=every,
            progress=False,
            threads=args.threads,
            seed=args.seed,
        )
        clock = Clock()
        loop.train(config)
    finally:
        loop._save_checkpoint = real
    return snapshots, str(base.dtype).replace("torch.", "")


def run_peft(args, records: list[dict], every: int):
    import torch
    from datasets import Dataset
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from softprompt.core.models import resolve_model_path

    path, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=INIT_TEXT,
        num_virtual_tokens=13,
        tokenizer_name_or_path=path,
    )
    model = get_peft_model(model, config)
    snapshots = []
    clock = Clock()

    class Snapshot(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                begin = time.perf_counter()
                with torch.no_grad():
                    tensor = model.get_prompt_embedding_to_save(adapter_name="default").detach().float().clone()
                snapshots.append((clock.now(), state.global_step, tensor))
                clock.paused += time.perf_counter() - begin

    def process(example):
        instruction = "\n".join([example["instruction"], example["input"]]).strip()
        prompt = tokenizer(f"Human: {instruction}\n\nAssistant: ", add_special_tokens=False)
        target = tokenizer(example["output"] + tokenizer.eos_token, add_special_tokens=False)
        ids = (prompt["input_ids"] + target["input_ids"])[:256]
        labels = ([-100] * len(prompt["input_ids"]) + target["input_ids"])[:256]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    clock.start = time.perf_counter()
    data = Dataset.from_list(records).map(process, remove_columns=["instruction", "input", "output"])
    training = TrainingArguments(
        output_dir=os.path.join(args.out, "peft"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
        num_train_epochs=1,
        learning_rate=args.peft_lr,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=args.peft_bf16,
    )
    Trainer(
        model=model,
        args=training,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[Snapshot()],
    ).train()
    return snapshots, "bfloat16 (autocast)" if args.peft_bf16 else "float32"


def first_reaching(curve: list[dict], target: float) -> float | None:
    return next((p["seconds"] for p in curve if p["accuracy"] >= target - 1e-12), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help="GLUE SST-2 JSONL (sentence, label)")
    parser.add_argument("--train-records", type=int, default=600)
    parser.add_argument("--eval-records", type=int, default=300)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train / held-out shuffle")
    parser.add_argument("--seed", type=int, default=0, help="training seed (both runs)")
    parser.add_argument("--snapshots", type=int, default=10, help="about this many accuracy points per run")
    parser.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", help="softprompt's --dtype (default: its default, auto)")
    parser.add_argument("--peft-lr", type=float, default=3e-2)
    parser.add_argument("--peft-bf16", action="store_true", help="PEFT run with Trainer's bf16=True")
    parser.add_argument("--runs", default="peft,softprompt")
    parser.add_argument("--out", default="/tmp/time_to_quality")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    import torch

    from softprompt.core.models import load_base

    if args.threads:
        torch.set_num_threads(args.threads)
    train_records, held_out = sst2_split(args.data, args.train_records, args.eval_records, args.split_seed)
    steps = math.ceil(len(train_records) / 8)
    every = max(1, steps // args.snapshots)
    raw, dtypes, load = {}, {}, {"start": [round(x, 2) for x in os.getloadavg()]}
    for which in args.runs.split(","):
        raw[which], dtypes[which] = (run_peft if which == "peft" else run_softprompt)(args, train_records, every)
        load[which] = [round(x, 2) for x in os.getloadavg()]
    scorer = load_base(args.model, device="cpu", dtype="float32")
    examples = encode_choices(scorer, held_out, ["negative", "positive"])
    zero_shot = accuracy(scorer, None, held_out, examples)
    curves = {}
    for which, snaps in raw.items():
        curves[which] = [
            {"seconds": round(t, 1), "step": step, "accuracy": round(accuracy(scorer, tensor, held_out, examples), 4)}
            for t, step, tensor in snaps
        ]
        print(json.dumps({which: curves[which]}), flush=True)
    result = {
        "train_records": len(train_records),
        "held_out": len(held_out),
        "zero_shot": round(zero_shot, 4),
        "dtypes": dtypes,
        "peft_lr": args.peft_lr,
        "loadavg": load,
        "curves": curves,
    }
    if "peft" in curves and curves["peft"]:
        target = curves["peft"][-1]["accuracy"]
        reach = {k: first_reaching(c, target) for k, c in curves.items()}
        result.update(
            {
                "peft_final_accuracy": target,
                "final_accuracy": {k: c[-1]["accuracy"] for k, c in curves.items() if c},
                "best_accuracy": {k: max(p["accuracy"] for p in c) for k, c in curves.items() if c},
                "seconds_to_peft_final": reach,
                "total_seconds": {k: c[-1]["seconds"] for k, c in curves.items() if c},
            }
        )
        if reach.get("softprompt") and reach.get("peft"):
            result["speedup"] = round(reach["peft"] / reach["softprompt"], 2)
    try:
        from softprompt.training.metrics import plot_curves

        png = plot_curves(
            {k: [(p["seconds"], p["accuracy"]) for p in c] for k, c in curves.items()},
            Path(args.out) / "accuracy_vs_seconds.png",
            f"SST-2 held-out accuracy ({len(held_out)}) vs seconds (x axis), {len(train_records)} records",
        )
        result["png"] = str(png)
    except ImportError:
        pass
    print(json.dumps(result))


if __name__ == "__main__":
    main()
