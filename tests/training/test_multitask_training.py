"""--method multitask (PEFT's MULTITASK_PROMPT_TUNING) in training: a mixed-task file with a task column, steps that
mix tasks, the task names saved with the adapter, an exact resume, starting from a source adapter, and one-line
errors for a bad task column."""

import json

import pytest
import torch
from train_helpers import config, train_until, trainable_base

from softprompt.data.records import DataError
from softprompt.formats import checkpoint
from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.options import OptionError
from softprompt.training import loop as train_module
from softprompt.training.loop import train

# The same questions, answered differently per task: one shared prompt cannot fit both, a prompt per task can.
MIXED = [
    {
        "instruction": f"question {i}",
        "output": ("abab" if i % 2 else "cdcd") if task == "even" else "eeff",
        "kind": task,
    }
    for i in range(8)
    for task in ("even", "same")
]


@pytest.fixture(scope="module")
def base():
    return trainable_base(seed=0)


def mt(out, base, **overrides):
    values = dict(data=MIXED, method="multitask", task_field="kind", num_ranks=2, max_steps=12, lr=0.3)
    return config(out, base, **{**values, **overrides})


def losses(folder) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and r.get("kind", r.get("type")) != "eval"]


def test_multitask_learns_from_mixed_steps_and_saves_task_names(base, tmp_path):
    result = train(mt(tmp_path / "run", base, eval_fraction=0.25, eval_every=4))
    assert losses(tmp_path / "run")[-1] < losses(tmp_path / "run")[0]
    adapter = load_adapter(result.adapter_dir, base)
    assert (adapter.method, adapter.num_tasks, adapter.num_virtual_tokens) == ("multitask", 2, 4)
    assert adapter.factors["prefix_task_rows"].shape == (2, 2, 32)
    extra = json.loads((tmp_path / "run" / "softprompt.json").read_text())
    assert extra["task_names"] == ["even", "same"] and extra["task_field"] == "kind"
    cfg = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_tasks"], cfg["num_ranks"]) == ("MULTITASK_PROMPT_TUNING", 2, 2)
    assert load_adapter(tmp_path / "run" / "best").num_tasks == 2


def test_micro_batches_do_not_change_a_multitask_run(base, tmp_path):
    """A step's records split into micro-batches (and so into per-task groups differently) train the same prompt."""
    small = load_adapter(train(mt(tmp_path / "a", base, max_steps=4, max_batch_tokens=16)).adapter_dir)
    large = load_adapter(train(mt(tmp_path / "b", base, max_steps=4, max_batch_tokens=4096)).adapter_dir)
    for key, value in small.saved().items():
        assert torch.allclose(value, large.saved()[key], atol=1e-6), key


def test_multitask_trains_the_same_with_gradient_checkpointing(base, tmp_path):
    """Under checkpointing each task's prompt is concatenated in front of its rows (kv mode otherwise)."""
    kv = load_adapter(train(mt(tmp_path / "kv", base, max_steps=3)).adapter_dir)
    concat = load_adapter(train(mt(tmp_path / "concat", base, max_steps=3, gradient_checkpointing=True)).adapter_dir)
    for key, value in kv.saved().items():
        assert torch.allclose(value, concat.saved()[key], atol=1e-5), key


def test_multitask_resume_is_exact(base, tmp_path, monkeypatch):
    whole = train(mt(tmp_path / "whole", base))
    train_until(mt(tmp_path / "cut", base), monkeypatch, 6)
    tensors, state = checkpoint.load_checkpoint(checkpoint.list_checkpoints(tmp_path / "cut")[-1])
    assert state["method"] == "multitask" and "prompt.task_cols" in tensors
    resumed = train(mt(tmp_path / "cut", base, resume=str(tmp_path / "cut")))
    assert resumed.steps == whole.steps == 12
    for key, value in load_adapter(whole.adapter_dir).saved().items():
        assert torch.equal(value, load_adapter(resumed.adapter_dir).saved()[key]), key


def test_integer_task_ids_and_num_tasks(base, tmp_path):
    records = [{**r, "kind": i % 3} for i, r in enumerate(MIXED)]
    adapter = load_adapter(train(mt(tmp_path / "run", base, data=records, num_tasks=4, max_steps=2)).adapter_dir)
    assert adapter.num_tasks == 4
    assert json.loads((tmp_path / "run" / "softprompt.json").read_text())["task_names"] is None


