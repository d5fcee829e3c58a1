"""Compare the prompt-learning methods (zero-shot, prompt, prefix, ptuning) on splits made by make_splits.py.

Every run is the `softprompt` command line (printed before it runs): `softprompt train` on SPLITS/train.jsonl with
the same records, steps and batch size, then `softprompt eval` on SPLITS/<--split>.jsonl (classification: the
accuracy of ranking the label words, which train saves with the adapter; otherwise the held-out answer loss).

    python benchmarks/methods_compare.py --splits splits/sst2 --out runs/sst2 --split test \\
        --run zero-shot: --run prompt:--method,prompt --run prefix:--method,prefix --run ptuning:--method,ptuning
    python benchmarks/methods_compare.py --splits splits/sst2 --out runs/sweep --split dev \\
        --run prefix-lr0.1:--method,prefix,--lr,0.1 --run prefix-direct:--method,prefix,--no-prefix-projection

A --run is NAME:FLAGS with FLAGS comma-separated extra `softprompt train` arguments; an empty FLAGS list means the
base model alone (zero-shot). Prints one markdown row per run and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def softprompt_cmd() -> list[str]:
    exe = shutil.which("softprompt") or str(Path(sys.executable).with_name("softprompt"))
    return [exe] if Path(exe).exists() else [sys.executable, "-m", "softprompt"]


def run(argv: list[str]) -> float:
    print("$ " + shlex.join(["softprompt"] + argv[len(softprompt_cmd()) :]), flush=True)
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", required=True, help="folder with train/dev/test.jsonl and template.txt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="test", choices=["dev", "test"])
    parser.add_argument("--run", action="append", required=True, metavar="NAME:FLAGS")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--reuse", action="store_true", help="evaluate an adapter already in OUT/NAME instead of training it again"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        help="passed to train and eval (pinned: the 'auto' default may pick bf16 on CPUs with native bf16)",
    )
    args = parser.parse_args(argv)

    splits, out = Path(args.splits), Path(args.out)
    template = (splits / "template.txt").read_text(encoding="utf-8")
    eval_file = splits / f"{args.split}.jsonl"
    outputs = {json.loads(line)["output"] for line in (splits / "train.jsonl").read_text().splitlines() if line}
    choices = sorted(outputs) if len(outputs) <= 10 else None
    sp = softprompt_cmd()
    dtype = ["--dtype", args.dtype]
    threads = (["--threads", str(args.threads)] if args.threads else []) + dtype
    results = []
    for spec in args.run:
        name, _, flags = spec.partition(":")
        flags = [f for f in flags.split(",") if f]
        folder = out / name
        row = {"run": name, "flags": flags}
        if flags and args.reuse and (folder / "adapter_model.safetensors").is_file():
            print(f"reusing the adapter in {folder}", flush=True)
            models = ["--adapter", str(folder)]
            row["adapter_bytes"] = (folder / "adapter_model.safetensors").stat().st_size
        elif flags:
            train_s = run(
                sp
                + [
                    "train",
                    "--data",
                    str(splits / "train.jsonl"),
                    "--out",
                    str(folder),
                    "--template",
                    template,
                    "--max-steps",
                    str(args.steps),
                    "--batch-size",
                    str(args.batch_size),
                    "--max-length",
                    str(args.max_length),
                    "--save-every",
                    str(args.steps),
                    "--log-every",
                    "10",
                    "--no-progress",
                    "--seed",
                    "0",
                    *threads,
                    *flags,
                ]
            )
            row["train_seconds"] = round(train_s, 1)
            row["adapter_bytes"] = (folder / "adapter_model.safetensors").stat().st_size
            models = ["--adapter", str(folder)]
        else:
            folder.mkdir(parents=True, exist_ok=True)
            models = ["--template", template] + (["--choices", ",".join(choices)] if choices else [])
        report_path = folder / f"eval-{args.split}.json"
        run(
            sp
            + [
                "eval",
                "--data",
                str(eval_file),
                *models,
                *dtype,
                "--max-new-tokens",
                "0",
                "--max-length",
                str(args.max_length + 64),
                "--no-progress",
                "--json",
                str(report_path),
                "--examples",
                "0",
            ]
        )
        report = json.loads(report_path.read_text())
        result = report["results"][0]
        row.update(loss=round(result["loss"], 4), accuracy=result.get("accuracy"), n=result["n"])
        results.append(row)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| run | accuracy | answer loss | train seconds | adapter bytes |\n|---|---:|---:|---:|---:|")
    for r in results:
        acc = f"{r['accuracy']:.1%}" if r.get("accuracy") is not None else "-"
        print(
            f"| {r['run']} | {acc} | {r['loss']:.4f} | {r.get('train_seconds', '-')} | {r.get('adapter_bytes', '-')} |"
        )


if __name__ == "__main__":
    main()
