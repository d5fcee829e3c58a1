"""The published /openapi.json and the server agree, both ways, on what a request may look like.

Bodies are generated from the published request schemas themselves (a small JSON Schema -> hypothesis translation
below, for the keywords those schemas use), narrowed to what this test server can serve (its model names, its
vocabulary, --max-tokens-cap, its queue: limits no schema can know), then some are spoiled field by field. Each body
is classified by a JSON Schema validator against the published schema, plus the rules the schema states in words
(valid Unicode, nesting depth, best_of >= n, no best_of > n with stream), and:

- a body the published schema refuses is a 400;
- a body it accepts that is within the narrowed limits is served (200 / 201; 409 for a name clash).

Bounded and derandomised: a tiny random model, max_tokens capped at 8.
"""

import copy
import json
import re

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, validators
from serve_helpers import LiveServer, make_adapter

from softprompt import create_app
from softprompt.serve.body import MAX_JSON_DEPTH

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
SERVED = ["alpha", "gamma", "spare", "base"]
CAP = 8


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("agree-adapters")
    make_adapter(tiny, folder, "alpha", "human-assistant", 3, seed=0)
    make_adapter(tiny, folder, "gamma", "Q: {instruction}\nA:", 2, seed=1)
    make_adapter(tiny, folder, "spare", "chat", 2, seed=2)
    app = create_app(tiny, folder, max_tokens_cap=CAP, max_batch=8, max_queue=8, allow_admin=True)
    with LiveServer(app) as server:
        server.http = httpx.Client(base_url=server.url, timeout=60)
        server.doc = server.http.get("/openapi.json").json()
        server.vocab = server.state.vocab_size()
        server.narrow = narrowed(server.doc["components"]["schemas"], server.vocab)
        yield server
        server.http.close()


# ---- classifying a body by the published schema ------------------------------------------------------------------
def _pattern(validator, pattern, instance, schema):
    """JSON Schema patterns are ECMA-262 regular expressions, where `$` is the very end (Python's `re.search`, which
    jsonschema uses, also lets `$` match before a final newline)."""
    if isinstance(instance, str) and not re.search(
        pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern, instance
    ):
        from jsonschema.exceptions import ValidationError

        yield ValidationError(f"{instance!r} does not match {pattern!r}")


Validator = validators.extend(Draft202012Validator, {"pattern": _pattern})


def schema_valid(components: dict, name: str, body) -> bool:
    return Validator({"$ref": f"#/components/schemas/{name}", "components": {"schemas": components}}).is_valid(body)


def stated_rules_hold(name: str, body) -> bool:
    """The rules the published schema states in its descriptions (JSON Schema cannot express them)."""
    stack = [(body, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str) and re.search("[\ud800-\udfff]", value):
            return False
        if isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                return False
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and re.search("[\ud800-\udfff]", key):
                    return False
                stack.append((item, depth + 1))
    if name == "CompletionRequest" and isinstance(body, dict):
        n, best_of = body.get("n", 1), body.get("best_of")
        if isinstance(n, int) and isinstance(best_of, int) and not isinstance(best_of, bool):
            if best_of < n or (best_of > n and body.get("stream") is True):
                return False
    return True


# ---- generating bodies from a schema -----------------------------------------------------------------------------
text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 200) | st.floats(-3, 3) | text,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(text, inner, max_size=2),
    max_leaves=4,
)


