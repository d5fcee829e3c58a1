"""The owner of a training run's folder (formats/run_folder.RunFolder): what a step checkpoint holds and in which
layout, a resume refused in one exact line when the checkpoint is another run's, older layouts still resuming bit
for bit, OUT/best and the final adapter, and the typed adapter metadata the saver takes."""

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import RECORDS, config, interrupted, trainable_base

from softprompt.core.prompt import SoftPrompt, build_prompt
from softprompt.data.templates import Template
from softprompt.formats import checkpoint
from softprompt.formats.adapter import AdapterMetadata, load_adapter, save_adapter
from softprompt.formats.run_folder import MODULE_KEY, Progress, RunFolder, RunKey, RunSummary
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


@pytest.fixture(scope="module")
def four_steps(base, tmp_path_factory):
    """An output folder with one checkpoint, after 4 steps of 4 records (16 records, seed 0, 4 virtual tokens)."""
    out = tmp_path_factory.mktemp("four")
    train(config(out, base, max_steps=4))
    return out


def folder_of(base, out, prompt, **key) -> RunFolder:
    values = {"records": len(RECORDS), "step_records": 4, "seed": 0, "method": prompt.method, **key}
    return RunFolder(out, base, AdapterMetadata.of(prompt), RunKey(**values))


def test_a_step_checkpoint_keeps_the_layout_older_versions_wrote(four_steps):
    folder = checkpoint.list_checkpoints(four_steps)[-1]
    state = json.loads((folder / "trainer_state.json").read_text())
    assert list(state) == [
        "best_eval_loss",
        "best_step",
        "bad_evals",
        "tokens",
        "recent_losses",
        "low_loss",
        "low_step",
        "rollbacks",
        "records",
        "step_records",
        "seed",
        "epoch",
        "method",
        "step",
        "optimizer",
    ]
    assert {k: state[k] for k in ("records", "step_records", "seed", "epoch", "method", "step")} == {
        "records": 16,
        "step_records": 4,
        "seed": 0,
        "epoch": 0,
        "method": "prompt",
        "step": 4,
    }
    tensors = load_file(str(folder / "training_state.safetensors"))
    assert torch.equal(tensors[MODULE_KEY + "embeddings"], load_adapter(folder).embeddings)
    assert "rng.torch" in tensors and any(k.startswith("optim.") for k in tensors)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed": 1}, "the checkpoint was made with seed=0, this run has 1; resume with the same data, batch size, "),
        ({"data": RECORDS[:12]}, "the checkpoint was made with records=16, this run has 12; resume with the same "),
        ({"batch_size": 2}, "the checkpoint was made with step_records=4, this run has 2; resume with the same "),
        (
            {"num_virtual_tokens": 5},
            "trainable tensor embeddings is (4, 32) in the checkpoint, (5, 32) in this run (same --method, "
            "--num-virtual-tokens and encoder options?)",
        ),
        ({"method": "ptuning"}, "the checkpoint was made with --method prompt, this run has --method ptuning"),
    ],
)
def test_a_resume_of_another_run_is_refused_in_one_exact_line(base, four_steps, change, message):
    newest = checkpoint.list_checkpoints(four_steps)[-1]
    with pytest.raises(ValueError) as caught:
        train(config(four_steps, base, resume=str(four_steps), **change))
    text = str(caught.value)
    assert text.startswith(f"--resume {newest}: {message}")
    if "records" in message or "seed" in message:
        assert text.endswith("resume with the same data, batch size, processes and seed")
    assert "\n" not in text


def as_written_before_module_tensors(folder) -> None:
    """What versions before module tensors (and before checksums) wrote: no prompt.* tensors, no method."""
    path = folder / "training_state.safetensors"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if not k.startswith(MODULE_KEY)}, str(path), metadata={"format": "pt"})
    state = json.loads((folder / "trainer_state.json").read_text())
    del state["method"]
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=2))
    (folder / "checksums.json").unlink()


def test_the_legacy_layout_still_resumes_bit_for_bit(base, tmp_path, monkeypatch, capsys, whole):
    out = tmp_path / "cut"
    _, newest = interrupted(base, out, monkeypatch)
    as_written_before_module_tensors(newest)
    prompt = SoftPrompt.initialise(base, "random", 4)
    saved = folder_of(base, out, prompt).read_step(newest)
    assert saved.key == RunKey(16, 4, 0, "prompt") and saved.step == 8
    assert list(saved.module_state) == ["embeddings"]
    assert torch.equal(saved.module_state["embeddings"], load_adapter(newest).embeddings)  # the adapter is all
    assert not any(k.startswith(MODULE_KEY) for k in saved.tensors)
    resumed = train(config(out, base, resume=str(out)))
    assert f"resuming from {newest} (step 8)" in capsys.readouterr().out
    assert resumed.steps == 12
    assert torch.equal(load_adapter(out).embeddings, whole)


