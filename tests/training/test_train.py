"""Training loop: learning, exact resume, atomic checkpoints, NaN stop, early stopping, 2-process data parallel."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import RECORDS, config, torchrun, train_until, trainable_base

from softprompt.cli import build_parser
from softprompt.core import forward
from softprompt.core.prompt import SoftPrompt
from softprompt.data.batching import encode_records
from softprompt.data.records import DataError, load_records
from softprompt.data.templates import Template
from softprompt.formats import checkpoint
from softprompt.formats.adapter import AdapterMetadata, load_adapter
from softprompt.training import loop as train_module
from softprompt.training.config import CPU_BATCH_TOKENS, CPU_BF16_BATCH_TOKENS, GPU_BATCH_TOKENS, default_batch_tokens
from softprompt.training.loop import train
from softprompt.training.scoring import evaluate_loss


@pytest.fixture(scope="module")
def base():
    return trainable_base()


def emb(path) -> torch.Tensor:
    return load_adapter(path).embeddings


def test_loss_decreases_and_outputs_are_written(base, tmp_path):
    cfg = config(tmp_path / "run", base, eval_fraction=0.25, eval_every=4, max_steps=20)
    result = train(cfg)
    held = load_records(RECORDS)
    _, held = __import__("softprompt.data.records", fromlist=["split_holdout"]).split_holdout(held, 0.25, cfg.seed)
    examples, _, _ = encode_records(held.items, base.tokenizer, Template(), 256)
    initial = SoftPrompt.initialise(base, "random", 4, seed=cfg.seed)
    before = evaluate_loss(base.model, initial, examples, 64, base.tokenizer.pad_token_id)
    assert result.best_eval_loss < before - 0.5
    out = Path(result.adapter_dir)
    assert (out / "loss_curve.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "tokens_per_s"} <= set(rows[0]) and rows[-1]["kind"] == "eval"
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(2, 21, 2))
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000016", "step-000020"]
    adapter = load_adapter(out)
    assert adapter.extra["training"]["best_step"] == result.best_step
    assert torch.equal(adapter.embeddings, emb(out / "best"))


def test_the_default_token_budget_follows_the_device(base, tmp_path, capsys):
    assert (default_batch_tokens("cpu"), default_batch_tokens("cuda")) == (CPU_BATCH_TOKENS, GPU_BATCH_TOKENS)
    assert CPU_BATCH_TOKENS < GPU_BATCH_TOKENS
    assert default_batch_tokens("cpu", torch.bfloat16) == CPU_BF16_BATCH_TOKENS == 2 * CPU_BATCH_TOKENS
    assert default_batch_tokens("cpu", torch.float32) == CPU_BATCH_TOKENS
    assert default_batch_tokens("cuda", torch.bfloat16) == GPU_BATCH_TOKENS
    train(config(tmp_path / "default", base, max_batch_tokens=None, max_steps=1))
    assert f"up to {CPU_BATCH_TOKENS} tokens per forward pass" in capsys.readouterr().out
    train(config(tmp_path / "given", base, max_batch_tokens=100, max_steps=1))
    assert "up to 100 tokens per forward pass" in capsys.readouterr().out


def test_kv_and_concat_modes_train_the_same(base, tmp_path):
    a = train(config(tmp_path / "kv", base, max_steps=3))
    b = train(config(tmp_path / "gc", base, max_steps=3, gradient_checkpointing=True))
    assert not base.model.training
    assert torch.allclose(emb(a.adapter_dir), emb(b.adapter_dir), atol=1e-5)


def test_micro_batch_split_changes_nothing_and_the_prompt_runs_once_per_step(base, tmp_path, monkeypatch):
    runs, real = [], forward.prompt_kv
    forwards, real_nll = [], forward.label_nll
    monkeypatch.setattr(forward, "prompt_kv", lambda *a, **k: runs.append(1) or real(*a, **k))
    joint = forward.SharedPrefix._joint  # the virtual tokens together with a step's shared text
    monkeypatch.setattr(forward.SharedPrefix, "_joint", lambda *a, **k: runs.append(1) or joint(*a, **k))
    monkeypatch.setattr(forward, "label_nll", lambda *a, **k: forwards.append(1) or real_nll(*a, **k))
    split = train(config(tmp_path / "split", base, max_steps=3, max_batch_tokens=40))
    assert len(forwards) >= 9  # 3 steps of 4 records, at least 3 micro-batches each ...
    assert len(runs) == 3  # ... and one run of the virtual tokens per step
    whole = train(config(tmp_path / "whole", base, max_steps=3, max_batch_tokens=4096))
    assert torch.allclose(emb(split.adapter_dir), emb(whole.adapter_dir), atol=1e-5)


class Crash(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_equals_uninterrupted_run(base, tmp_path, monkeypatch, optimizer):
    # 16 records / 4 per step = 4 steps per epoch: the run crosses epochs and is interrupted mid-step 7.
    whole = train(config(tmp_path / "whole", base, optimizer=optimizer))
    train_until(config(tmp_path / "cut", base, optimizer=optimizer), monkeypatch, 6)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "cut")] == ["step-000004"]
    resumed = train(config(tmp_path / "cut", base, optimizer=optimizer, resume=str(tmp_path / "cut")))
    assert resumed.steps == whole.steps == 12
    assert torch.equal(emb(whole.adapter_dir), emb(resumed.adapter_dir))
    losses = [
        [r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())]
        for d in ("whole", "cut")
    ]
    assert losses[0] == losses[1]


def test_resume_refuses_a_different_run(base, tmp_path):
    train(config(tmp_path / "a", base, max_steps=4))
    with pytest.raises(ValueError, match="made with step_records=4, this run has 8"):
        train(config(tmp_path / "a", base, batch_size=8, resume=str(tmp_path / "a")))
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        train(config(tmp_path / "b", base, resume=str(tmp_path / "nothing")))


def test_interrupted_checkpoint_write_leaves_the_previous_one(base, tmp_path, monkeypatch):
    train(config(tmp_path / "run", base, max_steps=4))
    before = emb(tmp_path / "run" / "checkpoints" / "step-000004")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    prompt = SoftPrompt.initialise(base, "random", 4)
    optim = torch.optim.AdamW([prompt.embeddings])
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path / "run", 8, prompt.embeddings, base, AdapterMetadata(), optim, {})
    found = checkpoint.list_checkpoints(tmp_path / "run")
    assert [p.name for p in found] == ["step-000004"]
    assert torch.equal(emb(found[-1]), before)


KILL_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from train_helpers import RECORDS, trainable_base
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train
train(TrainConfig(data=RECORDS * 50, out={out!r}, model=trainable_base(), num_virtual_tokens=4, init="random",
                  lr=0.1, batch_size=4, max_steps=10000, save_every=1, keep_checkpoints=2, progress=False))
"""