@pytest.mark.parametrize("mode", ["average-tasks", "exact-task", "shared-only"])
def test_init_from_a_source_adapter(base, tmp_path, mode):
    source = load_adapter(train(mt(tmp_path / "source", base, max_steps=2)).adapter_dir)
    cols, rows = source.factors["prefix_task_cols"], source.factors["prefix_task_rows"]
    task = {"init_task": 1} if mode == "exact-task" else {}
    fresh = train_module.build_prompt(base, "multitask", "random", 4, seed=0, num_tasks=3, num_ranks=2)
    start = train_module._from_source(
        mt(tmp_path / "x", base, init=None, init_from=str(tmp_path / "source"), init_from_mode=mode, **task),
        base,
        fresh,
    )
    assert torch.equal(start.embedding, source.embeddings)
    for t in range(3):
        expected = {"average-tasks": (cols.mean(0), rows.mean(0)), "exact-task": (cols[1], rows[1])}
        expected = expected.get(mode, (fresh.task_cols[t], fresh.task_rows[t]))  # shared-only: fresh factors
        assert torch.allclose(start.task_cols[t], expected[0]) and torch.allclose(start.task_rows[t], expected[1])
    # and a run started that way trains and records where it started
    run = train(mt(tmp_path / "run", base, init=None, init_from=str(tmp_path / "source"), init_from_mode=mode,
                   max_steps=2, **task))  # fmt: skip
    extra = json.loads((tmp_path / "run" / "softprompt.json").read_text())
    assert extra["init_from_mode"] == mode and load_adapter(run.adapter_dir).num_tasks == 2


def test_init_from_a_source_that_does_not_fit(base, tmp_path):
    prompt = train_module.build_prompt(base, "prompt", "random", 3)
    save_adapter(tmp_path / "plain", prompt, base)
    fresh = train_module.build_prompt(base, "multitask", "random", 4, num_tasks=2)
    with pytest.raises(DataError) as err:
        train_module._from_source(mt(tmp_path / "x", base, init=None, init_from=str(tmp_path / "plain")), base, fresh)
    assert str(err.value) == (
        f"--init-from {tmp_path / 'plain'}: --init-from-mode average-tasks needs a multitask adapter; this is a "
        "--method prompt adapter"
    )
    with pytest.raises(DataError) as err:
        train_module._from_source(
            mt(tmp_path / "x", base, init=None, init_from=str(tmp_path / "plain"), init_from_mode="shared-only"),
            base,
            fresh,
        )
    assert str(err.value) == (
        f"--init-from {tmp_path / 'plain'}: the source has 3 virtual tokens, this run 4: pass --num-virtual-tokens 3"
    )


def test_bad_task_columns_are_refused_in_one_line(base, tmp_path):
    def error(records, **overrides):
        with pytest.raises(DataError) as err:
            train(mt(tmp_path / "run", base, data=records, **overrides))
        return str(err.value)

    rows = [{"instruction": "a", "output": "b", "kind": 0}, {"instruction": "a", "output": "b", "kind": "x"}]
    assert error(rows) == (
        "<records>: record 1: field 'kind' is 'x', but earlier records give task integer ids: use one or the other "
        "throughout"
    )
    rows = [{"instruction": "a", "output": "b", "kind": 0}, {"instruction": "a", "output": "b", "kind": 5}]
    assert error(rows, num_tasks=2) == (
        "<records>: record 1: field 'kind' is task 5, out of range: --num-tasks 2 gives 2 task(s), ids 0..1"
    )
    rows = [{"instruction": "a", "output": "b", "kind": -1}]
    assert error(rows) == (
        "<records>: record 0: field 'kind' must be a task id (an integer >= 0) or a task name (a non-empty string), "
        "got int -1"
    )
    rows = [{"instruction": "a", "output": "b"}]
    assert error(rows) == "<records>: record 0: missing field 'kind' (the task; fields present: instruction, output)"
    names = [{"instruction": "a", "output": "b", "kind": "x"}]
    assert error(names, eval_data=[{"instruction": "a", "output": "b", "kind": "y"}]) == (
        "<records>: record 0: field 'kind' names task 'y', unknown (tasks: x)"
    )


def test_multitask_options_are_checked(base, tmp_path):
    def refused(**overrides):
        with pytest.raises(OptionError) as err:
            config(tmp_path, base, **overrides)
        return str(err.value)

    assert refused(task_field="kind") == "--task-field is for --method multitask (this run has --method prompt)"
    assert (
        refused(method="multitask", init_task=1)
        == "--init-from-mode and --init-task need --init-from (the source adapter)"
    )
    assert refused(method="multitask", init=None, init_from="x", init_task=1) == (
        "--init-task is for --init-from-mode exact-task"
    )
    assert refused(method="multitask", init_from="x") == (
        "give --init-from or --init (with --init-text / --init-file), not both"
    )
    assert "--num-ranks" in refused(method="multitask", num_ranks=0)


def test_fresh_factors_start_every_task_at_the_shared_prompt_or_near_zero_as_peft(base):
    near = train_module.build_prompt(base, "multitask", "vocab", 4, num_tasks=3, num_ranks=2, seed=1)
    peft = train_module.build_prompt(
        base, "multitask", "vocab", 4, num_tasks=3, num_ranks=2, seed=1, factor_init="peft"
    )
    assert torch.equal(near.embedding, peft.embedding)  # the shared prompt is --init's either way
    with torch.no_grad():
        for task in range(3):
            assert torch.allclose(near.task_prompt(task), near.embedding, rtol=0.2, atol=0)
            assert peft.task_prompt(task).norm() < 0.01 * peft.embedding.norm()
        assert 0.015 < float(peft.task_cols.std()) < 0.025 and 0.015 < float(peft.task_rows.std()) < 0.025
        assert not torch.equal(near.task_cols[0], near.task_cols[1])  # the noise tells tasks and ranks apart
