"""Training throughput and peak memory: softprompt vs the reference recipe (as written, and with bf16), in one run.

The reference recipe: PEFT PromptTuning (TEXT init) + Hugging Face Trainer, batch 1 x grad-accum 8, 1 epoch,
Trainer's defaults (AdamW, LR 5e-5, linear decay, clipping 1.0), the "Human: ... Assistant: " template, max length
256, fp32 ("recipe"); and the same recipe with Trainer's `bf16=True` (CPU autocast, "recipe_bf16"), the fair peer of
softprompt's bf16 training. softprompt runs with its own defaults on a base loaded with --dtype auto (what auto picks for
inference: bf16 on a CPU with fast bf16, though `softprompt train --dtype auto` trains in fp32 on a CPU), length-grouped micro-batches on
its default token budget, once-per-step shared prefix; --runs ...,softprompt_fp32,softprompt_bf16 adds softprompt in
each dtype explicitly) and the recipe's hyper-parameters (same init text, 13 virtual tokens,
global batch 8, AdamW 5e-5, linear decay), so the final losses are comparable. Each run is a separate child process
so peak memory (max RSS) is its own. Then every final prompt is scored on the same records with the same code (fp32;
PEFT's adapters are loaded by softprompt), and the loss curves go to a PNG.

    python benchmarks/train_throughput.py --data path/to/alpaca_en.jsonl path/to/alpaca_zh.jsonl \
        --sst2 path/to/sst2_train.jsonl --out /tmp/bench_train

--data: Alpaca-style JSONL (instruction, input, output), the first --records of each. --sst2: GLUE SST-2 JSONL
(sentence, label) as a classification set with a fixed instruction ("Is the sentiment of this movie review positive
or negative?", the review as input, "positive"/"negative" as output), the first --sst2-records.

Last line: a JSON object with `speedup` (softprompt tokens/s / the recipe-as-written's, geometric mean over the
data sets), `speedup_vs_bf16_recipe` (the same against the bf16 recipe), `memory_ratio` (softprompt peak RSS / the
recipe-as-written's, the worst data set), `final_loss_max_diff` (the largest |final-prompt loss, softprompt - recipe|)
and per-set details, including `ceiling`, per dtype: the text tokens/s that *no* exact implementation in that dtype
can beat on this machine — the frozen body's matrix products (forward + activation-gradient backward, no weight
gradients) and the LM head on answer tokens only, run at the matrix-multiply rate measured on this machine for the
model's own weight shapes in that dtype, with everything else (attention, norms, activations, the optimiser) free.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sst2_common import WORDS, instruction_records  # noqa: E402

INIT_TEXT = "The following is a conversation between a person and a robot."
SST2_INSTRUCTION = "Is the sentiment of this movie review positive or negative?"
RUNS = ("recipe", "recipe_bf16", "softprompt", "softprompt_fp32", "softprompt_bf16")
SOFTPROMPT_DTYPES = {"softprompt": None, "softprompt_fp32": "float32", "softprompt_bf16": "bfloat16"}
LOSS_TOLERANCE = 0.015  # nats per answer token between final prompts: float noise is ~1e-4, the record order
# (length-grouped steps vs Trainer's random sampler) ~1e-2 on the SST-2 set, whose prompt moves ~0.3 (see docs)


def read_records(path: str, n: int, kind: str = "alpaca") -> list[dict]:
    if kind == "sst2":
        return instruction_records(path, n, SST2_INSTRUCTION, "sentence", lambda row: WORDS[int(row["label"])])
    from softprompt.data.records import load_records

    recs = load_records(path, limit=n)
    return [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in recs.items]


def run_recipe(args, records: list[dict], out: Path, bf16: bool = False) -> dict:
    """The reference recipe, as written: PEFT PromptTuningConfig(TEXT) + Trainer(batch 1, accum 8); `bf16`:
    Trainer's bf16=True."""
    import torch
    from datasets import Dataset
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from softprompt.core.models import resolve_model_path

    path, _ = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=INIT_TEXT,
        num_virtual_tokens=args.num_virtual_tokens,
        tokenizer_name_or_path=path,
    )
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
    training = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
        num_train_epochs=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=args.device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=bf16,
    )
    trainer = Trainer(
        model=model, args=training, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True)
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save_pretrained(str(out / "adapter"))
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "losses": losses,
        "dtype": "bfloat16 (autocast)" if bf16 else "float32",
    }