def test_kill_9_leaves_a_usable_checkpoint(base, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parents[1]), out=str(out)))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(checkpoint.list_checkpoints(out)) < 2:
            time.sleep(0.2)
        time.sleep(0.37)  # land somewhere inside a step or a checkpoint write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    found = checkpoint.list_checkpoints(out)
    assert found, "no checkpoint written before the kill"
    latest = checkpoint.resolve_resume(out)
    tensors, state = checkpoint.load_checkpoint(latest)
    assert state["step"] == int(latest.name.split("-")[1]) and "rng.torch" in tensors
    assert torch.isfinite(emb(latest)).all()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(base, tmp_path, monkeypatch):
    calls, real = {"n": 0}, forward.label_nll

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        nll, counts = real(*args, **kwargs)
        return (nll * float("nan"), counts) if calls["n"] == 6 else (nll, counts)

    monkeypatch.setattr(forward, "label_nll", poisoned)
    out = tmp_path / "run"
    with pytest.raises(
        RuntimeError,
        match=r"training stopped at step 6: the loss or gradient is not finite \(loss "
        r"nan\); the last good checkpoint is .*step-000004",
    ):
        train(config(out, base, max_batch_tokens=4096))  # one forward per step
    assert torch.isfinite(emb(out / "checkpoints" / "step-000004")).all()
    assert not (out / "adapter_model.safetensors").exists()


