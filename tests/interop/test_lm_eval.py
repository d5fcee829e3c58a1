"""lm-evaluation-harness end to end: its `local-completions` model against `softprompt serve` with an adapter.

Two tasks defined here on JSON files this test writes (nothing is downloaded): a log-likelihood multiple-choice task
and a `generate_until` task, both with the adapter's own template. lm-eval sends token ids (tokenized with the model
folder's tokenizer), asks for `echo` + `logprobs` for log-likelihoods, and its accuracy must equal `softprompt eval`'s
rank-classification accuracy on the same records (and its greedy generations equal eval's).

Why they agree by construction (docs/lm-eval.md): softprompt eval scores each choice's tokens *and the EOS after
them*, so the lm-eval task appends the EOS token to each choice; lm-eval moves the template's trailing space from the
context into the continuation, which adds the same log p(" ") to every choice of a record and so never changes the
ranking; and the tiny model's character-level tokenizer splits context and continuation the same way either
tokenization.
"""

import json

import pytest
from helpers import save_tiny
from train_helpers import trainable_base

from softprompt import create_app, evaluate
from softprompt.serve import BackgroundServer
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the `test` extra")

RECORDS = [
    ("I loved this film", "positive"),
    ("Terrible acting", "negative"),
    ("A joy to watch", "positive"),
    ("Boring and long", "negative"),
    ("Great fun", "positive"),
    ("Awful plot", "negative"),
    ("Best of the year", "positive"),
    ("I walked out", "negative"),
    ("Wonderful cast", "positive"),
    ("Dull", "negative"),
    ("Moving and funny", "positive"),
    ("A waste of time", "negative"),
]
CHOICES = ["positive", "negative"]
GEN_TOKENS = 10

TASKS = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
doc_to_text: "Human: {{{{instruction}}}}\\n\\nAssistant: "
target_delimiter: ""
{kind}
metadata:
  version: 1.0
"""
MULTIPLE_CHOICE = """\
output_type: multiple_choice
doc_to_target: label
doc_to_choice: {choices}
metric_list:
  - metric: acc
"""
GENERATE = """\
output_type: generate_until
doc_to_target: output
generation_kwargs:
  until: ["<eos>"]
  max_gen_toks: {tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
"""


def test_lm_eval_local_completions_matches_softprompt_eval(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # A tiny model whose outputs a soft prompt can move, and an adapter trained on a few of the records, so that the
    # predictions differ from record to record (a constant prediction would make equal accuracies meaningless).
    tiny = trainable_base()
    model_dir = save_tiny(tiny, tmp_path / "model")
    records = [{"instruction": text, "output": label, "label": CHOICES.index(label)} for text, label in RECORDS]
    adapters = tmp_path / "adapters"
    train(
        TrainConfig(
            data=records[:8],
            out=str(adapters / "sst"),
            model=tiny,
            num_virtual_tokens=4,
            init="random",
            lr=0.3,
            batch_size=4,
            max_steps=16,
            progress=False,
            max_batch_tokens=256,
            seed=0,
        )
    )
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    eos = tiny.tokenizer.eos_token
    kinds = {
        "sp_choice": MULTIPLE_CHOICE.format(choices=json.dumps([c + eos for c in CHOICES])),
        "sp_generate": GENERATE.format(tokens=GEN_TOKENS),
    }
    for name, kind in kinds.items():
        (tasks / f"{name}.yaml").write_text(TASKS.format(name=name, data=data, cache=tmp_path / "hf-cache", kind=kind))

    reference = evaluate(
        str(data), model=tiny, adapters=[adapters / "sst"], choices=CHOICES, max_new_tokens=GEN_TOKENS
    )["results"][0]
    generated = evaluate(str(data), model=tiny, adapters=[adapters / "sst"], max_new_tokens=GEN_TOKENS, fields=None)[
        "results"
    ][0]

    with BackgroundServer(create_app(tiny, adapters)) as server:
        out = simple_evaluate(
            model="local-completions",
            model_args={
                "model": "sst",
                "base_url": server.url + "/v1/completions",
                "tokenizer": str(model_dir),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "batch_size": 4,
                "max_retries": 1,
                "max_length": 512,
            },
            tasks=list(kinds),
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            log_samples=True,
            num_fewshot=0,
            bootstrap_iters=0,
        )

    accuracy = out["results"]["sp_choice"]["acc,none"]
    assert accuracy == pytest.approx(reference["accuracy"])
    samples = sorted(out["samples"]["sp_choice"], key=lambda s: s["doc_id"])
    lm_eval_choice = [CHOICES[max(range(len(CHOICES)), key=lambda i: s["filtered_resps"][i][0])] for s in samples]
    assert lm_eval_choice == [e["choice"] for e in reference["examples"]]  # record by record, not just the mean
    assert len(set(lm_eval_choice)) == 2, "the predictions should differ between records"

    samples = sorted(out["samples"]["sp_generate"], key=lambda s: s["doc_id"])
    texts = [s["resps"][0][0] for s in samples]
    assert [t.strip() for t in texts] == [e["generation"] for e in generated["examples"]]
    assert out["results"]["sp_generate"]["exact_match,none"] == pytest.approx(generated["exact_match"])
    print(
        f"lm-eval acc {accuracy:.4f} = softprompt eval accuracy {reference['accuracy']:.4f}; lm-eval exact_match "
        f"{out['results']['sp_generate']['exact_match,none']:.4f} = softprompt eval exact_match "
        f"{generated['exact_match']:.4f}"
    )
