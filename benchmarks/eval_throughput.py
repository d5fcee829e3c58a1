"""Rank-classification throughput: `softprompt eval` vs the same scoring done the straightforward way, in one run.

The task: TREC question classification, 6 coarse classes as words (ABBR/DESC/ENTY/HUM/LOC/NUM -> abbreviation,
description, entity, human, location, number), with a fixed instruction (the question as input) and the default
"Human: ... Assistant: " template. Each record is scored once per choice: the summed NLL of the choice's tokens
(+ EOS) after the prompt; the lowest wins.

- softprompt: `evaluate(..., choices=..., max_new_tokens=0)` (what `softprompt eval --choices` runs), which runs each
  record's prompt once (and the instruction all records share once) and scores the 6 choices from its keys/values;
- the straightforward way: Hugging Face model + PEFT prompt-tuning adapter (PeftModel.from_pretrained), one padded
  sequence per (record, choice), --batch-size sequences per forward, logits -> log-softmax -> the choice tokens.

Both use the same adapter (PEFT PromptTuning, TEXT init, 13 virtual tokens; --adapter: a trained one), the same
token ids and the same dtype, and must pick the same choices. They alternate --repeats times; the ratio of each
pair is reported with its spread.

    python benchmarks/eval_throughput.py --data path/to/trec_train.jsonl --records 240

Last line: a JSON object with `speedup` (softprompt records/s / straightforward records/s, the median pair),
`speedups` (every pair), `agree` (same choices) and `max_score_diff`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sst2_common import instruction_records  # noqa: E402

INSTRUCTION = (
    "Which kind of answer does this question ask for: abbreviation, description, entity, human, location or number?"
)
CLASSES = {
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}
INIT_TEXT = "The following is a conversation between a person and a robot."


def read_trec(path: str, n: int) -> list[dict]:
    return instruction_records(path, n, INSTRUCTION, "text", lambda row: CLASSES[row["coarse_label"]])


def make_adapter(model_path: str, folder: str, num_virtual_tokens: int) -> str:
    """A PEFT prompt-tuning adapter (TEXT init), as the reference recipe starts."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=INIT_TEXT,
        num_virtual_tokens=num_virtual_tokens,
        tokenizer_name_or_path=model_path,
    )
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def straightforward(peft_model, tokenizer, records: list[dict], choices: list[str], batch_size: int):
    """One full sequence per (record, choice): PEFT's forward (virtual tokens re-run in every row, logits at every
    position), summed NLL of the choice tokens; returns (scores [records, choices], seconds)."""
    import torch

    from softprompt.data.templates import Template, encode_example

    start = time.perf_counter()
    template, pad = Template(), tokenizer.pad_token_id
    pairs = [
        encode_example(template, tokenizer, r["instruction"], r["input"], c, 2048)[:2] for r in records for c in choices
    ]
    scores = torch.zeros(len(pairs), dtype=torch.float64)
    with torch.no_grad():
        for b in range(0, len(pairs), batch_size):
            part = pairs[b : b + batch_size]
            width = max(len(ids) for ids, _ in part)
            ids = torch.full((len(part), width), pad)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            labels = torch.full((len(part), width), -100)
            for row, (i, l) in enumerate(part):
                ids[row, : len(i)], mask[row, : len(i)], labels[row, : len(l)] = torch.tensor(i), 1, torch.tensor(l)
            logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, -width:].float()
            logp = logits[:, :-1].log_softmax(-1)
            target = labels[:, 1:]
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != -100)
            scores[b : b + len(part)] = -picked.sum(1).double()
    return scores.view(len(records), len(choices)), time.perf_counter() - start


def ours(base, adapter_dir: str, records: list[dict], choices: list[str], batch_size: int):
    """softprompt eval's rank classification; returns (per-record chosen index, loss, seconds)."""
    from softprompt import evaluate

    start = time.perf_counter()
    report = evaluate(
        records, base, [adapter_dir], choices=choices, max_new_tokens=0, batch_size=batch_size, progress=False
    )
    seconds = time.perf_counter() - start
    result = report["results"][0]
    return [choices.index(e["choice"]) for e in result["examples"]], result, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE.jsonl",
        help="TREC JSONL (text, coarse_label), e.g. trec_train.jsonl; the first --records",
    )
    parser.add_argument("--records", type=int, default=240)
    parser.add_argument("--adapter", help="a prompt-tuning adapter folder (default: a fresh PEFT TEXT-init one)")
    parser.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", help="both sides' weights dtype (float32 or bfloat16)")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="rows per forward for both (softprompt eval's default --batch-size)"
    )
    parser.add_argument("--num-virtual-tokens", type=int, default=13)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.core.models import load_base, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    records = read_trec(args.data, args.records)
    choices = list(CLASSES.values())
    path, _ = resolve_model_path(args.model)
    scratch = tempfile.mkdtemp(prefix="eval-bench-")
    adapter = args.adapter or make_adapter(path, os.path.join(scratch, "adapter"), args.num_virtual_tokens)
    dtype = getattr(torch, args.dtype)
    base = load_base(args.model, device="cpu", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    ours(base, adapter, records[:8], choices, args.batch_size)  # warm-up, both sides
    straightforward(peft_model, tokenizer, records[:8], choices, args.batch_size)
    pairs, agree, result, scores = [], True, None, None
    for repeat in range(args.repeats):
        load = [round(x, 2) for x in os.getloadavg()]
        picked, result, our_seconds = ours(base, adapter, records, choices, args.batch_size)
        scores, their_seconds = straightforward(peft_model, tokenizer, records, choices, args.batch_size)
        same = picked == scores.argmin(1).tolist()
        agree = agree and same
        pair = {
            "softprompt_records_per_s": round(len(records) / our_seconds, 2),
            "straightforward_records_per_s": round(len(records) / their_seconds, 2),
            "speedup": round(their_seconds / our_seconds, 2),
            "loadavg": load,
            "agree": same,
        }
        pairs.append(pair)
        print(json.dumps({"repeat": repeat, **pair}), flush=True)
    max_diff = score_difference(base, adapter, records, choices, scores, args.batch_size)
    speedups = sorted(p["speedup"] for p in pairs)
    print(
        json.dumps(
            {
                "speedup": statistics.median(speedups),
                "speedups": speedups,
                "agree": agree,
                "max_score_diff": max_diff,
                "records": len(records),
                "choices": len(choices),
                "dtype": args.dtype,
                "accuracy": result["accuracy"],
                "pairs": pairs,
            }
        )
    )


def score_difference(base, adapter_dir: str, records: list[dict], choices: list[str], scores, batch_size: int) -> float:
    """Largest |softprompt's score - the straightforward score| over every (record, choice) (summed NLL, nats)."""
    from softprompt.data import batching
    from softprompt.data.templates import Template, encode_example
    from softprompt.formats.adapter import load_adapter
    from softprompt.training.scoring import nll_per_group

    examples = [
        batching.Example(*encode_example(Template(), base.tokenizer, r["instruction"], r["input"], c, 2048)[:2], "")
        for r in records
        for c in choices
    ]
    nll, _ = nll_per_group(
        base.model,
        load_adapter(adapter_dir, base).virtual(),
        examples,
        len(choices),
        base.tokenizer.pad_token_id,
        4096,
        batch_size,
    )
    return round(float((nll.view_as(scores) - scores).abs().max()), 6)


if __name__ == "__main__":
    main()
