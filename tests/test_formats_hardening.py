"""On-disk formats refuse bad input early, with one line naming the file and the field or line: one atomic folder
replace for adapters and checkpoints, adapter folders checked at load time, BOM and non-UTF-8 data files."""

import pytest
import torch

from softprompt.formats import adapter as adapter_module
from softprompt.formats import checkpoint, folders
from softprompt.formats.adapter import save_adapter

# ---- one atomic folder replace -----------------------------------------------------------------------------------


def test_replace_folder_moves_a_new_folder_into_place(tmp_path):
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "f").write_text("new")
    assert folders.replace_folder(staging, tmp_path / "final") == tmp_path / "final"
    assert (tmp_path / "final" / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_replace_folder_swaps_out_an_existing_folder_and_leaves_nothing_behind(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "old-only").write_text("old")
    (tmp_path / ".final.old").mkdir()  # left by an earlier crash mid-swap
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "f").write_text("new")
    folders.replace_folder(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["f"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_replace_folder_failing_keeps_the_old_folder(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "f").write_text("old")
    with pytest.raises(OSError):
        folders.replace_folder(tmp_path / "no-such-staging", final)
    assert (final / "f").read_text() == "old"


def test_adapters_and_checkpoints_share_the_one_folder_replace(tmp_path, tiny, monkeypatch):
    assert not hasattr(adapter_module, "_replace_dir") and not hasattr(checkpoint, "_fsync_dir")
    calls = []
    real = folders.replace_folder

    def spy(staging, final):
        calls.append(final.name)
        return real(staging, final)

    monkeypatch.setattr(adapter_module, "replace_folder", spy)
    monkeypatch.setattr(checkpoint, "replace_folder", spy)
    save_adapter(tmp_path / "a", torch.zeros(2, tiny.hidden_size), tiny)
    prompt = torch.zeros(2, tiny.hidden_size, requires_grad=True)
    optimizer = torch.optim.AdamW([prompt])
    checkpoint.save_checkpoint(tmp_path / "run", 3, prompt, tiny, {}, optimizer, {})
    checkpoint.save_checkpoint(tmp_path / "run", 3, prompt, tiny, {}, optimizer, {})  # re-saving a step
    assert calls == ["a", ".staging-step-000003", "step-000003", ".staging-step-000003", "step-000003"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000003"]
