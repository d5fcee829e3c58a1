"""A CPT adapter through the real server on loopback: completions and chat answer as the engine does alone and as a
PROMPT_TUNING folder with the same tensor, also with requests of other adapters running at once; bad CPT folders
are skipped at start and refused by POST /v1/adapters with a 400 naming the field."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from engine_helpers import peaked_base
from serve_helpers import LiveServer, alone, error_of, make_adapter

from softprompt import create_app
from softprompt.core.prompt import ContextPrompt
from softprompt.data.templates import Template, encode_text
from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.inference.engine import Engine


@pytest.fixture(scope="module")
def tiny():
    return peaked_base()


def cpt_folder(base, path, n: int = 6, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(10, 60, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    types = [1, 2, 2, 3, 4, 4][:n] + [8] * max(0, n - 6)
    module = ContextPrompt.from_tokens(base, ids, types, epsilon=3.0, format_epsilon=3.0)
    with torch.no_grad():
        module.delta.copy_(torch.randn(module.delta.shape, generator=torch.Generator().manual_seed(seed)) * 3)
        module.project_()
    save_adapter(path, module, base, template=Template("human-assistant"))
    return module().detach()


@pytest.fixture(scope="module")
def adapters_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpt-serve")
    tensor = cpt_folder(tiny, folder / "ctx")
    save_adapter(folder / "same", tensor, tiny, template=Template("human-assistant"))
    make_adapter(tiny, folder, "soft", "human-assistant", 3)
    for name, edit in {
        "short": lambda c: c.update(cpt_token_ids=c["cpt_token_ids"][:-1]),
        "types": lambda c: c.update(cpt_tokens_type_mask=[1, 2, -3, 3, 4, 4]),
        "typestr": lambda c: c.update(cpt_tokens_type_mask="1,2,3"),
    }.items():
        cpt_folder(tiny, folder / name)
        path = folder / name / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return folder


BAD = {
    "short": "field 'cpt_token_ids' has 5 entries but adapter_model.safetensors's prompt_embeddings has 6 rows "
    "(one per context token)",
    "types": "field 'cpt_tokens_type_mask' holds a negative token type, -3 (types are 0 or more)",
    "typestr": "field 'cpt_tokens_type_mask' must be a list of integers, got '1,2,3'",
}


@pytest.fixture(scope="module")
def engine(tiny, adapters_dir):
    names = ["ctx", "same", "soft"]
    return Engine(tiny, {n: load_adapter(adapters_dir / n, tiny) for n in names}, Template("human-assistant"))


@pytest.fixture(scope="module")
def server(tiny, adapters_dir):
    with LiveServer(create_app(tiny, adapters_dir, max_tokens_cap=64, allow_admin=True)) as live:
        yield live


def test_a_cpt_model_answers_as_the_engine_and_as_prompt_tuning_beside_other_requests(server, engine, tiny):
    texts = ["The cat sat on", "The cat sat on", "tell me", "The cat sat on", "hello"]
    models = ["ctx", "same", "soft", "base", "ctx"]

    def ask(pair):
        model, text = pair
        return server.client.completions.create(model=model, prompt=text, max_tokens=10, temperature=0)

    with ThreadPoolExecutor(5) as pool:  # five requests in one decode batch
        answers = list(pool.map(ask, zip(models, texts)))
    for answer, model, text in zip(answers, models, texts):
        ids = encode_text(tiny.tokenizer, text)
        assert answer.choices[0].text == alone(engine, ids, None if model == "base" else model, 10).text
    assert answers[0].choices[0].text == answers[1].choices[0].text != answers[3].choices[0].text
    assert answers[0].usage.prompt_tokens == 6 + len(encode_text(tiny.tokenizer, texts[0]))
    chats = [
        server.client.chat.completions.create(
            model=m, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
        )
        for m in ("ctx", "same")
    ]
    assert chats[0].choices[0].message.content == chats[1].choices[0].message.content
    card = httpx.get(server.url + "/v1/models/ctx").json()
    assert card["id"] == "ctx" and card["num_virtual_tokens"] == 6


def test_bad_cpt_folders_are_skipped_and_refused_with_a_400_naming_the_field(server):
    skipped = server.state.scan["skipped"]
    for name, message in BAD.items():
        assert message in skipped[name], skipped[name]
        r = httpx.post(server.url + "/v1/adapters", json={"name": "x", "path": name}, timeout=60)
        assert r.status_code == 400 and message in error_of(r)["message"], r.text
        assert "adapter_config.json" in error_of(r)["message"]
