"""Does bf16 training move quality? softprompt trained in float32 and in bfloat16 on held-out splits, side by side.

Every trained prompt is scored in float32 by the same code, so only the training dtype differs:
- SST-2 (--sst2, GLUE JSONL): --sst2-train records train, --sst2-held-out held out (sst2_common.sst2_split, a fixed
  instruction and the review as input), rank-classification accuracy; softprompt train's defaults;
- Alpaca (--alpaca, instruction / input / output JSONL): a seeded sample of short records (prompt + answer at most
  --max-chars characters), --alpaca-train to train and --alpaca-held-out held out, mean answer-token loss;
  softprompt train's defaults;
- the demo (--demo): `run_demo` with the base model loaded in each dtype (its own accuracy is measured in that
  dtype; the trained adapter is also re-scored in float32).
Each part runs for every --seeds value (training seed) in every --dtypes dtype, so the seed-to-seed spread in one
dtype can be set against the float32-bfloat16 difference at the same seed.

    python benchmarks/bf16_quality.py --sst2 path/to/sst2_train.jsonl --alpaca path/to/alpaca_en.jsonl --demo

One JSON line per trained prompt as it finishes (and per part, unless --no-baselines, one for the untrained
baseline: SST-2 zero-shot accuracy, Alpaca loss of a vocab-initialised prompt); last line: a JSON object with, per
part, the values per seed and dtype, min / mean / max per dtype, the mean bf16 - fp32 difference over the seeds that
have both, the largest |bf16 - fp32| at equal seed and the seed-to-seed spread within a dtype.

--gradients (no training) asks where a bf16 training step loses precision: on one batch of each part's training
records (16 SST-2, 8 Alpaca), the loss and the prompt's gradient of the bf16 training forward against the fp32 one
(cosine, relative error), as it runs and with the LM head and log-softmax in fp32 (an fp32 copy of the head on the
bf16 final hidden state) and with the final norm in fp32 too; at a vocab-initialised prompt or the adapters given
with --gradient-prompt.

A sweep can run one training per call (--seeds 3 --dtypes bfloat16 --sst2 ... --record runs.jsonl --no-baselines)
and be summarised afterwards from the recorded lines (--merge runs.jsonl), which gives the same last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sst2_common import accuracy, encode_choices, sst2_split  # noqa: E402

DTYPES = ("float32", "bfloat16")


def alpaca_split(path: str, train: int, held_out: int, max_chars: int, seed: int = 0):
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    rows = [
        {"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
        for r in rows
        if r["output"].strip() and len(r["instruction"]) + len(r.get("input") or "") + len(r["output"]) <= max_chars
    ]
    random.Random(seed).shuffle(rows)
    return rows[:train], rows[train : train + held_out]


def summarise(values: dict) -> dict:
    """values[seed][dtype] -> per dtype min / mean / max and the seed spread (max - min) over its seeds; over the
    seeds that have both dtypes, the bf16 - fp32 differences, their mean and the largest |difference|."""
    seeds = sorted(values)
    per = {d: [values[s][d] for s in seeds if d in values[s]] for d in DTYPES}
    per = {d: v for d, v in per.items() if v}
    paired = [s for s in seeds if all(d in values[s] for d in DTYPES)]
    diffs = [values[s]["bfloat16"] - values[s]["float32"] for s in paired]
    return {
        "values": {s: values[s] for s in seeds},
        "min": {d: round(min(v), 4) for d, v in per.items()},
        "mean": {d: round(sum(v) / len(v), 4) for d, v in per.items()},
        "max": {d: round(max(v), 4) for d, v in per.items()},
        "seed_spread": {d: round(max(v) - min(v), 4) for d, v in per.items()},
        "diff_bf16_fp32": {s: round(x, 4) for s, x in zip(paired, diffs)},
        "mean_diff_bf16_fp32": round(sum(diffs) / len(diffs), 4) if diffs else None,
        "max_abs_diff_bf16_fp32": round(max(abs(x) for x in diffs), 4) if diffs else None,
    }


VALUE_KEYS = {"sst2": "accuracy", "alpaca": "held_out_loss"}  # the figure of each part's per-run lines


def fp32_norm(norm):
    """An RMSNorm computed in fp32 on its (bf16) input, returning fp32 (what --gradients puts in place of the final
    norm)."""
    import torch

    class Fp32Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.eps = norm.weight.detach().float(), norm.variance_epsilon

        def forward(self, x):
            x = x.float()
            return self.weight * (x * (x.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt())

    return Fp32Norm()


GRADIENT_VARIANTS = ("bf16", "bf16_head_fp32", "bf16_norm_head_fp32")


def gradient_check(bases: dict, batch: dict, prompt) -> dict:
    """The bf16 training forward's summed answer NLL / label and its gradient with respect to the prompt, per
    GRADIENT_VARIANTS, against the fp32 forward's."""
    import torch
    import torch.nn.functional as F

    from softprompt.core import forward

    head32 = bases["float32"].model.get_output_embeddings().weight.detach()

    def loss_grad(model, variant: str):
        tensor = prompt.detach().clone().requires_grad_()
        body, norm = model.base_model, model.base_model.norm
        if variant == "bf16_norm_head_fp32":
            body.norm = fp32_norm(norm)
        try:
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            _, chosen, (targets,) = forward._labelled(model, tensor, ids, mask, labels, "kv", None)
            if variant in ("bf16", "fp32"):
                nll = forward.head_nll(model, chosen, targets)
            else:
                nll = F.cross_entropy(F.linear(chosen.float(), head32), targets, reduction="none")
            loss = nll.sum() / len(targets)
            loss.backward()
        finally:
            body.norm = norm
        return loss.item(), tensor.grad.detach().float().flatten()

    ref_loss, ref_grad = loss_grad(bases["float32"].model, "fp32")
    out = {"fp32_loss": round(ref_loss, 5), "labels": int((batch["labels"] != -100).sum())}
    for variant in GRADIENT_VARIANTS:
        loss, grad = loss_grad(bases["bfloat16"].model, variant)
        out[variant] = {
            "loss_diff": round(loss - ref_loss, 5),
            "grad_cosine": round(F.cosine_similarity(grad, ref_grad, dim=0).item(), 5),
            "grad_rel_err": round(((grad - ref_grad).norm() / ref_grad.norm()).item(), 4),
        }
    return out