def test_early_stopping_keeps_the_best(base, tmp_path, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7])
    monkeypatch.setattr(train_module, "evaluate_loss", lambda *a, **k: next(scripted))
    out = tmp_path / "run"
    result = train(
        config(
            out,
            base,
            eval_fraction=0.25,
            eval_every=2,
            early_stopping=2,
            max_steps=100,
            save_every=2,
            keep_checkpoints=10,
        )
    )
    assert (result.stopped, result.steps, result.best_step, result.best_eval_loss) == ("early_stopping", 8, 4, 2.0)
    assert torch.equal(emb(out), emb(out / "best"))
    assert torch.equal(emb(out), emb(out / "checkpoints" / "step-000004"))
    assert not torch.equal(emb(out), emb(out / "checkpoints" / "step-000008"))
    monkeypatch.undo()
    last = train(config(tmp_path / "last", base, eval_fraction=0.25, max_steps=4, final="last", save_every=2))
    assert torch.equal(emb(last.adapter_dir), emb(Path(last.adapter_dir) / "checkpoints" / "step-000004"))


def test_bad_input_errors_name_the_record(base, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "answer": "d"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'output'"):
        train(config(tmp_path / "o", base, data=str(data)))
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "' + "x" * 60 + '", "output": "d"}\n')
    with pytest.raises(
        DataError, match=r"d.jsonl:2: the prompt alone is 80 tokens, which fills max_length=50; raise --max-length"
    ):
        train(config(tmp_path / "o", base, data=str(data), max_length=50))
    result = train(config(tmp_path / "o", base, data=str(data), max_length=50, skip_bad=True, max_steps=1))
    assert len(result.skipped) == 1 and result.train_records == 1
    with pytest.raises(
        ValueError, match=r"--label-field needs label words: pass --label-words \(the word for label 0, 1, ...\)"
    ):
        train(config(tmp_path / "o", base, label_field="label"))


def test_label_field_and_user_template_are_saved(base, tmp_path):
    rows = [{"sentence": f"film {i}", "label": i % 2} for i in range(8)]
    template = "Review: {instruction}\nSentiment: "
    result = train(
        config(
            tmp_path / "o",
            base,
            data=rows,
            fields="instruction=sentence",
            label_field="label",
            label_words="negative,positive",
            template=template,
            init="labels",
            max_steps=2,
        )
    )
    adapter = load_adapter(result.adapter_dir)
    assert adapter.template.spec == template and adapter.label_words == ["negative", "positive"]


def test_cli_help_documents_every_flag_and_runs(base, tmp_path, tiny_dir):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["train"]
    for action in sub._actions:
        assert action.help, f"{action.option_strings} has no help"
    for flag in [
        "--data",
        "--out",
        "--model",
        "--num-virtual-tokens",
        "--init",
        "--init-text",
        "--label-words",
        "--lr",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--grad-accum",
        "--max-length",
        "--eval-data",
        "--resume",
        "--seed",
    ]:
        assert flag in sub.format_help()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    args = parser.parse_args(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tiny_dir),
            "--max-steps",
            "2",
            "--num-virtual-tokens",
            "3",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert args.func(args) == 0
    assert load_adapter(tmp_path / "o").num_virtual_tokens == 3


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from train_helpers import RECORDS, trainable_base
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train
train(TrainConfig(data=RECORDS, out={out!r}, model=trainable_base(), num_virtual_tokens=4, init="random", lr=0.3,
                  batch_size={batch}, max_steps=6, progress=False, max_batch_tokens=64, threads=1))
