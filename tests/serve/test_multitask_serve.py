"""A multitask adapter through the real server on loopback: model `NAME@TASK` answers as the engine does alone, also
beside other tasks and methods in one decode batch; the model list names each task; its model card; a bare multitask name, a task out of range,
not an integer, of an unknown adapter or of the base model are each a 4xx naming the model field."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from engine_helpers import peaked_base
from serve_helpers import LiveServer, alone, error_of, make_adapter

from softprompt import create_app
from softprompt.core.prompt import build_prompt
from softprompt.data.templates import Template, encode_text
from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.inference.engine import Engine


@pytest.fixture(scope="module")
def tiny():
    return peaked_base()


@pytest.fixture(scope="module")
def adapters_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("multitask-adapters")
    module = build_prompt(tiny, "multitask", "random", 4, num_tasks=3, num_ranks=2, seed=1)
    with torch.no_grad():
        module.task_cols.normal_(0, 1.5, generator=torch.Generator().manual_seed(2))
        module.task_rows.normal_(0, 1.5, generator=torch.Generator().manual_seed(3))
    save_adapter(folder / "mt", module, tiny, template=Template("human-assistant"))
    make_adapter(tiny, folder, "soft", "human-assistant", 3)
    return folder


@pytest.fixture(scope="module")
def server(tiny, adapters_dir):
    with LiveServer(create_app(tiny, adapters_dir, max_tokens_cap=64)) as live:
        yield live


def test_each_task_answers_as_the_engine_does_alone_in_one_batch(server, tiny, adapters_dir):
    engine = Engine(
        tiny, {n: load_adapter(adapters_dir / n, tiny) for n in ("mt", "soft")}, Template("human-assistant")
    )
    models = ["mt@0", "mt@1", "mt@2", "soft", "base", "mt@1"]
    texts = ["The cat sat on"] * 5 + ["tell me"]

    def ask(pair):
        model, text = pair
        return server.client.completions.create(model=model, prompt=text, max_tokens=8, temperature=0)

    with ThreadPoolExecutor(len(models)) as pool:  # all in the one decode batch
        answers = list(pool.map(ask, zip(models, texts)))
    for answer, model, text in zip(answers, models, texts):
        ids = encode_text(tiny.tokenizer, text)
        assert answer.choices[0].text == alone(engine, ids, None if model == "base" else model, 8).text
        assert answer.model == model
    assert len({a.choices[0].text for a in answers[:3]}) == 3  # the tasks answer differently
    chat = server.client.chat.completions.create(
        model="mt@2", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert chat.model == "mt@2" and chat.usage.prompt_tokens > 4
    assert [m.id for m in server.client.models.list().data] == ["base", "mt@0", "mt@1", "mt@2", "soft"]
    card = httpx.get(server.url + "/v1/models/mt@1").json()
    assert card["id"] == "mt@1" and card["num_virtual_tokens"] == 4


@pytest.mark.parametrize(
    "model,status,message",
    [
        ("mt", 400, "adapter 'mt' is a multitask adapter: name one of its tasks, e.g. 'mt@0' (tasks 0..2)"),
        ("mt@3", 400, "'mt@3': task 3 is out of range: the adapter has tasks 0..2"),
        ("mt@one", 400, "'mt@one': the task after '@' must be an integer task id, e.g. 'mt@0'"),
        ("soft@0", 400, "'soft@0': a task ('@0') is only for multitask adapters; this one is --method prompt"),
        ("base@0", 400, "'base@0': the base model has no tasks (only multitask adapters do)"),
        ("nope@0", 404, "The model `nope@0` does not exist: its adapter `nope` is not served."),
    ],
)
def test_bad_task_models_are_4xx_naming_the_model_field(server, model, status, message):
    for path, body in (
        ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ):
        response = httpx.post(server.url + path, json=body)
        assert response.status_code == status, response.text
        error = error_of(response)
        assert error["message"] == message and error["param"] == "model"
