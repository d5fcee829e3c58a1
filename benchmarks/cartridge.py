"""Cartridges trained by self-study against the whole document in context, on the default model (SmolLM2-135M).

The document: benchmarks/data/GPL-2.txt, the GNU GPL version 2 as Debian ships it (/usr/share/common-licenses/GPL-2;
its own notice permits verbatim copies), 4,055 tokens with the default tokenizer. The questions:
benchmarks/data/gpl2_questions.jsonl, 36 questions about facts the license states with short reference answers,
written for this benchmark and never seen by the self-study (which writes its own conversations); a separate dev set,
benchmarks/data/gpl2_dev_questions.jsonl (22 questions about other facts of the license), is the one settings are
chosen on (`--questions DEV HELD_OUT` scores both in one run, each on its own).

1. `softprompt train --method cartridge --corpus GPL-2.txt` (the library call, training.loop.train) once per cartridge
   size (--sizes, default 128 and 500 virtual tokens: 500 is the largest size within 1/8 of the document's 4,055
   tokens); the synthetic conversations are generated once, by the first run, and copied into the others' folders,
   which reuse them (same settings), so every cartridge learns from the same data.
2. Answer-token loss (mean nats per reference-answer token, the answer + EOS after the template's prompt) of the 36
   questions with no context, with each cartridge, and with the whole document in front of the question (the same
   layout the self-study teacher had: document, blank line, prompt); gap_closed = (none - cartridge) / (none - full).
3. KV bytes each condition holds in front of the question (positions x layers x 2 x kv heads x head dim x the model
   dtype's bytes) and time to first token through the engine (the median of --ttft-questions questions, one greedy
   token, after a warm-up): the cartridge's keys/values are cached when it is loaded, the document is prefilled with
   the question, as a prompt that holds it is.

Usage: python benchmarks/cartridge.py [--model M] [--dtype auto] [--sizes 128 500] [--chunk-tokens 512]
       [--conversations 8] [--max-tokens 64] [--steps 40] [--batch-size 4] [--lr X] [--out DIR]
       [--data-from OUT/cartridge-128/selfstudy.safetensors] [--questions FILE ...]
The last line printed is a JSON object: the losses, gap_closed, kv_fraction and ttft_speedup per cartridge size,
the settings, the machine's load and the times taken.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import softprompt  # noqa: E402, F401  (before torch: OpenMP's wait policy, softprompt/runtime.py)

# isort: split

import torch  # noqa: E402

from softprompt.core import forward  # noqa: E402
from softprompt.core.models import load_base  # noqa: E402
from softprompt.data.batching import Example  # noqa: E402
from softprompt.data.templates import Template, encode_text  # noqa: E402
from softprompt.formats.adapter import load_adapter  # noqa: E402
from softprompt.inference.batch import GenerationRequest  # noqa: E402
from softprompt.inference.engine import Engine  # noqa: E402
from softprompt.training import selfstudy  # noqa: E402
from softprompt.training.config import TrainConfig  # noqa: E402
from softprompt.training.loop import train  # noqa: E402
from softprompt.training.scoring import nll_per_example  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
DOCUMENT, QUESTIONS = DATA / "GPL-2.txt", DATA / "gpl2_questions.jsonl"
DEV_QUESTIONS = DATA / "gpl2_dev_questions.jsonl"


def examples(base, template: Template, questions: list[dict], context: list[int]) -> list[Example]:
    """Each question's prompt (after `context`, unscored) and its reference answer + EOS (scored)."""
    out = []
    for n, q in enumerate(questions):
        prompt = context + encode_text(base.tokenizer, template.prompt(q["question"], "", base.tokenizer))
        answer = encode_text(base.tokenizer, template.target(q["answer"], base.tokenizer))
        out.append(Example(prompt + answer, [-100] * len(prompt) + answer, f"question {n + 1}"))
    return out


def answer_loss(base, prompt, items: list[Example]) -> float:
    """Mean nats per answer token (the one no-grad scoring loop, training/scoring.py)."""
    nll, counts = nll_per_example(base.model, prompt, items, base.tokenizer.pad_token_id, max_tokens=8192)
    return float(nll.sum() / counts.sum())


