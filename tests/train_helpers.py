"""Shared by the training tests: the records, a tiny Llama a soft prompt can move, a small TrainConfig, and a run
killed mid-way (for the resume tests), and a torchrun launch of 2 CPU processes."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from softprompt.core.attention import use_grouped_sdpa
from softprompt.core.mlp import use_lean_mlp
from softprompt.core.models import FrozenModel, freeze
from softprompt.formats import checkpoint
from softprompt.training import loop as train_module
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train

RECORDS = [
    {"instruction": f"question {i}", "input": "x" * (i % 4), "output": "abab" if i % 2 else "cdcd"} for i in range(16)
]


def trainable_base(seed: int = 0) -> FrozenModel:
    """A tiny Llama whose weights are large enough (init std 0.2) that a soft prompt can move its outputs."""
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    assert use_grouped_sdpa(model)  # the attention and MLP load_base gives a model
    assert use_lean_mlp(model) == config.num_hidden_layers
    return FrozenModel(freeze(model), tok, "tiny-llama-trainable")


def config(out, base, **overrides) -> TrainConfig:
    values = dict(
        data=RECORDS,
        out=str(out),
        model=base,
        num_virtual_tokens=4,
        init="random",
        lr=0.3,
        batch_size=4,
        max_steps=12,
        save_every=4,
        log_every=2,
        progress=False,
        max_batch_tokens=64,
    )
    values.update(overrides)
    return TrainConfig(**values)


class Crash(Exception):
    pass


def train_until(cfg: TrainConfig, monkeypatch, step: int) -> None:
    """Run `cfg` and kill it at the start of 0-based step `step` (the learning rate of that step is asked for
    first), as a crash would; its checkpoints stay in cfg.out."""
    real = train_module.lr_at

    def crashing(at, *args):
        if at == step:
            raise Crash()
        return real(at, *args)

    monkeypatch.setattr(train_module, "lr_at", crashing)
    with pytest.raises(Crash):
        train(cfg)
    monkeypatch.setattr(train_module, "lr_at", real)


def interrupted(base, out, monkeypatch, at_step=10):
    """A run killed at the start of step `at_step` (checkpoints at steps 4 and 8 are kept)."""
    train_until(config(out, base), monkeypatch, at_step - 1)
    found = checkpoint.list_checkpoints(out)
    assert [p.name for p in found] == ["step-000004", "step-000008"]
    return found


def free_port() -> str:
    """A port no one listens on now (a fixed one collides with another run of the suite on the machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def torchrun(script: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `processes` single-threaded CPU processes (gloo); it must succeed."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            free_port(),
            str(script),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run
