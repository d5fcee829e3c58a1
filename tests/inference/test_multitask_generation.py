"""A multitask adapter in generation: `NAME@TASK` is task TASK's prompt, computed once and cached; rows of different
tasks, other methods and the base in one decode batch equal each row alone and the no-cache greedy loop; generate
--task, generate --batch records naming `NAME@TASK`, eval with --task-field; every bad task name is one line."""

import json

import pytest
import torch
from engine_helpers import peaked_base, reference_greedy

from softprompt import evaluate, generate, generate_batch
from softprompt.core.prompt import build_prompt
from softprompt.data.templates import encode_text
from softprompt.formats.adapter import AdapterError, load_adapter, save_adapter
from softprompt.inference.batch import GenerationRequest
from softprompt.inference.engine import Engine
from softprompt.inference.prompt_cache import UnknownAdapterError

TASKS = 3


@pytest.fixture(scope="module")
def tiny():
    return peaked_base()


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    """adapters/mt (a multitask adapter, 3 tasks of 4 virtual tokens, factors large enough that tasks differ) and
    adapters/p (a prompt-tuning adapter)."""
    out = tmp_path_factory.mktemp("adapters")
    module = build_prompt(tiny, "multitask", "random", 4, num_tasks=TASKS, num_ranks=2, seed=1)
    with torch.no_grad():
        module.task_cols.normal_(0, 1.5, generator=torch.Generator().manual_seed(2))
        module.task_rows.normal_(0, 1.5, generator=torch.Generator().manual_seed(3))
    save_adapter(out / "mt", module, tiny, extra={"task_names": ["a", "b", "c"]})
    save_adapter(out / "p", build_prompt(tiny, "prompt", "random", 3, seed=4), tiny)
    return out


@pytest.fixture(scope="module")
def engine(tiny, folder):
    return Engine(tiny, {name: load_adapter(folder / name, tiny) for name in ("mt", "p")})


def test_rows_of_every_task_and_other_methods_in_one_batch_equal_rows_alone(tiny, folder, engine):
    mt = load_adapter(folder / "mt", tiny)
    prompts = {f"mt@{t}": mt.for_task(t).embeddings for t in range(TASKS)}
    prompts.update(p=load_adapter(folder / "p", tiny).embeddings, base=None)
    texts = ["hello", "a b c d e", "the cat"]
    requests = [
        GenerationRequest(encode_text(tiny.tokenizer, text), adapter=None if name == "base" else name, max_new_tokens=6)
        for text in texts
        for name in prompts
    ]
    batched = engine.generate(requests, batch_size=8)
    answers = {}
    for request, result in zip(requests, batched):
        alone = engine.generate([GenerationRequest(request.prompt_ids, adapter=request.adapter, max_new_tokens=6)])
        assert result.token_ids == alone[0].token_ids
        reference, _ = reference_greedy(tiny, prompts[request.adapter or "base"], request.prompt_ids, 6)
        assert result.token_ids == reference, request.adapter
        answers.setdefault(tuple(request.prompt_ids), set()).add(tuple(result.token_ids))
    assert any(len(outs) >= 4 for outs in answers.values())  # the tasks do change the answers


def test_a_task_is_computed_once_and_ends_with_its_adapter(tiny, folder):
    engine = Engine(tiny, {"mt": load_adapter(folder / "mt", tiny)})
    first = engine.prompt_cache.entry("mt@1")
    assert engine.prompt_cache.entry("mt@1") is first and first.num_virtual_tokens == 4
    assert first.identity in engine.prompt_cache.identities() and "mt@1" in engine.prompt_cache
    engine.add_adapter("mt", load_adapter(folder / "mt", tiny))  # replaced: its tasks' entries are new ones
    assert engine.prompt_cache.entry("mt@1").identity != first.identity
    assert first.identity not in engine.prompt_cache.identities()