def from_schema(schema: dict, components: dict) -> st.SearchStrategy:
    """Values shaped by `schema` (the keywords of the published request schemas; `allOf` / `if` / `oneOf` rules
    are not enforced here: the classification decides)."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema or ("oneOf" in schema and "type" not in schema):
        return st.one_of([from_schema(branch, components) for branch in schema.get("anyOf") or schema["oneOf"]])
    kind = schema.get("type")
    if kind is None:
        return json_values
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
        return st.floats(low, high, exclude_min="exclusiveMinimum" in schema) | st.integers(
            None if low is None else int(low) + 1, None if high is None else int(high)
        )
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True).filter(
                lambda s: len(s) <= schema.get("maxLength", 64)
            )
        return st.text(
            alphabet=st.characters(codec="utf-8"),
            min_size=schema.get("minLength", 0),
            max_size=min(schema.get("maxLength", 12), 12),
        )
    if kind == "array":
        return st.lists(
            from_schema(schema.get("items", {}), components),
            min_size=schema.get("minItems", 0),
            max_size=min(schema.get("maxItems", 3), 3),
        )
    return _object(schema, components)


def _object(schema: dict, components: dict) -> st.SearchStrategy:
    props = schema.get("properties")
    if props:
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v, components) for k, v in props.items() if k in required},
            optional={k: from_schema(v, components) for k, v in props.items() if k not in required},
        )
    values = schema.get("additionalProperties", True)
    names = schema.get("propertyNames", {})
    keys = st.from_regex(names["pattern"], fullmatch=True) if "pattern" in names else text
    return st.dictionaries(
        keys,
        json_values if values is True else from_schema(values, components),
        max_size=min(schema.get("maxProperties", 2), 2),
    )


def narrowed(components: dict, vocab: int) -> dict:
    """The published schemas narrowed to what this server can serve (every narrowing is a limit of the server,
    not of the schema: served names, vocabulary, --max-tokens-cap, the queue, a short context)."""
    c = copy.deepcopy(components)
    ids = {
        "type": "array",
        "minItems": 1,
        "maxItems": 5,
        "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1},
    }
    bias = {
        "anyOf": [
            {
                "type": "object",
                "propertyNames": {"pattern": "^[0-9]{1,2}$"},
                "maxProperties": 2,
                "additionalProperties": c["CompletionRequest"]["properties"]["logit_bias"]["anyOf"][0][
                    "additionalProperties"
                ],
            },
            {"type": "null"},
        ]
    }
    for name in ("CompletionRequest", "ChatRequest", "TokenizeRequest", "DetokenizeRequest"):
        c[name]["properties"]["model"] = {"enum": SERVED}
    for name in ("CompletionRequest", "ChatRequest"):
        props = c[name]["properties"]
        props["n"] = {"type": "integer", "minimum": 1, "maximum": 2}
        props["logit_bias"] = bias
        low = 0 if name == "CompletionRequest" else 1
        props["max_tokens"] = {"anyOf": [{"type": "integer", "minimum": low, "maximum": CAP}, {"type": "null"}]}
    chat = c["ChatRequest"]["properties"]
    chat["max_completion_tokens"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": CAP}, {"type": "null"}]}
    completion = c["CompletionRequest"]["properties"]
    completion["best_of"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 3}, {"type": "null"}]}
    completion["prompt"]["anyOf"][2] = ids
    completion["prompt"]["anyOf"][3] = {"type": "array", "minItems": 1, "maxItems": 3, "items": ids}
    c["DetokenizeRequest"]["properties"]["tokens"] = {**ids, "minItems": 0}
    c["AdapterAdd"]["properties"]["path"] = {"enum": ["spare", "gamma"]}
    c["AdapterAdd"]["required"] = ["name", "path"]
    return c


def with_a_user_message(body):
    """Templates other than the model's chat template need a user turn: that depends on the adapter, not on the
    schema, so the narrowed bodies end with one."""
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        body = {**body, "messages": [*body["messages"], {"role": "user", "content": "hi"}]}
    return body


wrong_values = st.one_of(
    json_values,
    st.sampled_from(
        [
            "\ud800",
            -1,
            2**64,
            1.5,
            "",
            [],
            [[]],
            [""],
            {},
            {"type": "image_url"},
            [-1],
            "auto",
            "../x",
            "a..b",
            "a\n",
            {"0x1": 1},
            {"1": 101},
            [{"type": "text"}],
            json.loads("[" * 40 + "]" * 40),
        ]
    ),
)


def spoiled(bodies: st.SearchStrategy, fields: list[str]) -> st.SearchStrategy:
    """A body with one field replaced by a wrong-looking value, or removed."""

    def spoil(pair):
        body, field = pair
        return wrong_values.map(lambda v: {**body, field: v}) | st.just({k: v for k, v in body.items() if k != field})

    return st.tuples(bodies, st.sampled_from(fields)).flatmap(spoil)


def bodies_for(live, name: str) -> st.SearchStrategy:
    components = live.doc["components"]["schemas"]
    made = from_schema(live.narrow[name], live.narrow).map(with_a_user_message)
    fields = sorted(components[name]["properties"]) + ["unknown"]
    return st.one_of(made, made, spoiled(made, fields))


def check_agreement(live, name: str, path: str, body, served: tuple[int, ...] = (200,)) -> None:
    components = live.doc["components"]["schemas"]
    published = schema_valid(components, name, body) and stated_rules_hold(name, body)
    within = published and schema_valid(live.narrow, name, body)
    response = live.http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    if not published:
        assert response.status_code == 400, (body, response.status_code, response.text)
    elif within:
        assert response.status_code in served, (body, response.status_code, response.text)
    else:
        assert response.status_code < 500, (body, response.text)


# ---- properties --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strategies(live):
    return {
        name: bodies_for(live, name)
        for name in ("CompletionRequest", "ChatRequest", "TokenizeRequest", "DetokenizeRequest", "AdapterAdd")
    }


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_completions_schema_and_server_agree(live, strategies, data):
    check_agreement(live, "CompletionRequest", "/v1/completions", data.draw(strategies["CompletionRequest"]))


@settings(max_examples=70, **SETTINGS)
@given(data=st.data())
def test_chat_schema_and_server_agree(live, strategies, data):
    check_agreement(live, "ChatRequest", "/v1/chat/completions", data.draw(strategies["ChatRequest"]))


@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_tokenize_detokenize_and_adapters_schema_and_server_agree(live, strategies, data):
    check_agreement(live, "TokenizeRequest", "/tokenize", data.draw(strategies["TokenizeRequest"]))
    check_agreement(live, "DetokenizeRequest", "/detokenize", data.draw(strategies["DetokenizeRequest"]))
    body = data.draw(strategies["AdapterAdd"])
    if isinstance(body, dict) and body.get("name") not in SERVED:  # keep the served names for the other tests
        check_agreement(live, "AdapterAdd", "/v1/adapters", body, served=(201, 409))


# ---- the cases of issue 24, item 7, one by one -------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, path, body, param, message",
    [
        (
            "TokenizeRequest",
            "/tokenize",
            {"model": "alpha", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            "prompt",
            "give exactly one of prompt or messages",
        ),
        ("TokenizeRequest", "/tokenize", {"model": "alpha"}, "prompt", "give exactly one of prompt or messages"),
        ("AdapterAdd", "/v1/adapters", {"name": "a..b", "path": "spare"}, None, "invalid adapter name 'a..b'"),
        ("AdapterAdd", "/v1/adapters", {"name": "x\n", "path": "spare"}, None, "invalid adapter name 'x\\n'"),
        (
            "CompletionRequest",
            "/v1/completions",
            {"model": "alpha", "prompt": "x", "logit_bias": {"0x1": 1}},
            "logit_bias",
            "keys are token ids written as strings",
        ),
        (
            "CompletionRequest",
            "/v1/completions",
            {"model": "alpha", "prompt": "x", "logit_bias": {"12\n": 1}},
            "logit_bias",
            "keys are token ids written as strings",
        ),
        (
            "CompletionRequest",
            "/v1/completions",
            {"model": "alpha", "prompt": []},
            "prompt",
            "an empty list has nothing to complete",
        ),
        (
            "CompletionRequest",
            "/v1/completions",
            {"model": "alpha", "prompt": [[3], []]},
            "prompt.1",
            "prompt is empty",
        ),
        ("CompletionRequest", "/v1/completions", {"model": "alpha", "prompt": ""}, "prompt", "prompt is empty"),
        ("DetokenizeRequest", "/detokenize", {"model": "alpha", "tokens": [3, -1]}, "tokens", "token id -1 is outside"),
        (
            "ChatRequest",
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"},
            "tool_choice",
            "Invalid value for 'tool_choice': not supported (tools are not supported)",
        ),
        (
            "ChatRequest",
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "none"},
            "tool_choice",
            "not supported",
        ),
        (
            "CompletionRequest",
            "/v1/completions",
            {
                "model": "alpha",
                "prompt": "x",
                "stop": [
                    "",
                ]
                * 17,
            },
            "stop",
            "at most 16 stop strings",
        ),
    ],
)
def test_what_the_server_refuses_the_schema_refuses(live, name, path, body, param, message):
    assert not schema_valid(live.doc["components"]["schemas"], name, body)
    response = live.http.post(path, json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and message in error["message"], response.text


def test_the_delete_path_publishes_the_adapter_name_rule(live):
    (parameter,) = live.doc["paths"]["/v1/adapters/{name}"]["delete"]["parameters"]
    assert (
        parameter["schema"]["pattern"]
        == live.doc["components"]["schemas"]["AdapterAdd"]["properties"]["name"]["pattern"]
        and parameter["schema"]["maxLength"] == 64
    )
    assert live.http.delete("/v1/adapters/a..b").status_code == 400
    assert live.http.delete("/v1/adapters/never-served").status_code == 404


def test_integral_numbers_are_integers_as_the_schema_says(live):
    body = {"model": "alpha", "prompt": [3.0, 4], "max_tokens": 2.0, "n": 1e0, "temperature": 0}
    assert schema_valid(live.doc["components"]["schemas"], "CompletionRequest", body)
    response = live.http.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 2
    assert live.http.post("/v1/completions", json={**body, "max_tokens": 2.5}).status_code == 400


@pytest.mark.parametrize(
    "path, allowed",
    [
        ("/v1/adapters/rescan", "DELETE, POST"),
        ("/v1/completions", "POST"),
        ("/v1/adapters/alpha", "DELETE"),
        ("/v1/models", "GET"),
    ],
)
def test_a_405_lists_every_method_of_the_path(live, path, allowed):
    response = live.http.request("OPTIONS", path)
    assert response.status_code == 405 and response.headers["allow"] == allowed


def test_a_client_leaving_mid_body_logs_no_traceback(live):
    import logging
    import socket
    import time

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    for name in ("uvicorn.error", "uvicorn", ""):
        logging.getLogger(name).addHandler(handler)
    try:
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"model": "alpha",'
            )
            time.sleep(0.2)
        time.sleep(0.3)
        assert live.http.get("/health").status_code == 200
    finally:
        for name in ("uvicorn.error", "uvicorn", ""):
            logging.getLogger(name).removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR or r.exc_info] == []