def read_rows(paths: list[str]) -> list[dict]:
    """The per-run lines of --record files, in order."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            rows += [json.loads(line) for line in handle if line.strip()]
    return rows


def summary(rows: list[dict]) -> dict:
    """The last line of a run from its per-run lines (a later line for the same part, seed and dtype replaces an
    earlier one)."""
    values: dict = {}
    demo: dict = {"own": {}, "fp32": {}}
    extra: dict = {}
    for row in rows:
        part = row.get("part")
        if "baseline" in row:
            extra.setdefault(part, {}).update({**row.get("sizes", {}), row["baseline"]: row["value"]})
        elif part in VALUE_KEYS:
            values.setdefault(part, {}).setdefault(row["seed"], {})[row["dtype"]] = row[VALUE_KEYS[part]]
            extra.setdefault(part, {}).update(row.get("sizes", {}))
        elif part == "demo":
            demo["own"].setdefault(row["seed"], {})[row["dtype"]] = row["accuracy_own_dtype"]
            demo["fp32"].setdefault(row["seed"], {})[row["dtype"]] = row["accuracy_fp32_scored"]
    seeds = sorted({s for part in values.values() for s in part} | set(demo["own"]))
    parts = {}
    gradients = [r for r in rows if r.get("part") == "gradients"]
    if gradients:
        parts["gradients"] = gradients
    for part, name in (("sst2", "sst2_accuracy"), ("alpaca", "alpaca_held_out_loss")):
        if part in values:
            parts[name] = {**extra.get(part, {}), **summarise(values[part])}
    if demo["own"]:
        parts["demo_accuracy"] = {
            "scored_in_training_dtype": summarise(demo["own"]),
            "scored_fp32": summarise(demo["fp32"]),
        }
    return {"seeds": seeds, **parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sst2", metavar="FILE.jsonl")
    parser.add_argument("--sst2-train", type=int, default=1000)
    parser.add_argument("--sst2-held-out", type=int, default=300)
    parser.add_argument("--alpaca", metavar="FILE.jsonl")
    parser.add_argument("--alpaca-train", type=int, default=256)
    parser.add_argument("--alpaca-held-out", type=int, default=100)
    parser.add_argument("--max-chars", type=int, default=400)
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated (default 0,1)")
    parser.add_argument(
        "--dtypes", default=",".join(DTYPES), help="training dtypes, comma-separated (default float32,bfloat16)"
    )
    parser.add_argument(
        "--gradients", action="store_true", help="train nothing: the bf16 step's loss and gradient against fp32's"
    )
    parser.add_argument(
        "--gradient-prompt", nargs="+", metavar="ADAPTER_DIR", help="--gradients at these adapters' prompts"
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip the zero-shot / untrained-prompt figures")
    parser.add_argument("--record", metavar="FILE.jsonl", help="also append every per-run line to this file")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="FILE.jsonl",
        help="train nothing: summarise the per-run lines of these --record files into the last line",
    )
    parser.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.merge:
        print(json.dumps(summary(read_rows(args.merge))))
        return
    if not (args.sst2 or args.alpaca or args.demo) or (args.gradients and args.demo):
        parser.error("give --sst2, --alpaca and/or --demo (--gradients: --sst2 and/or --alpaca)")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes: one or more of {', '.join(DTYPES)}")

    import torch

    from softprompt.core.models import load_base
    from softprompt.core.prompt import SoftPrompt
    from softprompt.data.batching import encode_records
    from softprompt.data.records import load_records
    from softprompt.data.templates import Template
    from softprompt.formats.adapter import load_adapter
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train
    from softprompt.training.scoring import evaluate_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="bf16-quality-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.gradients:
        dtypes = list(DTYPES)
    bases = {d: load_base(args.model, device="cpu", dtype=d) for d in DTYPES if d in dtypes or d == "float32"}
    scorer = bases["float32"]
    rows: list[dict] = []
    record = open(args.record, "a", encoding="utf-8") if args.record else None

    def emit(row: dict) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if record is not None:
            record.write(line + "\n")
            record.flush()

    def trained(name: str, records: list[dict], dtype: str, seed: int):
        start = time.perf_counter()
        result = train(
            TrainConfig(
                data=records,
                out=str(out / f"{name}-{dtype}-{seed}"),
                model=bases[dtype],
                seed=seed,
                progress=False,
                threads=args.threads,
            )
        )
        return load_adapter(result.adapter_dir, scorer), result, time.perf_counter() - start

    def run_row(part: str, seed: int, dtype: str, key: str, value: float, result, seconds: float, sizes: dict):
        emit(
            {
                "part": part,
                "seed": seed,
                "dtype": dtype,
                key: round(value, 4),
                "train_loss": result.train_loss,
                "seconds": round(seconds),
                "tokens_per_s": round(result.tokens_per_second, 1),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
                "sizes": sizes,
            }
        )

    if args.gradients:
        from softprompt.data.batching import collate

        prompts = [(str(p), load_adapter(p, scorer).embeddings) for p in args.gradient_prompt or []]
        prompts = prompts or [("vocab init, 20 tokens", SoftPrompt.initialise(scorer, "vocab", 20, seed=0).embeddings)]
        for part, path in (("sst2", args.sst2), ("alpaca", args.alpaca)):
            if path is None:
                continue
            if part == "sst2":
                records = sst2_split(path, args.sst2_train, args.sst2_held_out)[0][:16]
            else:
                records = alpaca_split(path, args.alpaca_train, args.alpaca_held_out, args.max_chars)[0][:8]
            encoded, _, _ = encode_records(load_records(records).items, scorer.tokenizer, Template(), 512)
            batch = collate(encoded, scorer.tokenizer.pad_token_id)
            for name, tensor in prompts:
                emit({"part": "gradients", "data": part, "records": len(records), "prompt": name,
                      **gradient_check(bases, batch, tensor)})  # fmt: skip
        print(json.dumps(summary(rows)))
        return

    if args.sst2:
        train_records, held_out = sst2_split(args.sst2, args.sst2_train, args.sst2_held_out)
        examples = encode_choices(scorer, held_out, ["negative", "positive"])
        sizes = {"train": len(train_records), "held_out": len(held_out)}
        if not args.no_baselines:
            zero_shot = accuracy(scorer, None, held_out, examples)
            emit({"part": "sst2", "baseline": "zero_shot", "value": round(zero_shot, 4), "sizes": sizes})
        for seed in seeds:
            for dtype in dtypes:
                adapter, result, seconds = trained("sst2", train_records, dtype, seed)
                acc = accuracy(scorer, adapter.virtual(), held_out, examples)
                run_row("sst2", seed, dtype, "accuracy", acc, result, seconds, sizes)

    if args.alpaca:
        train_records, held_out = alpaca_split(args.alpaca, args.alpaca_train, args.alpaca_held_out, args.max_chars)
        examples, _, _ = encode_records(load_records(held_out).items, scorer.tokenizer, Template(), 256)
        pad = scorer.tokenizer.pad_token_id
        sizes = {"train": len(train_records), "held_out": len(held_out)}
        if not args.no_baselines:
            initial = SoftPrompt.initialise(scorer, "vocab", 20, seed=seeds[0])
            loss = evaluate_loss(scorer.model, initial, examples, 4096, pad)
            emit({"part": "alpaca", "baseline": "initial_prompt", "value": round(loss, 4), "sizes": sizes})
        for seed in seeds:
            for dtype in dtypes:
                adapter, result, seconds = trained("alpaca", train_records, dtype, seed)
                loss = evaluate_loss(scorer.model, SoftPrompt(adapter.embeddings), examples, 4096, pad)
                run_row("alpaca", seed, dtype, "held_out_loss", loss, result, seconds, sizes)

    if args.demo:
        from softprompt import evaluate, run_demo
        from softprompt.demo import task as demo_task

        for seed in seeds:
            for dtype in dtypes:
                folder = out / f"demo-{dtype}-{seed}"
                start = time.perf_counter()
                metrics = run_demo(folder, bases[dtype], print_fn=lambda *a, **k: None, seed=seed, progress=False)
                after = metrics["after"]["accuracy"]
                eval_file = next(folder.rglob("eval.jsonl"))
                again = evaluate(
                    str(eval_file),
                    scorer,
                    [str(folder)],
                    choices=demo_task.CHOICES,
                    template=demo_task.TEMPLATE,
                    max_new_tokens=0,
                    progress=False,
                )["results"][0]
                emit(
                    {
                        "part": "demo",
                        "seed": seed,
                        "dtype": dtype,
                        "accuracy_own_dtype": after,
                        "accuracy_fp32_scored": round(again["accuracy"], 4),
                        "seconds": round(time.perf_counter() - start),
                        "loadavg": [round(x, 2) for x in os.getloadavg()],
                    }
                )
    if record is not None:
        record.close()
    print(json.dumps(summary(rows)))


if __name__ == "__main__":
    main()
