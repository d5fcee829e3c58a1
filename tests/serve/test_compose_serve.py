"""Composed models (`ka+kb`: the served cartridges' keys/values concatenated) through the real server on loopback:
the answer of the composed request alone through the engine, also beside plain requests running at once; its model
card; pinning a document for it; every bad composition a 4xx in one line."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from engine_helpers import peaked_base
from serve_helpers import LiveServer, alone, error_of, make_adapter

from softprompt import create_app
from softprompt.core.forward import prefix_width
from softprompt.data.templates import Template, encode_text
from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.formats.compose import write_composition
from softprompt.inference.engine import Engine

CARTRIDGES = {"ka": 4, "kb": 3, "big": 300, "mid": 200}


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama whose greedy answers depend strongly on what is in front of them (so equal answers mean
    something)."""
    return peaked_base()


@pytest.fixture(scope="module")
def adapters_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compose-adapters")
    for seed, (name, n) in enumerate(CARTRIDGES.items()):
        tensor = 3 * torch.randn(n, prefix_width(tiny.model), generator=torch.Generator().manual_seed(seed))
        save_adapter(folder / name, tensor, tiny, method="cartridge", template=Template("human-assistant"))
    make_adapter(tiny, folder, "soft", "human-assistant", 3)
    write_composition([folder / "ka", folder / "kb"], folder / "kab")  # the composition as one folder, served too
    return folder


@pytest.fixture(scope="module")
def engine(tiny, adapters_dir):
    names = ["ka", "kb", "soft"]
    return Engine(tiny, {n: load_adapter(adapters_dir / n, tiny) for n in names}, Template("human-assistant"))


@pytest.fixture(scope="module")
def server(tiny, adapters_dir):
    with LiveServer(create_app(tiny, adapters_dir, max_tokens_cap=64, allow_admin=True)) as live:
        yield live


def test_a_composed_model_answers_as_the_engine_does_also_beside_plain_requests(server, engine, tiny):
    texts = ["The cat sat on"] * 4 + ["tell me"]
    models = ["ka+kb", "ka", "kb", "kb+ka", "soft"]

    def ask(pair):
        model, text = pair
        return server.client.completions.create(model=model, prompt=text, max_tokens=10, temperature=0)

    with ThreadPoolExecutor(5) as pool:  # five requests in the one decode batch, the composed ones among them
        answers = list(pool.map(ask, zip(models, texts)))
    for answer, model, text in zip(answers, models, texts):
        ids = encode_text(tiny.tokenizer, text)
        assert answer.choices[0].text == alone(engine, ids, model, 10).text
        assert answer.model == model
    text = [answer.choices[0].text for answer in answers]
    assert len({text[0], text[1], text[2]}) == 3  # each part matters
    assert text[3] == text[0]  # the order does not: attention does not see the keys' order (each has its rotation)
    assert answers[0].usage.prompt_tokens == 7 + len(encode_text(tiny.tokenizer, texts[0]))
    chat = server.client.chat.completions.create(
        model="ka+kb", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    assert chat.model == "ka+kb" and chat.usage.prompt_tokens > 7
    card = httpx.get(server.url + "/v1/models/ka+kb").json()
    assert card["id"] == "ka+kb" and card["num_virtual_tokens"] == 7


def test_a_composed_model_scores_and_answers_as_its_composed_folder(server):
    """Echo with logprobs (prompt scoring, what lm-eval sends) and sampled answers of `ka+kb` equal those of `kab`,
    the folder `softprompt compose ka kb` wrote, served beside it."""
    answers = {}
    for model in ("ka+kb", "kab"):
        body = {"model": model, "prompt": ["The cat sat", "on the mat"], "max_tokens": 0, "echo": True, "logprobs": 2}
        scored = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        sampled = server.client.completions.create(model=model, prompt="Once", max_tokens=8, temperature=1, seed=3)
        answers[model] = ([c["logprobs"] for c in scored["choices"]], sampled.choices[0].text)
    assert answers["ka+kb"] == answers["kab"]
    assert len(answers["kab"][0][0]["token_logprobs"]) == 11 and answers["kab"][1]  # 11 characters scored, text


def test_a_document_pinned_for_a_composed_model_is_reused(server):
    document = "The cat sat on the mat. " * 4  # 96 characters: 6 blocks of 16
    question = document + "Where is the cat?"
    want = server.client.completions.create(model="ka+kb", prompt=question, max_tokens=8, temperature=0)
    r = httpx.post(server.url + "/v1/prefixes", json={"model": "ka+kb", "prompt": document}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "ka+kb" and r.json()["tokens"] == 96
    before = server.state.prefix_cache.stats().cached_tokens
    got = server.client.completions.create(model="ka+kb", prompt=question, max_tokens=8, temperature=0)
    assert got.choices[0].text == want.choices[0].text
    assert server.state.prefix_cache.stats().cached_tokens - before >= 96
    off = httpx.post(server.url + "/v1/prefixes", json={"model": "ka+kb", "prompt": document, "pin": False})
    assert off.json()["tokens"] == 96


@pytest.mark.parametrize(
    ("model", "prompt", "status", "message"),
    [
        ("ka+nope", "hi", 404, "The model `ka+nope` does not exist: its part `nope` is not served."),
        ("ka+", "hi", 400, "composition 'ka+' has an empty part: join two or more adapter names with '+', e.g. 'a+b'"),
        ("+ka", "hi", 400, "composition '+ka' has an empty part: join two or more adapter names with '+', e.g. 'a+b'"),
        (
            "ka+soft",
            "hi",
            400,
            "composition 'ka+soft': part 'soft' is a prompt adapter; only key/value adapters (prefix, cartridge) "
            "compose, by concatenating their keys/values",
        ),
        (
            "ka+base",
            "hi",
            400,
            "composition 'ka+base': part 'base' is the base model, which has no keys/values to compose",
        ),
        (
            "big+mid+mid",
            "hi",
            400,
            "big+mid+mid: 700 virtual tokens do not fit the base model's context of 512 tokens (at most 510: a prompt "
            "token and a generated one need room too)",
        ),  # fmt: skip
        (
            "big+mid",
            "x" * 20,
            400,
            "This model's maximum context length is 512 tokens. However, you requested 536 tokens (520 in the prompt, "
            "including the adapter's virtual tokens; 16 for the completion). Please reduce the prompt or max_tokens.",
        ),
    ],
)
def test_bad_compositions_are_refused_in_one_line(server, model, prompt, status, message):
    r = httpx.post(
        server.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 16}, timeout=60
    )
    assert r.status_code == status, r.text
    error = error_of(r)
    assert error["message"] == message and error["param"] in ("model", "max_tokens")
    pin = httpx.post(server.url + "/v1/prefixes", json={"model": model, "prompt": prompt}, timeout=60)
    assert pin.status_code == status