def test_bad_task_names_are_refused_in_one_line(engine):
    def refused(name, kind=AdapterError):
        with pytest.raises(kind) as err:
            engine.check(GenerationRequest([5, 6], adapter=name, id="r1"))
        return str(err.value)

    assert refused("mt") == "adapter 'mt' is a multitask adapter: name one of its tasks, e.g. 'mt@0' (tasks 0..2)"
    assert refused("mt@3") == "'mt@3': task 3 is out of range: the adapter has tasks 0..2"
    assert refused("mt@x") == "'mt@x': the task after '@' must be an integer task id, e.g. 'mt@0'"
    assert refused("mt@-1") == "'mt@-1': the task after '@' must be an integer task id, e.g. 'mt@0'"
    assert refused("p@0") == "'p@0': a task ('@0') is only for multitask adapters; this one is --method prompt"
    assert refused("nope@0", UnknownAdapterError) == "no adapter named 'nope' is loaded (loaded: mt, p)"


def test_generate_with_task_equals_the_task_prompt_and_refuses_a_missing_task(tiny, folder):
    mt = load_adapter(folder / "mt", tiny)
    options = dict(base=tiny, greedy=True, max_new_tokens=5)
    for task in range(TASKS):
        ids = Engine(tiny).encode("hello", "", None)
        expected, _ = reference_greedy(tiny, mt.for_task(task).embeddings, ids, 5)
        assert generate("hello", adapter=str(folder / "mt"), task=task, **options) == tiny.tokenizer.decode(expected)
    with pytest.raises(AdapterError) as err:
        generate("hello", adapter=str(folder / "mt"), **options)
    assert str(err.value) == f"--adapter {folder / 'mt'}: a multitask adapter needs --task (one of its tasks, 0..2)"
    with pytest.raises(AdapterError) as err:
        generate("hello", adapter=str(folder / "mt"), task=7, **options)
    assert str(err.value) == f"--adapter {folder / 'mt'}: task 7 is out of range: the adapter has tasks 0..2"
    with pytest.raises(AdapterError) as err:
        generate("hello", adapter=str(folder / "p"), task=0, **options)
    assert str(err.value) == (
        f"--adapter {folder / 'p'}: a task ('@0') is only for multitask adapters; this one is --method prompt"
    )
    with pytest.raises(ValueError, match=r"^--task needs --adapter \(a multitask adapter\)$"):
        generate("hello", task=0, **options)


def test_generate_batch_file_names_tasks_and_bad_ones_name_the_line(tiny, folder, tmp_path):
    records = [{"instruction": t, "adapter": a} for t in ("hi", "abc") for a in ("mt@0", "mt@2", "p", None)]
    options = dict(base=tiny, adapters_dir=str(folder), max_new_tokens=5, progress=False, greedy=True)
    batched = generate_batch(records, batch_size=8, **options)
    for record, out in zip(records, batched):
        assert out["output"] == generate_batch([record], **options)[0]["output"]
    assert batched[0]["output"] != batched[1]["output"]
    batch_file = tmp_path / "batch.jsonl"
    batch_file.write_text(json.dumps({"instruction": "hi", "adapter": "mt@0"}) + "\n" + json.dumps(
        {"instruction": "hi", "adapter": "mt@9"}) + "\n")  # fmt: skip
    from softprompt.inference.generate import read_batch

    with pytest.raises(ValueError) as err:
        generate_batch(read_batch(batch_file), batch_size=8, **options)
    assert (
        str(err.value) == f"{batch_file}:2: field 'adapter': 'mt@9': task 9 is out of range: the adapter has tasks 0..2"
    )
    batch_file.write_text(json.dumps({"instruction": "hi", "adapter": "mt@first"}) + "\n")
    with pytest.raises(ValueError) as err:
        read_batch(batch_file)
    assert str(err.value) == (
        f"{batch_file}:1: field 'adapter': 'mt@first': the task after '@' must be an integer task id, e.g. 'mt@0'"
    )
    batch_file.write_text(json.dumps({"instruction": "hi", "adapter": "mt"}) + "\n")
    with pytest.raises(ValueError) as err:
        generate_batch(read_batch(batch_file), batch_size=8, **options)
    assert str(err.value) == (
        f"{batch_file}:1: field 'adapter': adapter 'mt' is a multitask adapter: name one of its tasks, e.g. 'mt@0' "
        "(tasks 0..2)"
    )


