"""What a killed run leaves behind is cleaned at the next start, safely; adapter configs with impossible sizes are
refused."""

import json
import os

import pytest
from train_helpers import config, trainable_base

from softprompt.formats import checkpoint
from softprompt.formats.adapter import AdapterError, load_adapter, save_adapter
from softprompt.training.loop import train


def hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def test_a_kill_during_the_first_checkpoint_leaves_nothing_at_the_next_start(tmp_path, monkeypatch):
    base, out = trainable_base(), tmp_path / "run"

    def killed(folder):  # the process dies after the adapter files, before the manifest and the rename
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "write_manifest", killed)
        with pytest.raises(KeyboardInterrupt):
            train(config(out, base, max_steps=4, save_every=2))
    assert hidden(out / "checkpoints") == [".staging-step-000002"]
    (out / "checkpoints" / "..staging-step-000002-ab12cd_9").mkdir()  # save_adapter's own temporary folder
    (out / ".best-zz00yy11").mkdir()
    train(config(out, base, max_steps=1, save_every=100))  # a new run, with no checkpoint at step 2
    assert hidden(out / "checkpoints") == [] and hidden(out) == []
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]  # its own, at the end


def test_clean_staging_removes_only_its_own_hidden_folders_and_puts_back_a_moved_aside_one(tmp_path):
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    for name in (
        "step-000004",
        ".staging-step-000006",
        "..staging-step-000006-abcd1234",
        ".step-000004.old",
        ".step-000002.old",
        ".notes",
        ".staging-step-x",
    ):
        (root / name).mkdir(parents=True)
        (root / name / "f").write_text(name)
    for name in (".staging-final", "..staging-final-q1w2e3r4", ".best-a1b2c3d4", ".best.old", ".git"):
        (out / name).mkdir()
    (out / ".staging-final-file").write_text("a file, not a folder")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_text("x")
    os.symlink(outside, root / ".staging-step-000008")
    changed = checkpoint.clean_staging(out)
    assert sorted(p.name for p in changed) == sorted(
        [
            "..staging-final-q1w2e3r4",
            "..staging-step-000006-abcd1234",
            ".best-a1b2c3d4",
            ".best.old",
            ".staging-final",
            ".staging-step-000006",
            ".step-000002.old",
            ".step-000004.old",
        ]
    )
    assert sorted(p.name for p in root.iterdir()) == [
        ".notes",
        ".staging-step-000008",
        ".staging-step-x",
        "step-000002",
        "step-000004",
    ]
    assert (root / "step-000002" / "f").read_text() == ".step-000002.old"  # put back: its replacement never came
    assert (root / "step-000004" / "f").read_text() == "step-000004"
    assert sorted(p.name for p in out.iterdir()) == [".git", ".staging-final-file", "best", "checkpoints"]
    assert (outside / "keep").read_text() == "x"
    assert checkpoint.clean_staging(tmp_path / "missing") == []


@pytest.mark.parametrize(
    "key, value", [("num_layers", -2), ("token_dim", -16), ("num_layers", 0), ("token_dim", "32"), ("num_layers", True)]
)
def test_adapter_configs_with_impossible_sizes_are_refused(tmp_path, tiny, key, value):
    import torch

    folder = save_adapter(tmp_path / "a", torch.zeros(2, tiny.hidden_size), tiny)
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterError) as caught:
        load_adapter(folder)
    assert str(caught.value) == f"{path}: field {key!r} must be a positive integer (or null), got {value!r}"


def test_a_prefix_adapter_with_two_negative_sizes_is_refused(tmp_path, tiny):
    import torch

    layers, width = tiny.model.config.num_hidden_layers, 2 * 2 * 8  # 2 kv heads x head_dim 8
    folder = save_adapter(tmp_path / "p", torch.zeros(2, layers * width), tiny, method="prefix")
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    load_adapter(folder, tiny)
    data.update(num_layers=-data["num_layers"], token_dim=-data["token_dim"])  # same product, both negative
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterError, match=r"field 'num_layers' must be a positive integer \(or null\), got -2"):
        load_adapter(folder, tiny)
