"""`softprompt serve` hardening: every mistake a client can make is a 4xx with OpenAI's error shape (never a 5xx or
a stalled event loop), adapters swap atomically under traffic, bad adapter folders never block the others, and the
network-facing defaults (admin opt-in, JSON-only bodies, Host and Origin checks) hold.

The real server on loopback (BackgroundServer) with the tiny random model and tiny adapters, as test_serve.py.
"""

import concurrent.futures
import json
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from serve_helpers import LiveServer, error_of, make_adapter

import softprompt.serve.config as serve_config
import softprompt.serve.validation as state_module
from softprompt import create_app
from softprompt.data.templates import Template, encode_text
from softprompt.formats.adapter import load_adapter
from softprompt.inference.batch import GenerationRequest
from softprompt.inference.engine import Engine
from softprompt.serve.protocol import TEMPERATURE_EPSILON, TOP_P_EPSILON, CompletionRequest
from softprompt.serve.security import check_exposure

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def adapters_dir(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny, folder, "alpha", "human-assistant", 4, seed=0)
    make_adapter(tiny, folder, "gamma", "Q: {instruction}\nA:", 3, seed=2)
    return folder


@pytest.fixture(scope="module")
def server(tiny, adapters_dir):
    with LiveServer(create_app(tiny, adapters_dir, max_tokens_cap=64, max_batch=2, max_queue=3)) as live:
        yield live


def post_raw(url: str, raw: str | bytes, headers=JSON, **kw) -> httpx.Response:
    return httpx.post(url, content=raw if isinstance(raw, bytes) else raw.encode(), headers=headers, timeout=60, **kw)


# ---- request content: 400s that used to be 500s -----------------------------------------------------------------
@pytest.mark.parametrize(
    "path,raw,param",
    [
        ("/v1/completions", '{"model": "alpha", "prompt": "abc\\ud800def", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"model": "alpha", "prompt": ["ok", "abc\\udfffdef"], "max_tokens": 2}', "prompt.1"),
        ("/v1/completions", '{"model": "alpha", "prompt": "x", "stop": ["\\ud800"], "max_tokens": 2}', "stop.0"),
        ("/v1/completions", '{"model": "al\\ud800pha", "prompt": "x", "max_tokens": 2}', "model"),
        ("/v1/completions", '{"model": "alpha", "prompt": "abc\\ud800def", "max_tokens": 2, "stream": true}', "prompt"),
        (
            "/v1/chat/completions",
            '{"model": "alpha", "messages": [{"role": "user", "content": "hi\\ud800"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"model": "alpha", "messages": [{"role": "user", "content": '
            '[{"type": "text", "text": "\\udc00"}]}], "stream": true}',
            "messages.0.content.0.text",
        ),
    ],
)
def test_lone_surrogate_is_a_400_naming_the_field(server, path, raw, param):
    r = post_raw(server.url + path, raw)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param and "surrogate" in err["message"] and err["type"] == "invalid_request_error"


def test_lone_surrogate_in_a_key_is_a_400(server):
    r = post_raw(server.url + "/v1/completions", '{"model": "alpha", "prompt": "x", "\\ud800": 1}')
    assert r.status_code == 400 and "surrogate" in error_of(r)["message"]
    r = post_raw(server.url + "/v1/completions", '{"model": "alpha", "prompt": "x", "metadata": {"\\ud800": 1}}')
    assert r.status_code == 400 and error_of(r)["param"] == "metadata"


def test_deeply_nested_json_is_a_400(server):
    r = post_raw(server.url + "/v1/completions", "[" * 100000)
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    deep = '{"model": "alpha", "prompt": "x", "metadata": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}"
    r = post_raw(server.url + "/v1/completions", deep)
    assert r.status_code == 400, r.text
    assert "nested too deeply" in error_of(r)["message"]
    medium = '{"model": "alpha", "prompt": "x", "metadata": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}"
    r = post_raw(server.url + "/v1/chat/completions", medium)
    assert r.status_code == 400 and error_of(r)["param"] == "metadata"
    shallow = {"model": "alpha", "prompt": "x", "max_tokens": 2, "metadata": {"a": {"b": [1, {"c": "d"}]}}}
    assert httpx.post(server.url + "/v1/completions", json=shallow, timeout=60).status_code == 200