def test_eval_scores_each_record_with_its_task(tiny, folder, tmp_path):
    records = [{"instruction": f"q {i}", "output": "ab", "kind": "abc"[i % 3]} for i in range(6)]
    options = dict(model=tiny, adapters=[str(folder / "mt")], max_new_tokens=0)
    mixed = evaluate(records, task_field="kind", **options)["results"][0]
    assert [e["task"] for e in mixed["examples"]] == [0, 1, 2, 0, 1, 2]  # names the adapter saved, mapped to ids
    losses = []
    for task in range(TASKS):
        subset = [r for i, r in enumerate(records) if i % 3 == task]
        losses.append(evaluate(subset, task=task, **options)["results"][0]["loss"])
    assert mixed["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)  # every record has 3 answer tokens
    assert len({round(x, 4) for x in losses}) == 3
    # rank classification too: each record's choices are scored with its task's prompt
    choices = dict(choices="ab,ba", max_new_tokens=2)
    mixed = evaluate(records, task_field="kind", **{**options, **choices})["results"][0]
    alone = [evaluate([r for i, r in enumerate(records) if i % 3 == t], task=t, **{**options, **choices})
             for t in range(TASKS)]  # fmt: skip
    assert mixed["loss"] == pytest.approx(sum(a["results"][0]["loss"] for a in alone) / 3, rel=1e-5)
    by_task = {t: [e for e in a["results"][0]["examples"]] for t, a in enumerate(alone)}
    for i, example in enumerate(mixed["examples"]):
        theirs = by_task[i % 3][i // 3]
        assert (example["choice"], example["generation"]) == (theirs["choice"], theirs["generation"])
    with pytest.raises(AdapterError) as err:
        evaluate(records, **options)
    assert str(err.value) == (
        f"--adapter {folder / 'mt'}: a multitask adapter needs --task-field FIELD (each record's task) or --task ID "
        "(tasks 0..2)"
    )
    bad = [{"instruction": "q", "output": "ab", "kind": 5}]
    with pytest.raises(ValueError) as err:
        evaluate(bad, task_field="kind", **options)
    assert str(err.value) == (
        f"<records>: record 0: field 'kind' is task 5, out of range: adapter {folder / 'mt'} has 3 task(s), ids 0..2"
    )


def test_export_vllm_writes_one_task_and_inspect_shows_the_shared_prompt(tiny, folder, tmp_path):
    from softprompt.evaluation.inspect import inspect_adapter
    from softprompt.vllm.export import ExportVllmConfig, export_vllm

    export_vllm(ExportVllmConfig(adapter=str(folder / "mt"), out=str(tmp_path / "v"), task=2), base=tiny)
    from safetensors.torch import load_file

    rows = load_file(str(tmp_path / "v" / "prompt_embeds.safetensors"))["prompt_embeds"]
    assert torch.equal(rows, load_adapter(folder / "mt").for_task(2).embeddings)
    with pytest.raises(ValueError) as err:
        export_vllm(ExportVllmConfig(adapter=str(folder / "mt"), out=str(tmp_path / "w")), base=tiny)
    assert str(err.value) == (
        f"adapter {folder / 'mt'} is a multitask adapter, with a prompt per task: export one task with --task (0..2)"
    )
    info = inspect_adapter(str(folder / "mt"), base=tiny, top_k=2)
    assert info["method"] == "multitask" and len(info["tokens"]) == 4 and info["num_tasks"] == 3
    assert info["trainable_parameters"] == 4 * 32 + 3 * 4 * 2 + 3 * 2 * 32
    from softprompt.evaluation.inspect import format_report

    assert "(with 3 tasks' factors of rank 2; the tokens below are the shared prompt's)" in format_report(info)
