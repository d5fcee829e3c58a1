"""Multitask prompt-tuning adapters (MULTITASK_PROMPT_TUNING) interoperate with real PEFT 0.21, both ways: for every
task id, PEFT's forward logits with `task_ids` (its `generate` is broken on current transformers) equal softprompt's
with that task's prompt, for folders written by either side; softprompt writes the adapter_config.json PEFT writes;
and an init from a source adapter gives the values PEFT's AVERAGE_SOURCE_TASKS / EXACT_SOURCE_TASK /
ONLY_SOURCE_SHARED give a one-task target."""

import json

import pytest
import torch
from helpers import assert_written_as_peft_writes, padded_pair, text_logits, tiny_base

from softprompt.core.prompt import MultitaskPrompt, build_prompt, multitask_factors
from softprompt.formats.adapter import load_adapter, save_adapter

peft = pytest.importorskip("peft")

ATOL = 1e-5
N, TASKS, RANKS = 4, 3, 2


def peft_logits(peft_model, task: int, ids, mask) -> torch.Tensor:
    task_ids = torch.full((ids.shape[0],), task, dtype=torch.long)
    with torch.no_grad():
        return peft_model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits[:, N:]


def assert_equal_on_real_tokens(ours, theirs, mask):
    assert ours.shape == theirs.shape
    keep = mask.bool()
    assert torch.allclose(ours[keep], theirs[keep], atol=ATOL), (ours[keep] - theirs[keep]).abs().max()


def moved(module: torch.nn.Module) -> torch.nn.Module:
    """Every tensor moved off its initialisation, so that each task's prompt differs clearly."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * (param.std() + 0.5))
    return module


def test_softprompt_multitask_adapter_loads_in_peft_with_equal_logits_per_task(tmp_path):
    base = tiny_base(seed=1)
    module = moved(build_prompt(base, "multitask", "random", N, num_tasks=TASKS, num_ranks=RANKS, seed=2))
    save_adapter(tmp_path / "sp", module, base)
    peft_model = peft.PeftModel.from_pretrained(tiny_base(seed=1).model, str(tmp_path / "sp"))
    assert peft_model.peft_config["default"].peft_type.value == "MULTITASK_PROMPT_TUNING"
    adapter = load_adapter(tmp_path / "sp", base)
    assert adapter.method == "multitask" and adapter.num_tasks == TASKS
    ids, mask = padded_pair()
    seen = []
    for task in range(TASKS):
        ours = text_logits(base.model, adapter.for_task(task).virtual(), ids, mask)
        assert_equal_on_real_tokens(ours, peft_logits(peft_model, task, ids, mask), mask)
        seen.append(ours)
    assert not torch.allclose(seen[0], seen[1], atol=1e-3)  # the tasks really differ


def test_peft_multitask_adapter_loads_in_softprompt_with_equal_logits_per_task(tmp_path):
    torch.manual_seed(3)
    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=TASKS, num_ranks=RANKS
    )
    peft_model = peft.get_peft_model(tiny_base(seed=1).model, config)
    moved(peft_model.prompt_encoder["default"])
    peft_model.save_pretrained(str(tmp_path / "peft"))
    base = tiny_base(seed=1)
    adapter = load_adapter(tmp_path / "peft", base)
    assert (adapter.method, adapter.num_virtual_tokens, adapter.num_tasks) == ("multitask", N, TASKS)
    ids, mask = padded_pair(1)
    for task in range(TASKS):
        ours = text_logits(base.model, adapter.for_task(task).virtual(), ids, mask)
        assert_equal_on_real_tokens(ours, peft_logits(peft_model, task, ids, mask), mask)

    # softprompt writes back the same tensors and the adapter_config.json fields PEFT wrote
    save_adapter(tmp_path / "again", adapter.soft_prompt(), base)
    ours_config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    peft_written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert_written_as_peft_writes(ours_config, peft_written)
    again = load_adapter(tmp_path / "again", base)
    for key, value in adapter.saved().items():
        assert torch.equal(again.saved()[key], value)


@pytest.mark.parametrize(
    "mode,peft_init",
    [
        ("average-tasks", "AVERAGE_SOURCE_TASKS"),
        ("exact-task", "EXACT_SOURCE_TASK"),
        ("shared-only", "ONLY_SOURCE_SHARED"),
    ],  # fmt: skip
)
def test_init_from_a_source_adapter_matches_peft(tmp_path, mode, peft_init):
    base = tiny_base(seed=1)
    source = moved(build_prompt(base, "multitask", "random", N, num_tasks=TASKS, num_ranks=RANKS, seed=2))
    save_adapter(tmp_path / "source", source, base)
    adapter = load_adapter(tmp_path / "source", base)
    cols, rows = multitask_factors(1, N, 32, RANKS, 0, (adapter.factors["prefix_task_cols"],
                                   adapter.factors["prefix_task_rows"]), mode, source_task=2)  # fmt: skip
    ours = MultitaskPrompt(adapter.embeddings, cols, rows)
    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=1, num_ranks=RANKS, prompt_tuning_init=peft_init,
        prompt_tuning_init_state_dict_path=str(tmp_path / "source" / "adapter_model.safetensors"),
        prompt_tuning_init_task=2,
    )  # fmt: skip
    theirs = peft.get_peft_model(tiny_base(seed=1).model, config).prompt_encoder["default"]
    assert torch.equal(ours.embedding, theirs.embedding.weight.detach())
    if mode != "shared-only":  # (shared-only: fresh factors on both sides, drawn differently)
        assert torch.allclose(ours.task_cols, theirs.prefix_task_cols.detach())
        assert torch.allclose(ours.task_rows, theirs.prefix_task_rows.detach())


@pytest.mark.slow
def test_real_model_multitask_adapter_and_peft_agree_per_task(default_base, tmp_path):
    """On SmolLM2-135M-Instruct: a text-initialised multitask prompt (2 tasks, rank 2), moved off its init, loads in
    PEFT with the logits softprompt computes for each task; its config says TEXT with the init text."""
    from softprompt.core.models import load_base

    module = moved(build_prompt(default_base, "multitask", "text", 6, "Classify:", num_tasks=2, num_ranks=2, seed=1))
    save_adapter(tmp_path / "mt", module, default_base)
    config = json.loads((tmp_path / "mt" / "adapter_config.json").read_text())
    assert (config["prompt_tuning_init"], config["prompt_tuning_init_text"], config["token_dim"]) == (
        "TEXT", "Classify:", 576)  # fmt: skip
    tok = default_base.tokenizer
    ids = torch.tensor([tok("Human: Is the sky blue?\n\nAssistant:", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    adapter = load_adapter(tmp_path / "mt", default_base)
    peft_model = peft.PeftModel.from_pretrained(load_base(device="cpu", dtype="float32").model, str(tmp_path / "mt"))
    for task in range(2):
        with torch.no_grad():
            ours = text_logits(default_base.model, adapter.for_task(task).virtual(), ids, mask)
            theirs = peft_model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([task])).logits[:, 6:]
        # `moved` puts the prompt far off the embedding scale (values ~0.5, logits ~20): fp32 sums over 30 layers in
        # another order (PEFT concatenates, softprompt runs the prompt's keys/values first) differ by up to ~3e-4
        assert torch.allclose(ours, theirs, atol=1e-3), (task, (ours - theirs).abs().max())