def test_nan_and_huge_numbers_are_400(server):
    r = post_raw(server.url + "/v1/completions", '{"model": "alpha", "prompt": "x", "temperature": NaN}')
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    r = post_raw(server.url + "/v1/completions", '{"model": "alpha", "prompt": "x", "seed": ' + "9" * 5000 + "}")
    assert r.status_code == 400
    r = post_raw(server.url + "/v1/completions", b'{"model": "alpha", "prompt": "\xff\xfe"}')
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", "4"),
        ("max_tokens", True),
        ("max_tokens", 2.5),
        ("max_tokens", 0),
        ("temperature", "0.5"),
        ("temperature", True),
        ("temperature", 2.5),
        ("top_p", 0),
        ("top_k", -1),
        ("top_k", 2**31),
        ("stream", "yes"),
        ("stream", 1),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("seed", 1.5),
        ("seed", "7"),
        ("n", True),
        ("stop", [1]),
        ("prompt", 5),
        ("prompt", [1, "a"]),
        ("prompt", [[1], "a"]),
        ("prompt", [True]),
        ("model", 3),
        ("user", 5),
        ("presence_penalty", "0"),
    ],
)
def test_strict_types_and_ranges_name_the_field(server, field, value):
    body = {"model": "alpha", "prompt": "x", "max_tokens": 2, field: value}
    for stream in (False, True):
        if field == "stream":
            stream = value
        r = httpx.post(server.url + "/v1/completions", json={**body, "stream": stream}, timeout=60)
        assert r.status_code == 400, (field, value, r.text)
        err = error_of(r)
        assert err["param"] is not None and err["param"].split(".")[0] == field, (field, value, err)


def test_seed_edges_are_served(server):
    for seed in (0, -(2**63), 2**64 - 1):
        body = {"model": "alpha", "prompt": "x", "max_tokens": 3, "temperature": 1.0, "seed": seed}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200, seed
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            text = "".join(r.iter_lines())
        assert r.status_code == 200 and '"error"' not in text and text.endswith("data: [DONE]")


def test_max_completion_tokens_names_itself(server):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 65}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and error_of(r)["param"] == "max_completion_tokens"


# ---- sampling at the numeric edges -------------------------------------------------------------------------------
def test_tiny_temperature_and_top_p_are_greedy(server):
    def text(**kw):
        body = {"model": "gamma", "prompt": "abc", "max_tokens": 12, "seed": 3, **kw}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    greedy = text(temperature=0)
    for t in (1e-38, 1e-39, 5e-324, TEMPERATURE_EPSILON / 2):
        assert text(temperature=t) == greedy, t
    for p in (1e-46, 5e-324, TOP_P_EPSILON / 2):
        assert text(temperature=1.0, top_p=p) == greedy, p


def test_sampling_settings_unit():
    def body(**kw):
        return CompletionRequest.model_validate({"model": "m", "prompt": "x", **kw})

    assert body(temperature=0).sampling() == (0.0, 0, 1.0)
    assert body(temperature=1e-30, top_k=5, top_p=0.5).sampling() == (0.0, 0, 1.0)
    assert body(temperature=0.7, top_p=1e-40).sampling() == (0.7, 1, 1.0)
    assert body(temperature=0.7, top_k=5, top_p=0.5).sampling() == (0.7, 5, 0.5)


