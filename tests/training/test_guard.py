"""The loss-spike guard: a spiking step is not taken, the lowest-loss prompt comes back, the LR halves; exact resume."""

import json

import pytest
import torch
from train_helpers import config, train_until, trainable_base

from softprompt.formats.adapter import load_adapter
from softprompt.training import guard
from softprompt.training import loop as train_module
from softprompt.training.loop import train
from softprompt.training.optim import lr_at

SPIKE_AT = 7  # 1-based step whose measured loss is made to spike (after the step-4 checkpoint)


@pytest.fixture(scope="module")
def base():
    return trainable_base()


def test_spike_bound():
    assert guard.spike_bound([1.0, 1.0, 1.0]) is None  # too few steps to judge
    assert guard.spike_bound([0.5, 0.4, 0.6, 0.5]) == 0.5 + 2.0  # small losses: 2 nats over the median
    assert guard.spike_bound([4.0, 3.0, 5.0, 4.0]) == 4.0 + 8.0  # large ones: twice the median over it
    assert guard.remember(list(range(8)), 9) == [1, 2, 3, 4, 5, 6, 7, 9]


def spiking(monkeypatch, at: int = SPIKE_AT, factor: float = 50.0) -> list[dict]:
    """Make 1-based step `at` measure a loss `factor` times its real one; records the prompt each step starts from."""
    real, seen = train_module._accumulate_gradients, []

    def accumulate(run, mine, label_total):
        seen.append(guard.snapshot(run.prompt))
        nll = real(run, mine, label_total)
        return nll * factor if run.done + 1 == at else nll

    monkeypatch.setattr(train_module, "_accumulate_gradients", accumulate)
    return seen


def rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_spike_restores_the_lowest_loss_prompt_and_halves_the_lr(base, tmp_path, monkeypatch, capsys):
    seen = spiking(monkeypatch)
    train(config(tmp_path / "run", base, log_every=1))
    metrics = rows(tmp_path / "run")
    losses = {r["step"]: r["loss"] for r in metrics if r["kind"] == "train"}
    (back,) = [r for r in metrics if r["kind"] == "rollback"]
    low = min(range(1, SPIKE_AT), key=losses.get)  # the train rows log every measured loss, the spike's too
    assert (back["step"], back["restored_step"], back["lr_scale"]) == (SPIKE_AT, low, 0.5)
    recent = [losses[s] for s in range(1, SPIKE_AT)][-guard.WINDOW :]
    assert back["loss"] == losses[SPIKE_AT] and back["bound"] == guard.spike_bound(recent)
    # the step after the spike starts from the prompt the lowest loss was measured at: the spike's update was dropped
    for name, value in seen[low - 1].items():
        assert torch.equal(seen[SPIKE_AT][name], value)
    lrs = {r["step"]: r["lr"] for r in metrics if r["kind"] == "train"}
    assert lrs[SPIKE_AT + 1] == pytest.approx(0.5 * lr_at(SPIKE_AT, 12, 0.3, 0, "cosine"))
    assert lrs[SPIKE_AT - 1] == pytest.approx(lr_at(SPIKE_AT - 2, 12, 0.3, 0, "cosine"))
    out = capsys.readouterr().out
    assert f"train: loss spike at step {SPIKE_AT} ({back['loss']:.3f}, over {back['bound']:.3f}" in out
    assert f"restored the prompt of step {low} (loss {losses[low]:.3f}) and halved the learning rate (x0.5" in out


def test_no_rollback_takes_every_step(base, tmp_path, monkeypatch):
    seen = spiking(monkeypatch)
    train(config(tmp_path / "off", base, log_every=1, rollback=False))
    assert not [r for r in rows(tmp_path / "off") if r["kind"] == "rollback"]
    assert not torch.equal(seen[SPIKE_AT]["embeddings"], seen[SPIKE_AT - 1]["embeddings"])


def test_a_run_without_spikes_is_unchanged_by_the_guard(base, tmp_path):
    on = train(config(tmp_path / "on", base))
    off = train(config(tmp_path / "off", base, rollback=False))
    assert not [r for r in rows(tmp_path / "on") if r["kind"] == "rollback"]
    assert torch.equal(load_adapter(on.adapter_dir).embeddings, load_adapter(off.adapter_dir).embeddings)


def test_resume_rolls_back_as_the_uninterrupted_run(base, tmp_path, monkeypatch):
    spiking(monkeypatch)
    whole = train(config(tmp_path / "whole", base))
    train_until(config(tmp_path / "cut", base), monkeypatch, 6)  # killed after the step-4 checkpoint
    resumed = train(config(tmp_path / "cut", base, resume=str(tmp_path / "cut")))
    assert [r for r in rows(tmp_path / "cut") if r["kind"] == "rollback"] == [
        r for r in rows(tmp_path / "whole") if r["kind"] == "rollback"
    ]
    assert torch.equal(load_adapter(whole.adapter_dir).embeddings, load_adapter(resumed.adapter_dir).embeddings)