"""


def test_two_processes_match_one_at_the_same_global_batch(base, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parents[1]), out=str(tmp_path / "two"), batch=2))
    run = torchrun(script)
    assert "2 process(es), 4 records/step" in run.stdout
    one = train(config(tmp_path / "one", base, batch_size=4, max_steps=6, lr=0.3))
    assert torch.allclose(emb(one.adapter_dir), emb(tmp_path / "two"), atol=1e-5)
    assert not torch.equal(emb(one.adapter_dir), SoftPrompt.initialise(base, "random", 4).embeddings.detach())


def test_tensorboard_is_optional(tmp_path):
    from softprompt.training.metrics import MetricsLogger

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
            MetricsLogger(tmp_path, tensorboard=True)
    else:
        logger = MetricsLogger(tmp_path, tensorboard=True)
        logger.log("train", 1, loss=1.0)
        logger.close()
        assert any((tmp_path / "tensorboard").iterdir())


def test_max_length_defaults_to_what_the_records_need(base, tmp_path, capsys):
    """Without --max-length, records of any length up to the context (less the virtual tokens) and 8 token budgets
    train uncut; past that cap the truncation report and the prompt-fills error are as with an explicit length."""
    long = [{"instruction": "y" * 400, "output": "abab"}, {"instruction": "z", "output": "cdcd"}]
    result = train(config(tmp_path / "a", base, data=long, max_steps=1, max_batch_tokens=512))
    assert result.truncated == 0 and result.train_records == 2
    assert "2 records (0 truncated to 508 tokens, the longest 425)" in capsys.readouterr().out  # 512 - 4 virtual
    cut = [{"instruction": "y" * 290, "output": "ab" * 20}, {"instruction": "z", "output": "cdcd"}]
    result = train(config(tmp_path / "b", base, data=cut, max_steps=1, max_batch_tokens=40))
    assert result.truncated == 1
    assert "2 records (1 truncated to 320 tokens, the longest 320)" in capsys.readouterr().out  # 8 x 40
    with pytest.raises(
        DataError,
        match=r"<records>: record 0: the prompt alone is 420 tokens, which fills "
        r"max_length=320; raise --max-length",
    ):
        train(config(tmp_path / "c", base, data=long, max_steps=1, max_batch_tokens=40))


def test_classification_steps_are_class_balanced(base, tmp_path, monkeypatch):
    calls = []
    real = train_module.batching.balanced_plan
    monkeypatch.setattr(
        train_module.batching,
        "balanced_plan",
        lambda classes, *args: calls.append(list(classes)) or real(classes, *args),
    )
    rows = [{"instruction": f"q {i}", "input": "", "output": "yes" if i % 4 else "no"} for i in range(24)]
    train(config(tmp_path / "a", base, data=rows, max_steps=2))  # auto label words: yes, no
    assert calls == [[1 if i % 4 else 0 for i in range(24)]]  # label words in order of appearance: no, yes
    train(config(tmp_path / "b", base, data=rows, max_steps=2, balance_classes=False))
    train(config(tmp_path / "c", base, max_steps=2))  # free-form answers: length-grouped steps
    assert len(calls) == 1


def test_auto_dtype_trains_a_model_folder_in_fp32_on_a_cpu_where_inference_picks_bf16(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    from softprompt.core import models

    monkeypatch.setattr(models, "cpu_bf16_speedup", lambda: 2.0)  # as on the AMD EPYC, where auto infers in bf16
    loaded = []
    real_load = train_module.load_base
    monkeypatch.setattr(train_module, "load_base", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    train(config(tmp_path / "auto", str(tiny_dir), dtype="auto", max_steps=1))
    assert loaded[-1].dtype == torch.float32
    assert "train: --dtype auto trains in float32 on a CPU" in capsys.readouterr().out
    train(config(tmp_path / "bf16", str(tiny_dir), dtype="bfloat16", max_steps=1))
    assert loaded[-1].dtype == torch.bfloat16
    assert "trains in float32" not in capsys.readouterr().out