# ---- capacity ----------------------------------------------------------------------------------------------------
def test_more_prompts_than_the_server_can_ever_hold_is_400(server):
    body = {"model": "alpha", "max_tokens": 2, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json={**body, "prompt": ["p"] * 6}, timeout=60)  # 2 + 3 < 6
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == "prompt" and "can never be served" in err["message"] and "at most 5" in err["message"]
    r = httpx.post(server.url + "/v1/completions", json={**body, "prompt": [f"p{i}" for i in range(5)]}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 5
    r = httpx.post(server.url + "/v1/completions", json={**body, "prompt": ["p"] * 65, "stream": True}, timeout=60)
    assert r.status_code == 400


# ---- the event loop stays free -----------------------------------------------------------------------------------
def test_request_body_limit_413(tiny, adapters_dir):
    with LiveServer(create_app(tiny, adapters_dir, max_request_bytes=2000)) as live:
        big = {"model": "alpha", "prompt": "x" * 5000, "max_tokens": 2}
        started = time.monotonic()
        r = httpx.post(live.url + "/v1/completions", json=big, timeout=60)
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
        assert "at most 2000 bytes" in error_of(r)["message"]

        def chunks():  # no Content-Length: the body is counted while it is read
            yield b'{"model": "alpha", "prompt": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}'

        r = httpx.post(live.url + "/v1/completions", content=chunks(), headers=JSON, timeout=60)
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
        assert time.monotonic() - started < 10
        small = {"model": "alpha", "prompt": "x" * 100, "max_tokens": 2}
        assert httpx.post(live.url + "/v1/completions", json=small, timeout=60).status_code == 200
    assert serve_config.DEFAULT_MAX_REQUEST_BYTES <= 16 * 1024 * 1024


def test_default_body_limit_refuses_50_mb_at_once(server):
    started = time.monotonic()
    raw = b'{"model": "alpha", "prompt": "' + b"y" * (50 * 1024 * 1024) + b'"}'
    try:
        r = post_raw(server.url + "/v1/completions", raw)
        assert r.status_code == 413
    except httpx.TransportError:  # the server may close the connection while the client still sends
        pass
    assert time.monotonic() - started < 15
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_tokenising_runs_off_the_event_loop(server, monkeypatch):
    real = state_module.encode_text
    entered = threading.Event()

    def slow_encode(tokenizer, text):
        if text.startswith("SLOW"):
            entered.set()
            time.sleep(2.0)
        return real(tokenizer, text)

    monkeypatch.setattr(state_module, "encode_text", slow_encode)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(
            httpx.post,
            server.url + "/v1/completions",
            json={"model": "alpha", "prompt": "SLOW x", "max_tokens": 2},
            timeout=60,
        )
        assert entered.wait(20)
        started = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        ok = httpx.post(
            server.url + "/v1/completions", json={"model": "alpha", "prompt": "fast", "max_tokens": 2}, timeout=10
        )
        assert ok.status_code == 200
        assert time.monotonic() - started < 1.5, "the event loop was blocked by tokenising"
        assert slow.result().status_code == 200


def test_client_mistakes_deep_inside_are_never_5xx(server, monkeypatch):
    def broken(tokenizer, text):
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")

    monkeypatch.setattr(state_module, "encode_text", broken)
    r = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "x"}, timeout=60)
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    monkeypatch.undo()

    import jinja2

    def refuse(self, messages, tokenizer=None):
        raise jinja2.exceptions.TemplateError("Conversation roles must alternate user/assistant/user/assistant/...")

    monkeypatch.setattr(Template, "chat_prompt", refuse)
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "alpha", "messages": [{"role": "user", "content": "x"}]},
        timeout=60,
    )
    assert r.status_code == 400 and error_of(r)["param"] == "messages" and "alternate" in error_of(r)["message"]


# ---- adapters: atomic swaps under traffic ------------------------------------------------------------------------
def _traffic(url: str, model: str, prompts: list[str], until_done: threading.Event, change, max_changes: int = 200):
    """Send every prompt (4 threads) while `change()` runs in a loop; return (responses, number of changes)."""
    changes = 0

    def changer():
        nonlocal changes
        while not until_done.is_set() and changes < max_changes:
            change()
            changes += 1

    def send(prompt):
        return httpx.post(
            url + "/v1/completions",
            json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0},
            timeout=60,
        )

    thread = threading.Thread(target=changer)
    thread.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(send, prompts))
    finally:
        until_done.set()
        thread.join(60)
    return responses, changes


