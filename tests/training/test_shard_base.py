"""--shard-base: the frozen base sharded over 2 real CPU processes (torchrun, gloo, FSDP2) trains the same adapter as
one process holding the whole base, while each process holds half of the decoder layers' weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny, tiny_tokenizer
from train_helpers import torchrun
from transformers import LlamaConfig, LlamaForCausalLM

from softprompt.cli import build_parser
from softprompt.core.attention import use_grouped_sdpa
from softprompt.core.mlp import use_lean_mlp
from softprompt.core.models import FrozenModel, freeze
from softprompt.formats.adapter import load_adapter
from softprompt.training.config import TrainConfig
from softprompt.training.distributed import weight_bytes
from softprompt.training.loop import train

LAYERS = 4

# Inputs of varied length, so that under a tight token budget the two processes of a step get different numbers of
# micro-batches (the sharded loop must then pad the shorter one's passes); all share the template's start.
RECORDS = [
    {"instruction": f"question {i}", "input": "x" * (i * 7 % 23), "output": "abab" if i % 2 else "cdcd"}
    for i in range(16)
]
# one long record: the process scoring it needs 2 batches, the other 1
EVAL = [{"instruction": f"held {i}", "input": "y" * n, "output": "abab"} for i, n in enumerate([30, 0, 2, 4, 6])]


def sharded_llama(seed: int = 0) -> FrozenModel:
    """A tiny Llama whose decoder layers hold most of its weights (4 layers beside a ~100-row tied embedding)."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    assert use_grouped_sdpa(model) and use_lean_mlp(model) == LAYERS  # the attention and MLP load_base gives
    return FrozenModel(freeze(model), tok, "tiny-llama-sharded")


def settings(out, **overrides) -> dict:
    values = dict(
        data=RECORDS,
        eval_data=EVAL,
        out=str(out),
        num_virtual_tokens=4,
        init="random",
        lr=0.3,
        max_steps=4,
        eval_every=2,
        save_every=2,
        max_batch_tokens=56,  # steps 2 and 4: one process packs its 2 records in 1 micro-batch, the other in 2
        progress=False,
        threads=1,
    )
    return {**values, **overrides}


METHODS = ("prompt", "prefix")

SCRIPT = """
import json, sys
sys.path[:0] = [{tests!r}, {tests!r} + '/training']
import torch.distributed as dist
from test_shard_base import METHODS, settings, sharded_llama
from softprompt.training import distributed
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train

calls = []  # (this process's micro-batch count, the count every process runs), in training and evaluation
agree = distributed.agree_max
distributed.agree_max = lambda value, device: calls.append((value, agree(value, device))) or calls[-1][1]
reports = {{}}
for method in METHODS:  # one launch for both methods (a launch costs seconds)
    calls.clear()
    base = sharded_llama()
    out = {out!r} + "-" + method
    result = train(TrainConfig(**settings(out, model=base, batch_size=2, shard_base=True, method=method)))
    layers = distributed.decoder_layers(base.model)
    base.model.base_model.reshard()  # the root (final norm) stays gathered after a forward; the layers never do
    local = {{"model": distributed.weight_bytes(base.model), "layers": distributed.weight_bytes(layers)}}
    reports[method] = {{"local": local, "calls": list(calls), "eval": result.best_eval_loss}}
# the command line, with a model folder (loaded on the CPU, then only the shards move to the device) and
# activation checkpointing (sharded layers recomputed in the backward pass)
build_parser = __import__("softprompt.cli", fromlist=["build_parser"]).build_parser
args = build_parser().parse_args(["train", "--shard-base", "--batch-size", "2", *{cli!r}])
assert args.func(args) == 0
with open({report!r} + str(dist.get_rank()), "w") as f:
    json.dump(reports, f)
"""