def test_counters_an_older_checkpoint_lacks_start_fresh(base, four_steps, tmp_path):
    prompt = SoftPrompt.initialise(base, "random", 4)
    folder = folder_of(base, tmp_path, prompt)
    optimizer = torch.optim.AdamW(prompt.parameters())
    path = folder.save_step(3, 0, prompt, optimizer, Progress(best_eval_loss=1.25, best_step=2, bad_evals=1, tokens=9))
    assert folder.read_step(path).progress == Progress(1.25, 2, 1, 9)
    state = json.loads((path / "trainer_state.json").read_text())
    for name in ("best_eval_loss", "best_step", "bad_evals", "tokens"):
        del state[name]
    (path / "trainer_state.json").write_text(json.dumps(state))
    checkpoint.write_manifest(path)
    assert folder.read_step(path).progress == Progress()


def test_a_checkpoint_that_stored_lr_scale_resumes_with_it_derived_from_the_rollbacks(base, tmp_path):
    prompt = SoftPrompt.initialise(base, "random", 4)
    folder = folder_of(base, tmp_path, prompt)
    optimizer = torch.optim.AdamW(prompt.parameters())
    path = folder.save_step(3, 0, prompt, optimizer, Progress(rollbacks=2))
    state = json.loads((path / "trainer_state.json").read_text())
    assert "lr_scale" not in state
    state["lr_scale"] = 0.25  # what the first build with the guard wrote beside rollbacks
    (path / "trainer_state.json").write_text(json.dumps(state))
    checkpoint.write_manifest(path)
    progress = folder.read_step(path).progress
    assert (progress, progress.lr_scale) == (Progress(rollbacks=2), 0.25)


def test_resume_restores_an_encoder_and_names_a_missing_tensor(base, tmp_path):
    source = build_prompt(base, "ptuning", "random", 3, seed=1)
    optimizer = torch.optim.AdamW(source.parameters(), lr=0.1)
    source().sum().backward()
    optimizer.step()
    folder = folder_of(base, tmp_path, source)
    folder.save_step(1, 0, source, optimizer, Progress(tokens=5))
    target = build_prompt(base, "ptuning", "random", 3, seed=2)
    fresh = torch.optim.AdamW(target.parameters(), lr=0.1)
    saved = folder.resume(tmp_path, target, fresh)
    assert (saved.step, saved.progress) == (1, Progress(tokens=5))
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value)
    assert fresh.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    lstm = build_prompt(base, "ptuning", "random", 3, encoder_type="lstm")
    with pytest.raises(ValueError) as caught:
        folder.resume(tmp_path, lstm, torch.optim.AdamW(lstm.parameters()))
    missing = next(k for k in lstm.state_dict() if k not in source.state_dict())
    assert str(caught.value) == (
        f"--resume {saved.folder}: trainable tensor {missing} is missing in the checkpoint, "
        f"{tuple(lstm.state_dict()[missing].shape)} in this run (same --method, --num-virtual-tokens and encoder "
        "options?)"
    )


def test_best_and_final_adapters(base, tmp_path):
    best = SoftPrompt.initialise(base, "random", 4, seed=1)
    meta = AdapterMetadata.of(best, init="random", template=Template("Q: {instruction}\nA:"), label_words=["ab", "cd"])
    folder = RunFolder(tmp_path, base, meta, RunKey(16, 4, 0, "prompt"))
    folder.save_best(best, 3, 1.5)
    saved = load_adapter(tmp_path / "best")
    assert torch.equal(saved.embeddings, best.embeddings.detach())
    assert {k: saved.extra[k] for k in ("step", "eval_loss", "label_words", "init")} == {
        "step": 3,
        "eval_loss": 1.5,
        "label_words": ["ab", "cd"],
        "init": "random",
    }
    last = SoftPrompt.initialise(base, "random", 4, seed=2)
    summary = RunSummary(steps=8, train_loss=0.5, best_eval_loss=1.5, best_step=3, stopped="completed", final="best")
    folder.write_final(last, summary)
    final = load_adapter(tmp_path)
    assert torch.equal(final.embeddings, saved.embeddings)  # OUT/best's, not the last step's
    assert final.extra["training"] == asdict(summary) and final.template == Template("Q: {instruction}\nA:")
    folder.write_final(last, RunSummary(8, 0.5, None, None, "completed", "last"))
    assert torch.equal(load_adapter(tmp_path).embeddings, last.embeddings.detach())


def test_typed_metadata_writes_what_the_keywords_write(base, tmp_path):
    prompt = build_prompt(base, "prefix", "random", 3, prefix_projection=True, encoder_hidden_size=16)
    template = Template("Q: {instruction}\nA:")
    save_adapter(tmp_path / "kw", prompt, base, init="labels", template=template, label_words=["x"], extra={"a": 1})
    meta = AdapterMetadata.of(prompt, init="labels", template=template, label_words=["x"], extra={"a": 1})
    save_adapter(tmp_path / "typed", prompt, base, metadata=meta)
    for name in ("adapter_config.json", "softprompt.json", "adapter_model.safetensors"):
        assert (tmp_path / "kw" / name).read_bytes() == (tmp_path / "typed" / name).read_bytes()
    assert json.loads((tmp_path / "typed" / "adapter_config.json").read_text())["prefix_projection"] is True
    assert meta.with_extra(b=2).extra == {"a": 1, "b": 2} and meta.extra == {"a": 1}
    with pytest.raises(TypeError) as caught:
        save_adapter(tmp_path / "both", prompt, base, metadata=meta, init="vocab")
    assert str(caught.value) == "save_adapter: pass metadata or its fields (init, template, ...), not both"