def test_replacing_an_adapter_under_traffic_never_fails_a_request(tiny, tmp_path):
    folder = tmp_path / "adapters"
    make_adapter(tiny, folder, "b", "human-assistant", 3, seed=21)
    make_adapter(tiny, folder, "b2", "human-assistant", 3, seed=22)
    engine = Engine(tiny, {"b": load_adapter(folder / "b", tiny), "b2": load_adapter(folder / "b2", tiny)})
    prompts = [f"q{i}" for i in range(48)]
    refs = {
        p: {
            engine.generate(
                [GenerationRequest(encode_text(tiny.tokenizer, p), adapter=a, max_new_tokens=4)], batch_size=1
            )[0].text
            for a in ("b", "b2")
        }
        for p in prompts
    }
    with LiveServer(create_app(tiny, folder, allow_admin=True)) as live:
        flip = iter(range(10**6))

        def replace():
            path = "b2" if next(flip) % 2 == 0 else "b"
            r = httpx.post(live.url + "/v1/adapters", json={"name": "b", "path": path, "replace": True}, timeout=60)
            assert r.status_code == 201, r.text

        responses, changes = _traffic(live.url, "b", prompts, threading.Event(), replace)
    errors = [(r.status_code, r.text) for r in responses if r.status_code != 200]
    assert errors == [] and changes >= 3
    for prompt, r in zip(prompts, responses):
        assert r.json()["choices"][0]["text"] in refs[prompt]  # the old or the new prompt, never a mix-up


def test_rescan_reload_under_traffic_never_fails_a_request(tiny, tmp_path):
    folder = tmp_path / "adapters"
    make_adapter(tiny, folder, "b", "human-assistant", 3, seed=21)
    weights = folder / "b" / "adapter_model.safetensors"
    with LiveServer(create_app(tiny, folder, allow_admin=True)) as live:
        stamp = iter(range(1, 10**6))

        def reload():
            t = 1_700_000_000 + next(stamp)
            os.utime(weights, (t, t))  # a new stamp: rescan reloads `b`
            r = httpx.post(live.url + "/v1/adapters/rescan", timeout=60)
            assert r.status_code == 200 and r.json()["reloaded"] == ["b"], r.text

        responses, changes = _traffic(live.url, "b", [f"q{i}" for i in range(48)], threading.Event(), reload)
    assert [(r.status_code, r.text) for r in responses if r.status_code != 200] == [] and changes >= 3


def test_registry_swap_keeps_the_name_in_the_cache(tiny, tmp_path):
    """Unit check of the race's cause: during a replace, the cache never lacks the name."""
    from softprompt.inference.prompt_cache import PromptCache
    from softprompt.serve.registry import AdapterRegistry

    folder = tmp_path / "adapters"
    make_adapter(tiny, folder, "b", "human-assistant", 2, seed=1)
    make_adapter(tiny, folder, "c", "human-assistant", 2, seed=2)
    cache = PromptCache(tiny)
    registry = AdapterRegistry(tiny, cache, folder)
    registry.add("b")
    removed = []
    real_remove = cache.remove
    cache.remove = lambda name: (removed.append(name), real_remove(name))[1]
    registry.add("b", path="c", replace=True)
    assert removed == [] and Path(cache.entry("b").adapter.path).name == "c"
    assert registry.rescan()["removed"] == [] and Path(cache.entry("b").adapter.path).name == "b"  # reloaded in place


# ---- adapters: bad folders never block the others ----------------------------------------------------------------
def _bad_folders(tiny, folder: Path, outside: Path) -> dict[str, str]:
    """Bad adapter folders next to good ones; returns name -> a word the reason must contain."""
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 2,
        "token_dim": tiny.hidden_size,
    }

    def folder_with(name, tensor=None, cfg=None, raw_weights=None):
        (folder / name).mkdir(parents=True)
        (folder / name / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg or config))
        if raw_weights is not None:
            (folder / name / "adapter_model.safetensors").write_bytes(raw_weights)
        elif tensor is not None:
            save_file({"prompt_embeddings": tensor}, str(folder / name / "adapter_model.safetensors"))

    folder_with("corrupt", raw_weights=b"\x00\x01 not a safetensors file")
    folder_with("not-json", cfg="{this is not json", tensor=torch.zeros(2, tiny.hidden_size))
    folder_with("json-list", cfg="[1, 2]", tensor=torch.zeros(2, tiny.hidden_size))
    folder_with("wrong-size", tensor=torch.zeros(2, tiny.hidden_size + 3))
    folder_with("integers", tensor=torch.zeros(2, tiny.hidden_size, dtype=torch.int64))
    folder_with("nan", tensor=torch.full((2, tiny.hidden_size), float("nan")))
    folder_with("no-weights")
    (folder / "weights-dir").mkdir()
    (folder / "weights-dir" / "adapter_config.json").write_text(json.dumps(config))
    (folder / "weights-dir" / "adapter_model.safetensors").mkdir()
    make_adapter(tiny, outside, "secret", "human-assistant", 2, seed=9)
    (folder / "sneaky").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / "sneaky" / name).symlink_to(outside / "secret" / name)
    return {
        "corrupt": "",
        "not-json": "",
        "json-list": "",
        "wrong-size": "",
        "integers": "",
        "nan": "",
        "no-weights": "",
        "weights-dir": "",
        "sneaky": "symbolic link",
    }