def run_softprompt(args, records: list[dict], out: Path, dtype: str | None = None) -> dict:
    from softprompt.core.models import load_base
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train
    from softprompt.training.metrics import read_metrics

    base = load_base(args.model, device=args.device, dtype=dtype or args.dtype)
    config = TrainConfig(
        data=records,
        out=str(out / "adapter"),
        model=base,
        init="text",
        init_text=INIT_TEXT,
        num_virtual_tokens=args.num_virtual_tokens,
        lr=5e-5,
        schedule="linear",
        warmup_steps=0,
        optimizer="adamw",
        batch_size=8,
        grad_accum=1,
        epochs=1,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens,
        log_every=1,
        save_every=10**9,
        seed=args.seed,
        progress=False,
        threads=args.threads,
    )
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    rows = read_metrics(out / "adapter" / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    return {
        "tokens": rows[-1]["tokens"],
        "seconds": seconds,
        "losses": losses,
        "loop_tokens_per_s": result.tokens_per_second,
        "dtype": str(base.dtype).replace("torch.", ""),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the process image, so it starts afresh at exec;
    ru_maxrss does not: a child would inherit the benchmark's own peak (it grows as it scores and measures)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def child(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    records = read_records(args.child_data, args.child_records, args.child_kind)
    out = Path(args.out) / f"{args.child_name}-{args.child}"
    out.mkdir(parents=True, exist_ok=True)
    if args.child.startswith("softprompt"):
        result = run_softprompt(args, records, out, SOFTPROMPT_DTYPES[args.child])
    else:
        result = run_recipe(args, records, out, bf16=args.child == "recipe_bf16")
    result["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available() and args.device != "cpu":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    result["adapter"] = str(out / "adapter")
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, which: str, name: str, data: str, kind: str, records: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--child-data",
        data,
        "--child-kind",
        kind,
        "--child-name",
        name,
        "--child-records",
        str(records),
        "--out",
        args.out,
        "--seed",
        str(args.seed),
        "--max-length",
        str(args.max_length),
        "--num-virtual-tokens",
        str(args.num_virtual_tokens),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
    ]
    if args.max_batch_tokens:
        cmd += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{which} run on {data} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def final_losses(args, records: list[dict], adapters: dict[str, str]) -> dict[str, float]:
    """Mean answer-token NLL of each final prompt on the training records, scored by the same code in fp32."""
    from softprompt.core.models import load_base
    from softprompt.core.prompt import SoftPrompt
    from softprompt.data.batching import encode_records
    from softprompt.data.records import load_records
    from softprompt.data.templates import Template
    from softprompt.formats.adapter import load_adapter
    from softprompt.training.scoring import evaluate_loss

    base = load_base(args.model, device="cpu", dtype="float32")
    examples, _, _ = encode_records(load_records(records).items, base.tokenizer, Template(), args.max_length)
    scores = {}
    for name, path in adapters.items():
        prompt = SoftPrompt(load_adapter(path, base).embeddings)
        scores[name] = evaluate_loss(base.model, prompt, examples, 2048, base.tokenizer.pad_token_id)
    init = SoftPrompt.initialise(base, "text", args.num_virtual_tokens, INIT_TEXT)
    scores["initial"] = evaluate_loss(base.model, init, examples, 2048, base.tokenizer.pad_token_id)
    return scores


def gemm_seconds_per_row(weights: list, rows: int, dtype, reps: int = 10) -> float:
    """Seconds per token row of x @ W.T (forward) plus g @ W (activation-gradient backward) over `weights`."""
    import torch

    seconds = 0.0
    for weight in weights:
        weight = weight.to(dtype)
        out_dim, in_dim = weight.shape
        x, g = torch.randn(rows, in_dim, dtype=dtype), torch.randn(rows, out_dim, dtype=dtype)
        for _ in range(2):
            x @ weight.t(), g @ weight
        start = time.perf_counter()
        for _ in range(reps):
            x @ weight.t()
            g @ weight
        seconds += time.perf_counter() - start
    return seconds / reps / rows


def gemm_ceiling(args, records: list[dict], dtypes: list[str]) -> dict:
    """Tokens/s bound from matrix-multiply work alone (see the module docstring), per dtype; measured, not assumed.
    The body's matrices run for every text token, the head's for answer tokens only; the best of several row counts
    is used, not softprompt's budget."""
    import torch

    from softprompt.core.models import load_base
    from softprompt.data.batching import encode_records
    from softprompt.data.records import load_records
    from softprompt.data.templates import Template

    base = load_base(args.model, device="cpu", dtype="float32")
    examples, _, _ = encode_records(load_records(records).items, base.tokenizer, Template(), args.max_length)
    tokens, labels = sum(len(e) for e in examples), sum(e.label_count for e in examples)
    head = base.model.get_output_embeddings().weight
    body = [m.weight for m in base.model.base_model.modules() if isinstance(m, torch.nn.Linear)]
    layers = base.model.config.num_hidden_layers
    layer = body[: len(body) // layers]  # every layer has the same shapes
    work = (4.0 * sum(w.numel() for w in body) * tokens + 4.0 * head.numel() * labels) / tokens
    out = {"mflop_per_token": round(work / 1e6, 1)}
    for name in dtypes:
        dtype = getattr(torch, name)
        per_token = min(
            layers * gemm_seconds_per_row(layer, rows, dtype)
            + labels / tokens * gemm_seconds_per_row([head], rows, dtype)
            for rows in (256, 512, 1024, 2048)
        )
        out[name] = {"gemm_gflops": round(work / per_token / 1e9, 1), "tokens_per_s": round(1 / per_token, 1)}
    return out


def best_of(args, runs: list[str], name: str, data: str, kind: str, count: int) -> dict[str, dict]:
    """Each run --repeats times, interleaved (recipe, softprompt, recipe, ...) so that a change in the machine's load
    hits every run alike; keep each run's fastest repeat (every repeat's tokens/s is kept in `repeats_tokens_per_s`,
    the peak memory is the largest seen)."""
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for which in runs:
            result = spawn(args, which, name, data, kind, count)
            seen = best.get(which)
            speeds = (seen["repeats_tokens_per_s"] if seen else []) + [round(result["tokens_per_s"], 1)]
            peak = max(result["peak_rss_mb"], seen["peak_rss_mb"] if seen else 0)
            if seen is None or result["tokens_per_s"] > seen["tokens_per_s"]:
                best[which] = result
            best[which].update(repeats_tokens_per_s=speeds, peak_rss_mb=peak)
    return best


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        nargs="*",
        default=[],
        metavar="FILE.jsonl",
        help="Alpaca-style JSONL files (records with instruction, optional input, output), e.g. "
        "alpaca_en.jsonl alpaca_zh.jsonl; the first --records of each",
    )
    parser.add_argument(
        "--sst2",
        metavar="FILE.jsonl",
        help="GLUE SST-2 JSONL (sentence, label): a classification set with a fixed instruction",
    )
    parser.add_argument("--records", type=int, default=64, help="first N records of each --data file")
    parser.add_argument("--sst2-records", type=int, default=256, help="first N records of --sst2")
    parser.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="softprompt's --dtype (default: its default, auto); the recipes are fp32 and bf16",
    )
    parser.add_argument("--out", default="/tmp/bench_train", help="scratch folder")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda: where the recipe and softprompt train (the "
        "matrix-product ceiling is measured on the CPU only)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--num-virtual-tokens", type=int, default=13)
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        help="softprompt's token budget per forward (default: softprompt train's default)",
    )
    parser.add_argument(
        "--runs",
        default="recipe,recipe_bf16,softprompt",
        help="which runs, comma-separated, of: " + ", ".join(RUNS) + " (softprompt_fp32 / _bf16: "
        "softprompt with that --dtype, to see what the dtype buys); default: the first three",
    )
    parser.add_argument("--threads", type=int, help="torch threads in every run (default: torch's choice)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each configuration this many times, interleaved, and keep its fastest run",
    )
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--child-data", help=argparse.SUPPRESS)
    parser.add_argument("--child-kind", help=argparse.SUPPRESS)
    parser.add_argument("--child-name", help=argparse.SUPPRESS)
    parser.add_argument("--child-records", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    sets = [(Path(d).stem, d, "alpaca", args.records) for d in args.data]
    if args.sst2:
        sets.append((Path(args.sst2).stem, args.sst2, "sst2", args.sst2_records))
    if not sets:
        parser.error("give --data and/or --sst2")
    runs = [r for r in args.runs.split(",") if r]
    if "softprompt" not in runs or not set(runs) <= set(RUNS):
        parser.error(f"--runs: softprompt and any of {', '.join(RUNS)}")

    from softprompt.training.config import default_batch_tokens
    from softprompt.training.metrics import plot_curves

    per_set, load = {}, [loadavg()]
    for name, data, kind, count in sets:
        records = read_records(data, count, kind)
        results = best_of(args, runs, name, data, kind, count)
        load.append(loadavg())
        ours = results["softprompt"]
        scores = final_losses(args, records, {k: r["adapter"] for k, r in results.items()})
        png = plot_curves(
            {k: r["losses"] for k, r in results.items()},
            Path(args.out) / f"{name}-loss.png",
            f"{name}: train loss, {count} records",
        )
        ceiling = gemm_ceiling(args, records, ["float32", "bfloat16"]) if args.device == "cpu" else None
        entry = {
            "records": count,
            "tokens": ours["tokens"],
            "softprompt_dtype": ours["dtype"],
            "max_batch_tokens": args.max_batch_tokens or default_batch_tokens(args.device.split(":")[0], ours["dtype"]),
            "ceiling": ceiling or "measured on the CPU only",
            "device": args.device,
        }
        for which, r in results.items():
            entry[which] = {
                "tokens_per_s": round(r["tokens_per_s"], 1),
                "peak_rss_mb": round(r["peak_rss_mb"]),
                **({"peak_gpu_mb": r["peak_gpu_mb"]} if "peak_gpu_mb" in r else {}),
                "repeats_tokens_per_s": r["repeats_tokens_per_s"],
                "final_prompt_loss": round(scores[which], 4),
                "mean_train_loss": round(sum(l for _, l in r["losses"]) / len(r["losses"]), 4),
            }
        entry["initial_prompt_loss"] = round(scores["initial"], 4)
        entry["softprompt"]["loop_tokens_per_s"] = round(ours["loop_tokens_per_s"], 1)
        for which in runs:
            if which.startswith("recipe"):
                entry[f"speedup_vs_{which}"] = round(ours["tokens_per_s"] / results[which]["tokens_per_s"], 2)
                entry[f"memory_ratio_vs_{which}"] = round(ours["peak_rss_mb"] / results[which]["peak_rss_mb"], 3)
                entry[f"loss_diff_vs_{which}"] = round(scores["softprompt"] - scores[which], 5)
        for dtype in ("float32", "bfloat16") if ceiling else ():
            if "recipe" in results:
                ceiling[dtype]["x_recipe"] = round(
                    ceiling[dtype]["tokens_per_s"] / results["recipe"]["tokens_per_s"], 2
                )
        if ceiling:
            ceiling["softprompt_fraction"] = round(
                ours["tokens_per_s"]
                / ceiling["bfloat16" if "bfloat16" in ours["dtype"] else "float32"]["tokens_per_s"],
                3,
            )
        entry["loss_curves_png"] = str(png)
        per_set[name] = entry
        print(json.dumps({name: entry}), flush=True)

    def geomean(key):
        values = [e[key] for e in per_set.values() if key in e]
        return round(math.exp(sum(map(math.log, values)) / len(values)), 2) if values else None

    diffs = [abs(e[k]) for e in per_set.values() for k in e if k.startswith("loss_diff_vs_recipe")]
    summary = {
        "speedup": geomean("speedup_vs_recipe"),
        "speedup_vs_bf16_recipe": geomean("speedup_vs_recipe_bf16"),
        "memory_ratio": max(
            (e["memory_ratio_vs_recipe"] for e in per_set.values() if "memory_ratio_vs_recipe" in e), default=None
        ),
        "memory_ratio_vs_bf16_recipe": max(
            (e["memory_ratio_vs_recipe_bf16"] for e in per_set.values() if "memory_ratio_vs_recipe_bf16" in e),
            default=None,
        ),
        "final_loss_max_diff": round(max(diffs), 5) if diffs else None,
        "loss_tolerance": LOSS_TOLERANCE,
        "loss_within_tolerance": all(d <= LOSS_TOLERANCE for d in diffs),
        "loadavg": load,
        "sets": per_set,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
