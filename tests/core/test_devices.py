"""Training and scoring on the test device (SOFTPROMPT_TEST_DEVICE: cpu here and in CI, cuda in scripts/gpu_check.sh):
the loss falls, and the adapter the device trained gives on the CPU the logits the device computed."""

import json

import pytest
import torch
from engine_helpers import peaked_base
from helpers import TEST_DEVICE, text_logits

from softprompt.core.models import BF16_MIN_SPEEDUP, cpu_bf16_speedup, resolve_dtype
from softprompt.formats.adapter import load_adapter
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train

RECORDS = [{"instruction": f"Say {w}", "output": w} for w in ["north", "south", "east", "west"] * 4]


@pytest.fixture(scope="module")
def on_device():
    base = peaked_base(seed=1)  # large weights: a soft prompt moves its outputs
    base.model.to(TEST_DEVICE)
    return base


def test_training_on_the_device_lowers_the_loss_and_the_adapter_reloads_on_the_cpu(on_device, tmp_path):
    out = tmp_path / "run"
    train(
        TrainConfig(
            data=RECORDS,
            out=str(out),
            model=on_device,
            num_virtual_tokens=4,
            init="random",
            lr=0.3,
            batch_size=4,
            max_steps=12,
            log_every=1,
            save_every=100,
            progress=False,
            dtype="float32",
        )
    )
    losses = [
        row["loss"]
        for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if row.get("kind") == "train" and "loss" in row
    ]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]) - 0.3, losses
    prompt = load_adapter(out).embeddings
    ids = torch.tensor([on_device.tokenizer.encode("Say east")])
    mask = torch.ones_like(ids)
    on_gpu = text_logits(on_device.model, prompt.to(TEST_DEVICE), ids.to(TEST_DEVICE), mask.to(TEST_DEVICE)).cpu()
    cpu = peaked_base(seed=1)
    assert torch.allclose(text_logits(cpu.model, prompt, ids, mask), on_gpu, atol=1e-4)


def test_auto_dtype_on_the_device():
    """auto: bf16 on a GPU that has it; on a CPU, bf16 only where its products measured faster (models.py)."""
    device = torch.device(TEST_DEVICE)
    if device.type == "cuda":
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    else:
        want = torch.bfloat16 if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else torch.float32
    assert resolve_dtype("auto", device) == want
