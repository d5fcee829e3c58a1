"""Property-based test of `softprompt serve`: generated valid and invalid bodies against the real server on loopback.

Whatever the body (well-formed requests, wrong types, out-of-range numbers, lone surrogates, unknown fields, deep
nesting, broken JSON), the server answers below 500, with a status that /openapi.json documents for the endpoint,
and a body that matches the schema it publishes for that status (JSON, or each server-sent event of a stream).

Bounded and derandomised (the same examples on every run): a tiny random model, max_tokens capped at 8.
"""

import json
import re
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from serve_helpers import LiveServer, make_adapter

from softprompt import create_app

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-adapters")
    make_adapter(tiny, folder, "alpha", "human-assistant", 3, seed=0)
    make_adapter(tiny, folder, "gamma", "Q: {instruction}\nA:", 2, seed=1)
    make_adapter(tiny, folder, "spare", "chat", 2, seed=2)
    app = create_app(
        tiny, folder, max_tokens_cap=8, max_batch=4, max_queue=4, allow_admin=True, max_request_bytes=64 * 1024
    )
    with LiveServer(app) as server:
        server.http = httpx.Client(base_url=server.url, timeout=60)
        server.doc = server.http.get("/openapi.json").json()
        yield server
        server.http.close()


def check(live, template: str, method: str, response: httpx.Response) -> None:
    """The response is documented for this operation and matches the published schema."""
    assert response.status_code < 500, response.text
    operation = live.doc["paths"][template][method]
    documented = operation["responses"]
    assert str(response.status_code) in documented, (template, response.status_code, response.text)
    content = documented[str(response.status_code)].get("content", {})
    media = response.headers.get("content-type", "").split(";")[0]
    assert media in content, (template, response.status_code, media)
    if media == "text/event-stream":
        chunk = content[media]["x-event-schema"]["$ref"]
        validate_stream(live, chunk, response.text)
    else:
        validate(live, content[media]["schema"]["$ref"], response.json())


def validate(live, ref: str, value) -> None:
    Draft202012Validator({"$ref": ref, "components": live.doc["components"]}).validate(value)


def validate_stream(live, chunk_ref: str, text: str) -> None:
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert events, text
    for data in events[:-1]:
        validate(live, chunk_ref, json.loads(data))
    last = events[-1]
    if last != "[DONE]":  # a generation error ends the stream with an error event
        validate(live, "#/components/schemas/ErrorResponse", json.loads(last))


# ---- strategies --------------------------------------------------------------------------------------------------
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.one_of(
    st.text(max_size=24),
    st.text(alphabet=st.one_of(st.characters(max_codepoint=127), surrogates), max_size=8),
    st.sampled_from(["", " ", "\x00", "你好", "<|user|>", "\n\n"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=6
)
deep = st.integers(min_value=30, max_value=60).map(lambda n: json.loads("[" * n + "]" * n))


clean = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20)

# Plausible values: a body made only of them is usually served (200).
VALID = {
    "model": st.sampled_from(["alpha", "gamma", "base", "spare"]),
    "max_tokens": st.integers(min_value=1, max_value=8),
    "temperature": st.sampled_from([0, 1e-39, 5e-324, 0.7, 1, 2]) | st.floats(min_value=0, max_value=2),
    "top_p": st.sampled_from([1e-46, 5e-324, 0.5, 1]) | st.floats(min_value=1e-9, max_value=1),
    "top_k": st.integers(min_value=0, max_value=50),
    "seed": st.integers(min_value=-(2**63), max_value=2**64 - 1),
    "stop": st.none() | clean | st.lists(clean, max_size=3),
    "stream": st.booleans(),
    "user": clean,
    "metadata": st.dictionaries(clean, clean, max_size=2),
    "n": st.integers(min_value=1, max_value=3),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "logit_bias": st.dictionaries(
        st.integers(min_value=0, max_value=110).map(str), st.floats(min_value=-100, max_value=100), max_size=3
    ),
}
token_ids = st.lists(st.integers(min_value=0, max_value=110), min_size=1, max_size=6)
COMPLETION = {
    "prompt": clean | st.lists(clean, min_size=1, max_size=4) | token_ids | st.lists(token_ids, min_size=1, max_size=3)
}
COMPLETION_OPTIONAL = {
    "logprobs": st.integers(min_value=0, max_value=5),
    "echo": st.booleans(),
    "best_of": st.integers(min_value=1, max_value=3),
    "max_tokens": st.integers(min_value=0, max_value=8),
}
CHAT = {
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": clean}),
        min_size=1,
        max_size=3,
    ).map(lambda ms: ms + [{"role": "user", "content": "hi"}])
}
CHAT_OPTIONAL = {
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=5),
    "max_completion_tokens": st.integers(min_value=1, max_value=8),
}

