"""Checkpoints that verify: checksums written with each checkpoint, resume falls back past a damaged newest one,
a named damaged checkpoint is refused with one line naming the file, and old checkpoints without checksums still
resume."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from train_helpers import config, interrupted, trainable_base

from softprompt.formats import checkpoint
from softprompt.formats.adapter import load_adapter
from softprompt.formats.checkpoint import CheckpointError
from softprompt.training.loop import train


@pytest.fixture(scope="module")
def base():
    return trainable_base()


@pytest.fixture(scope="module")
def whole(base, tmp_path_factory):
    """The uninterrupted 12-step run every resumed run must equal."""
    out = tmp_path_factory.mktemp("whole")
    train(config(out, base))
    return load_adapter(out).embeddings


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_every_checkpoint_has_checksums_of_all_its_files(base, tmp_path):
    train(config(tmp_path / "run", base, max_steps=4))
    folder = checkpoint.list_checkpoints(tmp_path / "run")[-1]
    manifest = json.loads((folder / "checksums.json").read_text())
    assert manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == sorted(p.name for p in folder.iterdir() if p.name != "checksums.json")
    assert set(manifest["files"]) >= {
        "training_state.safetensors",
        "trainer_state.json",
        "adapter_model.safetensors",
        "adapter_config.json",
    }
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert checkpoint.verify_checkpoint(folder) is True
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_truncated_newest_checkpoint_is_skipped_and_the_resume_is_exact(base, tmp_path, monkeypatch, capsys, whole):
    out = tmp_path / "cut"
    older, newest = interrupted(base, out, monkeypatch)
    truncate(newest / "training_state.safetensors")
    capsys.readouterr()
    assert checkpoint.resolve_resume(out) == older
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        f"softprompt: skipping checkpoint {newest}: training_state.safetensors does not match its checksum"
    )
    resumed = train(config(out, base, resume=str(out)))
    captured = capsys.readouterr()
    assert f"resuming from {older} (step 4)" in captured.out
    assert "training_state.safetensors does not match its checksum" in captured.err
    assert resumed.steps == 12
    assert torch.equal(load_adapter(out).embeddings, whole)  # bit-identical to the uninterrupted run
    assert checkpoint.verify_checkpoint(checkpoint.list_checkpoints(out)[-1])  # the damaged one was replaced


def test_a_damaged_adapter_file_in_a_checkpoint_is_caught_too(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut"
    older, newest = interrupted(base, out, monkeypatch)
    weights = newest / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # same size, one bit flipped in a prompt value: only the checksum can tell
    weights.write_bytes(bytes(data))
    assert checkpoint.resolve_resume(out) == older
    assert f"{newest}: adapter_model.safetensors does not match its checksum" in capsys.readouterr().err


def test_a_named_damaged_checkpoint_is_refused_naming_the_file(base, tmp_path, monkeypatch):
    out = tmp_path / "cut"
    _, newest = interrupted(base, out, monkeypatch)
    truncate(newest / "training_state.safetensors")
    with pytest.raises(CheckpointError) as caught:
        checkpoint.resolve_resume(newest)
    message = str(caught.value)
    assert message.startswith(f"{newest}: training_state.safetensors does not match its checksum")
    assert "\n" not in message
    assert isinstance(caught.value, RuntimeError)  # the CLI prints RuntimeError / ValueError as one line
    with pytest.raises(CheckpointError, match="training_state.safetensors does not match its checksum"):
        train(config(out, base, resume=str(newest)))
    with pytest.raises(CheckpointError, match="training_state.safetensors does not match its checksum"):
        checkpoint.load_checkpoint(newest)


def test_an_output_folder_without_a_good_checkpoint_is_refused(base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut"
    found = interrupted(base, out, monkeypatch)
    for folder in found:
        truncate(folder / "training_state.safetensors")
    with pytest.raises(CheckpointError) as caught:
        checkpoint.resolve_resume(out)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"--resume {out}: no usable checkpoint (2 found, none verifies; the newest: "
        f"{found[-1]}: training_state.safetensors does not match its checksum"
    )
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["softprompt"] * 2
    # a folder that never had checkpoints keeps its own message
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        checkpoint.resolve_resume(tmp_path / "nothing")


def test_load_checkpoint_turns_a_safetensors_error_into_a_clear_one(base, tmp_path, monkeypatch):
    out = tmp_path / "cut"
    _, newest = interrupted(base, out, monkeypatch)
    (newest / "checksums.json").unlink()  # as written before checksums existed
    truncate(newest / "training_state.safetensors")
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load_checkpoint(newest)
    assert str(caught.value).startswith(
        f"{newest / 'training_state.safetensors'}: corrupt or truncated safetensors file"
    )
    assert "\n" not in str(caught.value)
    assert not isinstance(caught.value, SafetensorError)
    (newest / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"trainer_state.json: unreadable checkpoint state"):
        checkpoint.load_checkpoint(newest)


def test_checkpoints_written_before_checksums_still_resume(base, tmp_path, monkeypatch, capsys, whole):
    out = tmp_path / "cut"
    older, newest = interrupted(base, out, monkeypatch)
    for folder in (older, newest):
        (folder / "checksums.json").unlink()
    assert checkpoint.verify_checkpoint(newest) is False  # unverified, but usable
    assert checkpoint.resolve_resume(out) == newest
    # an unreadable one is still skipped, named by its file
    truncate(newest / "training_state.safetensors")
    assert checkpoint.resolve_resume(out) == older
    assert (
        f"skipping checkpoint {newest / 'training_state.safetensors'}: corrupt or truncated" in capsys.readouterr().err
    )
    resumed = train(config(out, base, resume=str(out)))
    assert resumed.steps == 12
    assert torch.equal(load_adapter(out).embeddings, whole)


def test_a_missing_or_unlisted_file_fails_verification(base, tmp_path):
    train(config(tmp_path / "run", base, max_steps=4))
    folder = checkpoint.list_checkpoints(tmp_path / "run")[-1]
    manifest = json.loads((folder / "checksums.json").read_text())
    del manifest["files"]["adapter_model.safetensors"]
    (folder / "checksums.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is not listed in checksums.json"):
        checkpoint.verify_checkpoint(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is missing"):
        checkpoint.verify_checkpoint(folder)
    (folder / "checksums.json").write_text("[]")
    with pytest.raises(CheckpointError, match="checksums.json is unreadable"):
        checkpoint.verify_checkpoint(folder)