def test_bad_adapter_folders_are_skipped_with_a_reason(tiny, tmp_path):
    folder, outside = tmp_path / "adapters", tmp_path / "elsewhere"
    make_adapter(tiny, folder, "good", "human-assistant", 2, seed=1)
    bad = _bad_folders(tiny, folder, outside)
    with LiveServer(create_app(tiny, folder, allow_admin=True)) as live:
        skipped = live.state.scan["skipped"]
        for name, word in bad.items():
            assert name in skipped and word in skipped[name], (name, skipped)
            assert str(tmp_path) not in skipped[name], skipped[name]
        assert [m["id"] for m in httpx.get(live.url + "/v1/models").json()["data"]] == ["base", "good"]
        r = httpx.post(live.url + "/v1/completions", json={"model": "good", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200

        make_adapter(tiny, folder, "later", "human-assistant", 2, seed=3)
        report = httpx.post(live.url + "/v1/adapters/rescan", timeout=60).json()
        assert report["added"] == ["later"] and set(bad) <= set(report["skipped"])
        assert str(tmp_path) not in json.dumps(report)

        for name, word in bad.items():
            r = httpx.post(live.url + "/v1/adapters", json={"name": "x" + name}, timeout=60)
            assert r.status_code == 404  # no folder of that name
            r = httpx.post(live.url + "/v1/adapters", json={"name": "x", "path": name}, timeout=60)
            assert r.status_code == 400, (name, r.text)
            assert word in error_of(r)["message"] and str(tmp_path) not in r.text, (name, r.text)
        names = [m["id"] for m in httpx.get(live.url + "/v1/models").json()["data"]]
        assert names == ["base", "good", "later"]


# ---- security defaults -------------------------------------------------------------------------------------------
def test_admin_endpoints_are_opt_in(tiny, adapters_dir):
    with LiveServer(create_app(tiny, adapters_dir)) as live:
        for method, path, body in [
            ("POST", "/v1/adapters", {"name": "alpha", "replace": True}),
            ("DELETE", "/v1/adapters/alpha", None),
            ("POST", "/v1/adapters/rescan", None),
        ]:
            r = httpx.request(method, live.url + path, json=body)
            assert r.status_code == 403, (path, r.text)
            err = error_of(r)
            assert "--allow-admin" in err["message"] and err["code"] == "admin_disabled"
        assert "alpha" in [m["id"] for m in httpx.get(live.url + "/v1/models").json()["data"]]
    with LiveServer(create_app(tiny, adapters_dir, allow_admin=True, api_key="k3y")) as live:
        assert httpx.post(live.url + "/v1/adapters/rescan").status_code == 401
        r = httpx.post(live.url + "/v1/adapters/rescan", headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200 and r.json()["skipped"] == {}
        assert httpx.get(live.url + "/openapi.json").status_code == 200  # open: it carries no secrets
        assert httpx.get(live.url + "/v1/models").status_code == 401


def test_cross_site_requests_are_refused(server):
    url = server.url + "/v1/completions"
    body = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 2})
    before = server.state.scheduler.snapshot()["submitted"]
    r = post_raw(url, body, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert r.status_code in (403, 415) and error_of(r)
    r = post_raw(url, body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type"
    r = post_raw(url, body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = post_raw(url, body, headers={})  # no Content-Type at all, but a body
    assert r.status_code == 415
    r = post_raw(url, body, headers={**JSON, "Origin": "http://evil.example"})
    assert r.status_code == 403 and error_of(r)["code"] == "origin_not_allowed"
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "null"})
    assert r.status_code == 403
    assert server.state.scheduler.snapshot()["submitted"] == before  # none reached the worker
    r = post_raw(url, body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_host_header_is_checked_against_dns_rebinding(server):
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io"):
        r = httpx.get(server.url + "/v1/models", headers={"Host": host})
        assert r.status_code == 421 and error_of(r)["code"] == "invalid_host", host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(server.url + "/v1/models", headers={"Host": host}).status_code == 200, host
    assert httpx.get(server.url + "/health", headers={"Host": "evil.example"}).status_code == 200


def test_allowed_hosts_and_cors_are_opt_in(tiny, adapters_dir):
    app = create_app(tiny, adapters_dir, allowed_hosts=["models.internal"], allow_origins=["http://app.example"])
    with LiveServer(app) as live:
        assert httpx.get(live.url + "/v1/models", headers={"Host": "models.internal:80"}).status_code == 200
        assert httpx.get(live.url + "/v1/models", headers={"Host": "other.internal"}).status_code == 421
        r = httpx.post(
            live.url + "/v1/completions",
            json={"model": "alpha", "prompt": "x", "max_tokens": 2},
            headers={"Origin": "http://app.example"},
            timeout=60,
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        pre = httpx.options(
            live.url + "/v1/completions",
            headers={
                "Origin": "http://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.post(
            live.url + "/v1/completions",
            json={"model": "alpha", "prompt": "x", "max_tokens": 2},
            headers={"Origin": "http://evil.example"},
        )
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    with LiveServer(create_app(tiny, adapters_dir, allowed_hosts=["*"])) as live:
        assert httpx.get(live.url + "/v1/models", headers={"Host": "anything.example"}).status_code == 200
        r = httpx.get(live.url + "/v1/models", headers={"Origin": "http://app.example"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers  # no CORS unless asked


def test_symlinked_files_leading_outside_are_refused(tiny, tmp_path):
    folder, outside = tmp_path / "adapters", tmp_path / "elsewhere"
    make_adapter(tiny, outside, "secret", "human-assistant", 2, seed=9)
    make_adapter(tiny, folder, "inside", "human-assistant", 2, seed=8)
    (folder / "sneaky").mkdir()
    (folder / "alias").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / "sneaky" / name).symlink_to(outside / "secret" / name)
        (folder / "alias" / name).symlink_to(folder / "inside" / name)  # inside the adapters folder: fine
    with LiveServer(create_app(tiny, folder, allow_admin=True)) as live:
        assert "symbolic link leading outside" in live.state.scan["skipped"]["sneaky"]
        assert sorted(live.state.registry.names()) == ["alias", "inside"]
        r = httpx.post(live.url + "/v1/adapters", json={"name": "x", "path": "sneaky"})
        assert r.status_code == 400 and "symbolic link" in error_of(r)["message"]
        assert str(tmp_path) not in r.text


def test_check_exposure():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.5"):
        assert check_exposure(host, None, False) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(ValueError) as info:
            check_exposure(host, None, False)
        message = str(info.value)
        assert "\n" not in message and "--api-key" in message and "--allow-insecure" in message
        assert check_exposure(host, "k", False) is None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = check_exposure(host, None, True)
        assert text and "WARNING" in text and caught


# ---- /openapi.json -----------------------------------------------------------------------------------------------
def test_openapi_publishes_the_real_models(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    assert "422" not in json.dumps(doc) and "HTTPValidationError" not in doc["components"]["schemas"]
    for path, model, ok in [
        ("/v1/completions", "CompletionRequest", "200"),
        ("/v1/chat/completions", "ChatRequest", "200"),
        ("/v1/adapters", "AdapterAdd", "201"),
    ]:
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + model)
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        assert ok in op["responses"]
    gen = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert "text/event-stream" in gen["200"]["content"] and "404" in gen and "429" in gen
    assert gen["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Completion")
    schemas = doc["components"]["schemas"]
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 0}
    assert schemas["ChatRequest"]["properties"]["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert {
        "ErrorResponse",
        "ChatCompletionChunk",
        "ModelList",
        "RescanReport",
        "CompletionLogprobs",
        "ChoiceLogprobs",
        "TokenizeResponse",
    } <= set(schemas)
    # the new fields are published: a client generated from /openapi.json can use them
    assert {"logprobs", "echo", "n", "best_of", "logit_bias"} <= set(schemas["CompletionRequest"]["properties"])
    assert {"logprobs", "top_logprobs", "n"} <= set(schemas["ChatRequest"]["properties"])
    assert {"/tokenize", "/detokenize"} <= set(doc["paths"])