# Anything a client might get wrong, field by field.
WRONG = {
    "model": st.sampled_from(["nope", "", "ALPHA"]) | texts | anything,
    "max_tokens": st.sampled_from([0, 9, 2**64, "4", True, 2.0, None, -1]),
    "temperature": st.sampled_from([-0.1, 2.0000001, "0.5", True, None, 1e308]),
    "top_p": st.sampled_from([0, 1.5, -1e-300, "1", None]),
    "top_k": st.sampled_from([-1, 2**31, 1.5, "3"]),
    "seed": st.sampled_from([2**64, -(2**63) - 1, 1.5, "7", True]),
    "stop": st.lists(texts, max_size=20) | st.integers() | st.lists(st.integers(), min_size=1, max_size=2),
    "stream": st.sampled_from(["yes", 1, None]),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": anything}) | anything,
    "n": st.sampled_from([0, 65, "1", True, 1.0]),
    "presence_penalty": st.sampled_from([2.5, -3, "0"]),
    "frequency_penalty": st.sampled_from([2.5, "0", None]),
    "logit_bias": st.dictionaries(texts, st.floats(allow_nan=False), min_size=1, max_size=2)
    | st.dictionaries(st.integers().map(str), st.floats(), min_size=1, max_size=2),
    "metadata": deep | st.dictionaries(texts, anything, max_size=2),
    "prompt": anything
    | st.lists(texts, max_size=12)
    | st.sampled_from(["", [], [""] * 9, [[]], [-1], [10**9]])
    | texts
    | st.lists(st.integers(), max_size=4)
    | st.lists(st.lists(st.integers(), max_size=3), max_size=3),
    "messages": anything
    | st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "robot"])},
            optional={
                "content": st.none()
                | texts
                | st.lists(
                    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": anything}),
                    max_size=2,
                ),
                "name": texts,
            },
        ),
        max_size=3,
    ),
    "echo": anything,
    "suffix": texts,
    "logprobs": anything | st.sampled_from([21, -1]),
    "best_of": anything,
    "top_logprobs": anything | st.sampled_from([21, -1, 3]),
    "tools": anything,
    "response_format": anything,
    "max_completion_tokens": st.sampled_from([0, 9, "4"]),
    "frobnicate": anything,
}


def bodies(specific: dict, drop_required: tuple[str, ...], optional: dict):
    """Valid bodies, valid bodies with one field made wrong (or a required one dropped), and wild ones."""
    required = {"model": VALID["model"], **specific}
    valid = st.fixed_dictionaries(required, optional={**{k: v for k, v in VALID.items() if k != "model"}, **optional})
    wrong_keys = sorted(set(WRONG) - ({"prompt"} if "messages" in specific else {"messages"}))

    def spoil(body, key, value):
        return {k: v for k, v in body.items() if k != key} if value is _DROP else {**body, key: value}

    def one_wrong_field(pair):
        body, key = pair
        values = WRONG[key] | st.just(_DROP) if key in drop_required else WRONG[key]
        return values.map(lambda value: spoil(body, key, value))

    one_wrong = st.tuples(valid, st.sampled_from(wrong_keys)).flatmap(one_wrong_field)
    wild = st.dictionaries(st.sampled_from(sorted(set(WRONG) | set(VALID))) | texts, anything, max_size=6)
    return st.one_of(valid, valid, valid, one_wrong, one_wrong, wild)