def cli_flags(tmp: Path, out: Path) -> list[str]:
    """`softprompt train` flags for the settings() run on a saved model folder (batch size apart)."""
    data, eval_data = tmp / "train.jsonl", tmp / "eval.jsonl"
    for path, records in ((data, RECORDS), (eval_data, EVAL[:1])):  # 1 eval record, 2 processes: both score it
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    if not (tmp / "model").exists():
        save_tiny(sharded_llama(), tmp / "model")
    flags = "--num-virtual-tokens 4 --init random --lr 0.3 --max-steps 4 --eval-every 2 --save-every 2"
    flags += " --max-batch-tokens 56 --no-progress --threads 1 --dtype float32 --gradient-checkpointing"
    return ["--data", str(data), "--eval-data", str(eval_data), "--out", str(out), "--model", str(tmp / "model")] + (
        flags.split()
    )


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Train each method with --shard-base on 2 torchrun processes: (output prefix, each process's report: its
    shard bytes, its micro-batch counts, its eval loss)."""
    tmp = tmp_path_factory.mktemp("sharded")
    report = str(tmp / "rank")
    script = tmp / "sharded.py"
    cli = cli_flags(tmp, tmp / "two-cli")
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parents[1]), out=str(tmp / "two"), report=report, cli=cli))
    run = torchrun(script)
    assert run.stdout.count("base sharded over 2 processes (FSDP2, 4 decoder layers)") == len(METHODS) + 1
    return tmp, [json.loads(Path(report + str(rank)).read_text()) for rank in range(2)]


@pytest.mark.parametrize("method", METHODS)
def test_sharded_base_trains_the_adapter_one_process_trains(two_processes, tmp_path, method):
    tmp, reports = two_processes
    prefix = tmp / "two"
    ranks = [r[method] for r in reports]
    whole = sharded_llama()
    one = train(TrainConfig(**settings(tmp_path / "one", model=whole, batch_size=4, method=method)))
    two = load_adapter(f"{prefix}-{method}").embeddings
    assert torch.allclose(load_adapter(one.adapter_dir).embeddings, two, atol=1e-5)
    assert not torch.allclose(two, load_adapter(f"{prefix}-{method}/checkpoints/step-000002").embeddings, atol=1e-3)
    assert ranks[0]["eval"] == pytest.approx(one.best_eval_loss, abs=1e-5) == ranks[1]["eval"]

    # each process holds half of every decoder layer and the whole (tied) embedding
    full, layers = weight_bytes(whole.model), weight_bytes(whole.model.model.layers)
    embedding = whole.model.get_input_embeddings().weight
    assert full == layers + embedding.nbytes + whole.model.model.norm.weight.nbytes
    for rank in ranks:
        assert rank["local"]["layers"] == layers // 2
        assert rank["local"]["model"] == embedding.nbytes + (full - embedding.nbytes) // 2
        assert 0.5 < rank["local"]["model"] / full < 0.6
    # in some steps the two processes had different micro-batch counts, and both ran the larger count
    counts = list(zip(ranks[0]["calls"], ranks[1]["calls"]))
    assert len(counts) == 6 and all(a[1] == b[1] == max(a[0], b[0]) for a, b in counts)
    steps, evaluations = [counts[i] for i in (0, 1, 3, 4)], [counts[i] for i in (2, 5)]  # eval after steps 2 and 4
    assert any(a[0] != b[0] for a, b in steps) and all(a[0] != b[0] for a, b in evaluations)


def test_sharded_base_with_gradient_checkpointing_from_the_command_line(two_processes, tmp_path):
    tmp, _ = two_processes
    args = build_parser().parse_args(["train", "--batch-size", "4", *cli_flags(tmp, tmp_path / "one")])
    assert args.func(args) == 0
    two = load_adapter(tmp / "two-cli").embeddings
    assert torch.allclose(load_adapter(tmp_path / "one").embeddings, two, atol=1e-5)
    summaries = [
        json.loads((folder / "softprompt.json").read_text())["training"]
        for folder in (tmp_path / "one", tmp / "two-cli")
    ]
    assert summaries[0]["best_eval_loss"] == pytest.approx(summaries[1]["best_eval_loss"], abs=1e-5)
    assert not torch.allclose(two, load_adapter(tmp / "two-cli" / "checkpoints" / "step-000002").embeddings, atol=1e-3)


def test_one_process_trains_unsharded_and_says_so(tmp_path, capsys):
    base = sharded_llama()
    result = train(TrainConfig(**settings(tmp_path / "o", model=base, batch_size=4, shard_base=True, max_steps=1)))
    assert "--shard-base: one process, so the base is not sharded" in capsys.readouterr().out
    assert load_adapter(result.adapter_dir).num_virtual_tokens == 4
