"""Training throughput and peak memory: softprompt vs the reference recipe, on the same records, in one run.

The reference recipe: PEFT PromptTuning (TEXT init) + Hugging Face Trainer, batch 1 x grad-accum 8, 1 epoch,
Trainer's defaults (AdamW, LR 5e-5, linear decay, clipping 1.0), the "Human: ... Assistant: " template, max length
256. softprompt runs with the same hyper-parameters (same init text, 13 virtual tokens, global batch 8, LR 5e-5,
linear decay), so the losses are comparable; each run is a separate child process so peak memory (max RSS) is its
own. After both, the two final prompts are scored on the same records with the same code (PEFT's adapter is loaded
by softprompt), and both loss curves go to a PNG.

    python benchmarks/train_throughput.py --records 64 --data path/to/alpaca_en.jsonl \
        path/to/alpaca_zh.jsonl --out /tmp/bench_train

Last line: a JSON object with speedup (softprompt tokens/s / recipe tokens/s, geometric mean over the data files),
memory_ratio (softprompt peak RSS / recipe peak RSS, the worst over data files) and per-file details, including
`ceiling`: the text tokens/s that *no* exact fp32 implementation can beat on this machine — the frozen body's matrix
products (forward + activation-gradient backward, no weight gradients), and the LM head on answer tokens only, run
at the matrix-multiply rate this machine reaches for the model's own weight shapes, with everything else
(attention, norms, activations, the optimiser) free — and that ceiling as a multiple of the recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

INIT_TEXT = "The following is a conversation between a person and a robot."


def read_records(path: str, n: int) -> list[dict]:
    from softprompt.data.records import load_records

    recs = load_records(path, limit=n)
    return [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in recs.items]


def run_recipe(args, records: list[dict], out: Path) -> dict:
    """The reference recipe, as written: PEFT PromptTuningConfig(TEXT) + Trainer(batch 1, accum 8)."""
    import torch
    from datasets import Dataset
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from softprompt.core.models import resolve_model_path

    path, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, prompt_tuning_init=PromptTuningInit.TEXT,
                                prompt_tuning_init_text=INIT_TEXT, num_virtual_tokens=args.num_virtual_tokens,
                                tokenizer_name_or_path=path)
    model = get_peft_model(model, config)

    def process(example):
        instruction = "\n".join([example["instruction"], example["input"]]).strip()
        prompt = tokenizer(f"Human: {instruction}\n\nAssistant: ", add_special_tokens=False)
        target = tokenizer(example["output"] + tokenizer.eos_token, add_special_tokens=False)
        ids = (prompt["input_ids"] + target["input_ids"])[: args.max_length]
        labels = ([-100] * len(prompt["input_ids"]) + target["input_ids"])[: args.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    data = Dataset.from_list(records).map(process, remove_columns=["instruction", "input", "output"])
    tokens = sum(len(x) for x in data["input_ids"])
    training = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=1,
                                 gradient_accumulation_steps=8, num_train_epochs=1, logging_steps=1,
                                 save_strategy="no", report_to=[], seed=args.seed, use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training, train_dataset=data,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(str(out / "adapter"))
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "seconds": seconds, "losses": losses}


def run_softprompt(args, records: list[dict], out: Path) -> dict:
    from softprompt.training.metrics import read_metrics
    from softprompt.core.models import load_base
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train

    base = load_base(args.model, device="cpu", dtype="float32")
    config = TrainConfig(data=records, out=str(out / "adapter"), model=base, init="text", init_text=INIT_TEXT,
                         num_virtual_tokens=args.num_virtual_tokens, lr=5e-5, schedule="linear", warmup_steps=0,
                         optimizer="adamw", batch_size=8, grad_accum=1, epochs=1, max_length=args.max_length,
                         max_batch_tokens=args.max_batch_tokens, log_every=1, save_every=10**9, seed=args.seed,
                         progress=False, threads=args.threads)
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    losses = [(r["step"], r["loss"]) for r in read_metrics(out / "adapter" / "metrics.jsonl") if r["kind"] == "train"]
    tokens = sum(r["tokens"] for r in [read_metrics(out / "adapter" / "metrics.jsonl")[-1]])
    return {"tokens": tokens, "seconds": seconds, "losses": losses, "loop_tokens_per_s": result.tokens_per_second}


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    records = read_records(args.child_data, args.records)
    out = Path(args.out) / f"{Path(args.child_data).stem}-{args.child}"
    out.mkdir(parents=True, exist_ok=True)
    result = (run_recipe if args.child == "recipe" else run_softprompt)(args, records, out)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["adapter"] = str(out / "adapter")
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, which: str, data: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--child-data", data, "--records", str(args.records),
           "--out", args.out, "--seed", str(args.seed), "--max-length", str(args.max_length),
           "--num-virtual-tokens", str(args.num_virtual_tokens), "--max-batch-tokens", str(args.max_batch_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{which} run on {data} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def final_losses(args, records: list[dict], adapters: dict[str, str]) -> dict[str, float]:
    """Mean answer-token NLL of each final prompt on the training records, scored by the same code."""
    from softprompt.formats.adapter import load_adapter
    from softprompt.data.batching import encode_records
    from softprompt.data.records import load_records
    from softprompt.core.models import load_base
    from softprompt.core.prompt import SoftPrompt
    from softprompt.data.templates import Template
    from softprompt.training.scoring import evaluate_loss

    base = load_base(args.model, device="cpu", dtype="float32")
    examples, _, _ = encode_records(load_records(records).items, base.tokenizer, Template(), args.max_length)
    scores = {}
    for name, path in adapters.items():
        prompt = SoftPrompt(load_adapter(path, base).embeddings)
        scores[name] = evaluate_loss(base.model, prompt, examples, args.max_batch_tokens, base.tokenizer.pad_token_id)
    init = SoftPrompt.initialise(base, "text", args.num_virtual_tokens, INIT_TEXT)
    scores["initial"] = evaluate_loss(base.model, init, examples, args.max_batch_tokens, base.tokenizer.pad_token_id)
    return scores


def gemm_seconds_per_row(weights: list, rows: int, reps: int = 10) -> float:
    """Seconds per token row of x @ W.T (forward) plus g @ W (activation-gradient backward) over `weights`."""
    import torch

    seconds = 0.0
    for weight in weights:
        out_dim, in_dim = weight.shape
        x, g = torch.randn(rows, in_dim), torch.randn(rows, out_dim)
        for _ in range(2):
            x @ weight.t(), g @ weight
        start = time.perf_counter()
        for _ in range(reps):
            x @ weight.t()
            g @ weight
        seconds += time.perf_counter() - start
    return seconds / reps / rows


def gemm_ceiling(args, records: list[dict]) -> dict:
    """Tokens/s bound from matrix-multiply work alone (see the module docstring); measured, not assumed. The body's
    matrices run for every text token, the head's for answer tokens only; the best of several row counts is used,
    not softprompt's budget."""
    import torch

    from softprompt.data.batching import encode_records
    from softprompt.data.records import load_records
    from softprompt.core.models import load_base
    from softprompt.data.templates import Template

    base = load_base(args.model, device="cpu", dtype="float32")
    examples, _, _ = encode_records(load_records(records).items, base.tokenizer, Template(), args.max_length)
    tokens, labels = sum(len(e) for e in examples), sum(e.label_count for e in examples)
    head = base.model.get_output_embeddings().weight
    body = [m.weight for m in base.model.base_model.modules() if isinstance(m, torch.nn.Linear)]
    layers = base.model.config.num_hidden_layers
    layer = body[: len(body) // layers]  # every layer has the same shapes
    per_token = min(layers * gemm_seconds_per_row(layer, rows) + labels / tokens * gemm_seconds_per_row([head], rows)
                    for rows in (256, 512, 1024, 2048))
    work = (4.0 * sum(w.numel() for w in body) * tokens + 4.0 * head.numel() * labels) / tokens
    return {"gemm_gflops": round(work / per_token / 1e9, 1), "mflop_per_token": round(work / 1e6, 1),
            "tokens_per_s": round(1 / per_token, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", metavar="FILE.jsonl",
                        help="required: one or more Alpaca-style JSONL files (records with instruction, optional "
                             "input, output), e.g. alpaca_en.jsonl alpaca_zh.jsonl; the first --records of each")
    parser.add_argument("--records", type=int, default=64, help="first N records of each file")
    parser.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default="/tmp/bench_train", help="scratch folder")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--num-virtual-tokens", type=int, default=13)
    parser.add_argument("--max-batch-tokens", type=int, default=320,
                        help="softprompt token budget per forward; 320 keeps peak memory at or below the recipe's")
    parser.add_argument("--threads", type=int, help="torch threads in both runs (default: torch's choice)")
    parser.add_argument("--child", choices=["recipe", "softprompt"], help=argparse.SUPPRESS)
    parser.add_argument("--child-data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not args.data:
        parser.error("the following arguments are required: --data")

    from softprompt.training.metrics import plot_curves

    per_file, speedups, memory = {}, [], []
    for data in args.data:
        recipe = spawn(args, "recipe", data)
        ours = spawn(args, "softprompt", data)
        name = Path(data).stem
        scores = final_losses(args, read_records(data, args.records),
                              {"recipe": recipe["adapter"], "softprompt": ours["adapter"]})
        png = plot_curves({"recipe (PEFT + Trainer)": recipe["losses"], "softprompt": ours["losses"]},
                          Path(args.out) / f"{name}-loss.png", f"{name}: train loss, {args.records} records")
        ceiling = gemm_ceiling(args, read_records(data, args.records))
        ceiling["speedup_vs_recipe"] = round(ceiling["tokens_per_s"] / recipe["tokens_per_s"], 2)
        mean = {k: sum(l for _, l in r["losses"]) / len(r["losses"]) for k, r in (("recipe", recipe),
                                                                                 ("softprompt", ours))}
        per_file[name] = {
            "records": args.records, "tokens": ours["tokens"],
            "recipe_tokens_per_s": round(recipe["tokens_per_s"], 1),
            "softprompt_tokens_per_s": round(ours["tokens_per_s"], 1),
            "softprompt_loop_tokens_per_s": round(ours["loop_tokens_per_s"], 1),
            "speedup": round(ours["tokens_per_s"] / recipe["tokens_per_s"], 2),
            "recipe_peak_rss_mb": round(recipe["peak_rss_mb"]), "softprompt_peak_rss_mb": round(ours["peak_rss_mb"]),
            "mean_train_loss": {k: round(v, 4) for k, v in mean.items()},
            "final_prompt_loss": {k: round(v, 4) for k, v in scores.items()}, "loss_curves_png": str(png),
            "ceiling": ceiling,
        }
        print(json.dumps({name: per_file[name]}), flush=True)
        speedups.append(ours["tokens_per_s"] / recipe["tokens_per_s"])
        memory.append(ours["peak_rss_mb"] / recipe["peak_rss_mb"])
    speedup = math.exp(sum(map(math.log, speedups)) / len(speedups))
    ceiling = math.exp(sum(math.log(f["ceiling"]["speedup_vs_recipe"]) for f in per_file.values()) / len(per_file))
    print(json.dumps({"speedup": round(speedup, 2), "memory_ratio": round(max(memory), 3),
                      "ceiling_speedup": round(ceiling, 2), "files": per_file}))


if __name__ == "__main__":
    main()