def read_questions(path: Path) -> list[dict]:
    """A JSONL file of {"question", "answer"} objects."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score(base, template: Template, questions: list[dict], context: list[int], adapters: dict) -> dict[str, float]:
    """Answer loss of `questions` with no context, with each cartridge and with the whole document in front."""
    plain = examples(base, template, questions, [])
    losses = {"none": answer_loss(base, None, plain)}
    for size, adapter in adapters.items():
        losses[f"cartridge_{size}"] = answer_loss(base, forward.Virtual(adapter.embeddings, "cartridge"), plain)
    losses["full_document"] = answer_loss(base, None, examples(base, template, questions, context))
    return losses


def gap_closed(losses: dict[str, float], name: str) -> float | None:
    """(none - cartridge) / (none - full document)."""
    gap = losses["none"] - losses["full_document"]
    return round((losses["none"] - losses[name]) / gap, 3) if gap > 0 else None


def ttft(engine: Engine, prompts: list[list[int]], adapter: str | None) -> float:
    """Median seconds to the first token of each prompt alone, after one warm-up request."""
    engine.generate([GenerationRequest(prompts[0], adapter=adapter, max_new_tokens=1)])
    times = []
    for ids in prompts:
        tick = time.perf_counter()
        engine.generate([GenerationRequest(ids, adapter=adapter, max_new_tokens=1)])
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def train_cartridges(args, base, out: Path) -> tuple[dict[int, Path], float, dict]:
    """One self-study run per size; the first writes the conversations, the others reuse its file."""
    folders, seconds = {}, {}
    first = Path(args.data_from).parent if args.data_from else None
    for size in args.sizes:
        folder = out / f"cartridge-{size}"
        if first is not None:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(first / selfstudy.DATA_FILE, folder / selfstudy.DATA_FILE)
        tick = time.perf_counter()
        result = train(
            TrainConfig(
                corpus=str(DOCUMENT),
                out=str(folder),
                model=base,
                method="cartridge",
                num_virtual_tokens=size,
                chunk_tokens=args.chunk_tokens,
                selfstudy_conversations=args.conversations,
                selfstudy_max_tokens=args.max_tokens,
                top_k=args.top_k,
                max_steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                save_every=args.steps,
                log_every=max(1, args.steps // 10),
                seed=args.seed,
                progress=args.progress,
            )
        )
        seconds[size] = round(time.perf_counter() - tick, 1)
        print(f"cartridge {size}: {result.steps} steps, final distillation loss {result.train_loss:.4f}", flush=True)
        folders[size], first = folder, first or folder
    return folders, seconds, {"train_loss_last": result.train_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 500])
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--conversations", type=int, default=8, help="per chunk")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-questions", type=int, default=3)
    parser.add_argument(
        "--questions",
        nargs="+",
        default=[str(QUESTIONS)],
        help="question files (JSONL, question + answer) to score, each on its own; the first one is the headline "
        f"set (default: the 36 held-out questions; {DEV_QUESTIONS.name} is the dev set settings are chosen on)",
    )
    parser.add_argument("--out", default=None, help="keep the cartridges and their data here (default: a temp dir)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument(
        "--data-from",
        default=None,
        help="a selfstudy.safetensors made with the same settings (an earlier run's): reused, nothing generated",
    )
    args = parser.parse_args()

    started = time.perf_counter()
    base = load_base(args.model, dtype=args.dtype)
    template = Template("human-assistant")
    question_sets = {Path(f).stem: read_questions(Path(f)) for f in args.questions}
    questions = next(iter(question_sets.values()))
    document = DOCUMENT.read_text(encoding="utf-8")
    context = selfstudy.context_ids(base, encode_text(base.tokenizer, document))
    per_token = forward.prefix_width(base.model) * torch.finfo(base.dtype).bits // 8
    print(
        f"document {len(context)} tokens (with the separator), {len(questions)} questions, dtype {base.dtype}, "
        f"{per_token:,} KV bytes per position",
        flush=True,
    )

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cartridge-bench-"))
    tick = time.perf_counter()
    folders, train_seconds, _ = train_cartridges(args, base, out)
    selfstudy_seconds = round(time.perf_counter() - tick, 1)

    adapters = {size: load_adapter(folder, base) for size, folder in folders.items()}
    scored = {name: score(base, template, qs, context, adapters) for name, qs in question_sets.items()}
    losses = next(iter(scored.values()))
    plain = examples(base, template, questions, [])
    engine = Engine(base, {f"c{size}": adapter for size, adapter in adapters.items()}, default_template=template)
    prompts = [ex.ids[: ex.labels.count(-100)] for ex in plain]  # the prompt: every unscored token
    prompts = prompts[: args.ttft_questions]
    times = {"none": ttft(engine, prompts, None)}
    for size in adapters:
        times[f"cartridge_{size}"] = ttft(engine, prompts, f"c{size}")
    times["full_document"] = ttft(engine, [context + p for p in prompts], None)
    kv = {"none": 0, "full_document": len(context) * per_token}
    kv.update({f"cartridge_{size}": size * per_token for size in adapters})

    by_size = {}
    for size in adapters:
        name = f"cartridge_{size}"
        by_size[size] = {
            "loss": round(losses[name], 4),
            "gap_closed": gap_closed(losses, name),
            "gap_closed_by_set": {set_name: gap_closed(set_losses, name) for set_name, set_losses in scored.items()},
            "kv_fraction": round(kv[name] / kv["full_document"], 4),
            "ttft_speedup": round(times["full_document"] / times[name], 2),
            "train_seconds": train_seconds[size],
        }
    print(f"{'condition':<16} {'loss':>8} {'KV bytes':>14} {'TTFT ms':>9}")
    for name in losses:
        print(f"{name:<16} {losses[name]:>8.4f} {kv[name]:>14,} {times[name] * 1000:>9.1f}")
    for size, row in by_size.items():
        print(
            f"cartridge {size}: closes {row['gap_closed_by_set']} of the gap at {row['kv_fraction']} of the document's KV, "
            f"{row['ttft_speedup']}x lower time to first token"
        )
    data = selfstudy.load(folders[args.sizes[0]] / selfstudy.DATA_FILE)
    print(
        json.dumps(
            {
                "losses": {k: round(v, 4) for k, v in losses.items()},
                "losses_by_set": {n: {k: round(v, 4) for k, v in ls.items()} for n, ls in scored.items()},
                "cartridges": by_size,
                "kv_bytes": kv,
                "ttft_ms": {k: round(v * 1000, 1) for k, v in times.items()},
                "document_tokens": len(context),
                "questions": {name: len(qs) for name, qs in question_sets.items()},
                "conversations": len(data.examples),
                "dtype": str(base.dtype).removeprefix("torch."),
                "settings": {k: v for k, v in vars(args).items() if k not in ("out", "progress")},
                "selfstudy_and_training_s": selfstudy_seconds,
                "total_s": round(time.perf_counter() - started, 1),
                "threads": torch.get_num_threads(),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
                "machine": _cpu(),
            }
        )
    )


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return sys.platform


if __name__ == "__main__":
    main()
