"""SST-2 quality of prompt tuning on SmolLM2-135M: zero-shot vs trained soft prompts (a small sweep).

Train on the first --train-records records of --data (the GLUE SST-2 train split as JSONL), evaluate accuracy on
the next --eval-records (never trained on). A record is classified by comparing the summed log-probability of each
label word (+ EOS) after the template, with forward.label_nll, the same forward path training uses.

    python benchmarks/sst2_quality.py --data path/to/sst2_train.jsonl --train-records 2000 --eval-records 500
    python benchmarks/sst2_quality.py --data path/to/sst2_train.jsonl --train-records 400 --eval-records 200 \
        --run "adamw-3e-2:optimizer=adamw,lr=0.03" --run "adafactor:optimizer=adafactor,lr=0.3"
    python benchmarks/sst2_quality.py --data path/to/sst2_train.jsonl --adapter runs/sst2 \
        --train-records 2000 --eval-records 500                                          # evaluate only

Each --run is NAME:key=value,... overriding TrainConfig fields. Last line: a JSON object with zero_shot and each
run's accuracy.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

TEMPLATE = "Review: {instruction}\nSentiment: "
WORDS = ["negative", "positive"]


@torch.no_grad()
def accuracy(base, embeddings, rows, template: str, words: list[str], max_tokens: int = 2048) -> float:
    from softprompt.core import forward
    from softprompt.data import batching
    from softprompt.data.templates import Template, encode_example

    tpl = Template(template)
    examples = []
    for row in rows:
        for word in words:
            ids, labels, _ = encode_example(tpl, base.tokenizer, row["sentence"], "", word, 256)
            examples.append(batching.Example(ids, labels, ""))
    lengths = [len(e) for e in examples]
    scores = torch.zeros(len(examples))
    for micro in batching.micro_batches(list(range(len(examples))), lengths, max_tokens):
        batch = batching.collate([examples[i] for i in micro], base.tokenizer.pad_token_id)
        nll, _ = forward.label_nll(base.model, embeddings, batch["input_ids"], batch["attention_mask"], batch["labels"])
        scores[torch.tensor(micro)] = nll.float()
    predicted = scores.view(len(rows), len(words)).argmin(-1)
    gold = torch.tensor([int(r["label"]) for r in rows])
    return (predicted == gold).float().mean().item()


def parse_run(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    overrides = {}
    for part in filter(None, rest.split(",")):
        key, value = part.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE.jsonl",
        help='SST-2 records as JSONL, one {"sentence": ..., "label": 0|1} per line (the GLUE '
        "SST-2 train split); the first --train-records train, the next --eval-records evaluate",
    )
    parser.add_argument("--train-records", type=int, default=2000)
    parser.add_argument("--eval-records", type=int, default=500)
    parser.add_argument("--template", default=TEMPLATE)
    parser.add_argument(
        "--run", action="append", help="NAME:key=value,... (TrainConfig overrides); default: one run with the defaults"
    )
    parser.add_argument("--out", default="/tmp/sst2_runs")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--adapter", help="only evaluate this trained adapter (zero-shot and its accuracy)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from softprompt.core.models import load_base
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train

    rows = [json.loads(line) for _, line in zip(range(args.train_records + args.eval_records), open(args.data))]
    train_rows, eval_rows = rows[: args.train_records], rows[args.train_records :]
    base = load_base(device="cpu", dtype="float32")
    results = {"train_records": len(train_rows), "eval_records": len(eval_rows)}
    start = time.perf_counter()
    results["zero_shot"] = round(accuracy(base, None, eval_rows, args.template, WORDS), 4)
    print(json.dumps({"zero_shot": results["zero_shot"], "seconds": round(time.perf_counter() - start)}), flush=True)
    if args.adapter:
        from softprompt.formats.adapter import load_adapter

        adapter = load_adapter(args.adapter, base)
        results["adapter"] = round(
            accuracy(base, adapter.embeddings, eval_rows, adapter.template.spec, adapter.label_words or WORDS), 4
        )
        print(json.dumps(results))
        return
    for spec in args.run or ["defaults:"]:
        name, overrides = parse_run(spec)
        config = TrainConfig(
            data=train_rows,
            out=f"{args.out}/{name}",
            model=base,
            fields="instruction=sentence",
            label_field="label",
            label_words=WORDS,
            template=args.template,
            progress=False,
            threads=args.threads,
            **overrides,
        )
        start = time.perf_counter()
        result = train(config)
        from softprompt.formats.adapter import load_adapter

        acc = accuracy(base, load_adapter(config.out).embeddings, eval_rows, args.template, WORDS)
        results[name] = {
            "accuracy": round(acc, 4),
            "train_loss": result.train_loss,
            "steps": result.steps,
            "tokens_per_s": round(result.tokens_per_second, 1),
            "seconds": round(time.perf_counter() - start),
            **overrides,
        }
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