_DROP = object()
completion_bodies = bodies(COMPLETION, ("model", "prompt"), COMPLETION_OPTIONAL)
chat_bodies = bodies(CHAT, ("model", "messages"), CHAT_OPTIONAL)
adapter_names = st.sampled_from(["spare", "copy", "base", "../x", "a/b", ".hidden", "x" * 65]) | texts
adapter_bodies = st.fixed_dictionaries(
    {},
    optional={
        "name": adapter_names | anything,
        "path": st.sampled_from(["spare", "gamma", "missing", "/etc", "../x", "a\\b"]) | texts | anything,
        "replace": st.booleans() | anything,
        "extra": anything,
    },
)
raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [
            b"",
            b"{",
            b"[]",
            b"null",
            b'{"model": "alpha", "prompt": "x", "max_tokens": NaN}',
            b"[" * 5000,
            b'{"a": ' * 3000,
            b'{"model": "alpha", "prompt": "\xff"}',
        ]
    ),
    completion_bodies.map(lambda body: json.dumps(body).encode()[:-1]),  # truncated
)


def encode(body) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate goes as its "\udXXX" escape


# ---- properties --------------------------------------------------------------------------------------------------
@settings(max_examples=300, **SETTINGS)
@given(body=completion_bodies)
def test_completions_never_5xx_and_match_the_schema(live, body):
    response = live.http.post("/v1/completions", content=encode(body), headers={"Content-Type": "application/json"})
    check(live, "/v1/completions", "post", response)


@settings(max_examples=200, **SETTINGS)
@given(body=chat_bodies)
def test_chat_never_5xx_and_match_the_schema(live, body):
    response = live.http.post(
        "/v1/chat/completions", content=encode(body), headers={"Content-Type": "application/json"}
    )
    check(live, "/v1/chat/completions", "post", response)


@settings(max_examples=80, **SETTINGS)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/adapters"]),
    raw=raw_bodies,
    content_type=st.sampled_from(["application/json", "text/plain", None]),
)
def test_raw_bodies_never_5xx(live, path, raw, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = live.http.post(path, content=raw, headers=headers)
    check(live, path, "post", response)


@settings(max_examples=60, **SETTINGS)
@given(body=adapter_bodies, name=adapter_names)
def test_adapter_admin_never_5xx(live, body, name):
    response = live.http.post("/v1/adapters", content=encode(body), headers={"Content-Type": "application/json"})
    check(live, "/v1/adapters", "post", response)
    if not name:
        return  # "/v1/models/" is the list's address with a trailing slash (a redirect), not a name
    quoted = quote(name.encode("utf-8", "surrogatepass"), safe="")
    if name not in ("alpha", "gamma"):
        check(live, "/v1/adapters/{name}", "delete", live.http.delete("/v1/adapters/" + quoted))
    check(live, "/v1/models/{name}", "get", live.http.get("/v1/models/" + quoted))


tokenize_bodies = st.fixed_dictionaries(
    {"model": VALID["model"]},
    optional={
        "prompt": clean | texts | anything,
        "messages": CHAT["messages"] | WRONG["messages"],
        "add_special_tokens": st.booleans() | anything,
        "extra": anything,
    },
)
detokenize_bodies = st.fixed_dictionaries(
    {"model": VALID["model"] | WRONG["model"]},
    optional={"tokens": token_ids | st.lists(st.integers(), max_size=4) | anything, "extra": anything},
)


@settings(max_examples=60, **SETTINGS)
@given(tok=tokenize_bodies, detok=detokenize_bodies)
def test_tokenize_and_detokenize_never_5xx(live, tok, detok):
    for path, body in (("/tokenize", tok), ("/detokenize", detok)):
        response = live.http.post(path, content=encode(body), headers={"Content-Type": "application/json"})
        check(live, path, "post", response)


def test_model_list_health_and_rescan_match_the_schema(live):
    check(live, "/v1/models", "get", live.http.get("/v1/models"))
    check(live, "/health", "get", live.http.get("/health"))
    check(live, "/v1/adapters/rescan", "post", live.http.post("/v1/adapters/rescan"))
    assert re.match(r"3\.\d+\.\d+", live.doc["openapi"])
