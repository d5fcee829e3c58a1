"""`softprompt serve` under work that used to escape the scheduler: echo scoring is a queued, sliced, cancellable
job that counts against capacity; a request is served entirely by the adapter version it was admitted with, even
across a replace or a removal; an adapter's keys/values are computed off the worker, and one that cannot fit the
context is refused at load; a rescan that catches a folder mid-write keeps the version it serves.

Real servers on loopback (LiveServer) with the tiny random model (context 512), as test_serve.py.
"""

import os
import re
import shutil
import threading
import time

import httpx
import pytest
import torch
from helpers import tiny_base
from serve_helpers import LiveServer, error_of, make_adapter

from softprompt import create_app
from softprompt.core.models import cpu_has_native_bf16
from softprompt.core.prompt import SoftPrompt
from softprompt.data.templates import Template
from softprompt.formats.adapter import AdapterError, load_adapter, save_adapter
from softprompt.inference.prompt_cache import PromptCache
from softprompt.inference.scoring import PromptScorer, prompt_logprobs
from softprompt.vllm.export import ExportVllmConfig, export_vllm

TEXT = "abcdefghij" * 40  # 400 tokens with the character tokenizer: 4 scoring slices


@pytest.fixture()
def folder(tiny, tmp_path):
    folder = tmp_path / "adapters"
    make_adapter(tiny, folder, "a", "human-assistant", 3, seed=1)
    make_adapter(tiny, folder, "b", "human-assistant", 3, seed=2)
    return folder


def completion(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def slow(monkeypatch, cls, method: str, seconds: float, log: list | None = None, tag: str = ""):
    """Make cls.method sleep first (and note each call in `log`)."""
    real = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        if log is not None:
            log.append(tag or method)
        time.sleep(seconds)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapper)


def slow_slices(monkeypatch, seconds: float, log: list) -> None:
    """Make every scoring forward (one slice of one or several prompts) sleep first, noting it in `log`."""
    from softprompt.inference import scoring

    real = scoring._run_slices

    def wrapper(scorers):
        log.append("slice")
        time.sleep(seconds)
        return real(scorers)

    monkeypatch.setattr(scoring, "_run_slices", wrapper)


# ---- echo scoring ------------------------------------------------------------------------------------------------
def test_scored_prompts_count_against_capacity(tiny, folder):
    with LiveServer(create_app(tiny, folder, max_batch=2, max_queue=3)) as live:
        r = completion(live.url, model="a", prompt=["p q r"] * 6, max_tokens=0, echo=True, logprobs=1)
        assert r.status_code == 400, r.text
        err = error_of(r)
        assert err["param"] == "prompt" and "6 prompts to score (echo with logprobs)" in err["message"]
        assert "at most 5" in err["message"]
        r = completion(live.url, model="a", prompt=["p q r"] * 3, max_tokens=1, echo=True, logprobs=1)
        assert r.status_code == 400 and "3 prompts plus 3 prompts to score" in error_of(r)["message"]
        r = completion(live.url, model="a", prompt=["p q r"] * 5, max_tokens=0, echo=True, logprobs=1)
        assert r.status_code == 200 and len(r.json()["choices"]) == 5


def test_scoring_runs_in_slices_between_decode_steps(tiny, folder, monkeypatch):
    """A stream sent while two long prompts are scored on a two-row server is admitted at once (the prompts are
    scored together, one batched forward per slice, holding one row) and gets its tokens between the slices, not
    after them; the scores equal those of one uninterrupted run of each prompt alone."""
    from softprompt.inference.batch import DecodeBatch

    log = []
    slow_slices(monkeypatch, 0.1, log)
    slow(monkeypatch, DecodeBatch, "step", 0.0, log, "step")
    with LiveServer(create_app(tiny, folder, max_batch=2, max_queue=1)) as live:
        live.state.scheduler.share_starts = False  # two equal prompts would share their first slice (tested below)
        results = {}
        scorer = threading.Thread(
            target=lambda: results.update(
                score=completion(live.url, model="a", prompt=[TEXT, TEXT], max_tokens=0, echo=True, logprobs=2)
            )
        )
        scorer.start()
        while "slice" not in log:
            time.sleep(0.005)
        stream = completion(live.url, model="b", prompt="xy", max_tokens=3, temperature=0)
        scorer.join(60)
        assert stream.status_code == 200 and results["score"].status_code == 200
        slices = [i for i, what in enumerate(log) if what == "slice"]
        assert len(slices) == 4 and any(what == "step" for what in log[slices[0] : slices[3]])
        ids = tiny.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
        alone = [entry.logprob for entry in prompt_logprobs(tiny, live.state.cache, "a", ids, 2)]
        for choice in results["score"].json()["choices"]:
            assert choice["logprobs"]["token_logprobs"] == alone and alone[0] is None
        assert live.state.scheduler.snapshot()["score_slices"] == 4


def test_the_choices_of_one_question_share_their_start(tiny, folder):
    """lm-eval's multiple choice: one request, one context, several answers. The context's start runs once (the
    scheduler counts the tokens not run again) and every choice's log-probabilities are those of the prompt alone."""
    context = "abcdefghij" * 5  # 50 tokens with the character tokenizer: a 48-token start, 3 attention chunks
    prompts = [context + " yes", context + " no", context + " maybe"]
    with LiveServer(create_app(tiny, folder)) as live:
        r = completion(live.url, model="a", prompt=prompts, max_tokens=0, echo=True, logprobs=1)
        assert r.status_code == 200
        assert live.state.scheduler.snapshot()["score_shared_tokens"] == 48 * 2
        for text, choice in zip(prompts, sorted(r.json()["choices"], key=lambda c: c["index"])):
            ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
            alone = [entry.logprob for entry in prompt_logprobs(tiny, live.state.cache, "a", ids, 1)]
            assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(alone[1:], rel=1e-5, abs=1e-6)
            assert choice["logprobs"]["token_logprobs"][0] is None


def test_a_client_that_leaves_stops_its_scoring(tiny, folder, monkeypatch):
    log = []
    slow_slices(monkeypatch, 0.1, log)
    with LiveServer(create_app(tiny, folder)) as live:
        live.state.scheduler.score_batch = 1  # one prompt per slice: 16 slices, so "stopped early" is visible
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                live.url + "/v1/completions",
                json={"model": "a", "prompt": [TEXT] * 4, "max_tokens": 0, "echo": True, "logprobs": 1},
                timeout=0.3,
            )
        deadline = time.monotonic() + 10
        while live.state.scheduler.snapshot()["cancelled"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = live.state.scheduler.snapshot()
        assert stats["cancelled"] == 4 and stats["scoring"] == 0 and stats["waiting"] == 0
        assert len(log) < 6  # of 16 slices: dropped at the next slice after the disconnect


# ---- one adapter version per request -------------------------------------------------------------------------------
def test_a_request_is_served_by_one_adapter_version_across_a_replace_and_a_removal(tiny, folder, monkeypatch):
    """n=2 on a one-row server: the second choice waits while the first decodes; the adapter is replaced (then
    removed) meanwhile, and both choices still come from the version the request was admitted with."""
    from softprompt.inference.batch import DecodeBatch

    slow(monkeypatch, DecodeBatch, "step", 0.01)
    body = dict(model="a", prompt="hello", max_tokens=40, temperature=1.0, seed=7, n=2)  # seeded: reproducible
    with LiveServer(create_app(tiny, folder, max_batch=1, max_queue=4, allow_admin=True)) as live:
        before = [c["text"] for c in completion(live.url, **body).json()["choices"]]
        for change in ("replace", "remove"):
            out = {}
            thread = threading.Thread(target=lambda: out.update(r=completion(live.url, **body)))
            thread.start()
            deadline = time.monotonic() + 30
            while live.state.scheduler.snapshot()["running"] == 0 and time.monotonic() < deadline:
                time.sleep(0.005)  # until the first choice decodes (the second one waits for the only row)
            if change == "replace":
                r = httpx.post(live.url + "/v1/adapters", json={"name": "a", "path": "b", "replace": True}, timeout=60)
                assert r.status_code == 201
            else:
                assert httpx.delete(live.url + "/v1/adapters/a", timeout=60).status_code == 200
            thread.join(60)
            assert out["r"].status_code == 200, out["r"].text
            assert [c["text"] for c in out["r"].json()["choices"]] == before
            if change == "replace":
                after = [c["text"] for c in completion(live.url, **body).json()["choices"]]
                assert after != before  # the new version is really another adapter
                before = after


# ---- adapters: off the worker, and refused beyond the context ----------------------------------------------------
def test_an_added_adapters_keys_values_are_computed_off_the_worker(tiny, folder, monkeypatch):
    threads = []
    real = PromptCache.prepare

    def prepare(self, name, adapter):
        threads.append(threading.current_thread().name)
        return real(self, name, adapter)

    monkeypatch.setattr(PromptCache, "prepare", prepare)
    with LiveServer(create_app(tiny, folder, allow_admin=True)) as live:
        threads.clear()
        r = httpx.post(live.url + "/v1/adapters", json={"name": "c", "path": "b"}, timeout=60)
        assert r.status_code == 201 and threads and "softprompt-scheduler" not in threads
        assert completion(live.url, model="c", prompt="x", max_tokens=2).status_code == 200


def test_an_adapter_longer_than_the_context_is_refused_at_load(tiny, tmp_path):
    context = tiny.model.config.max_position_embeddings  # 512
    folder = tmp_path / "adapters"
    prompt = SoftPrompt.initialise(tiny, "random", num_virtual_tokens=context - 1, seed=0)
    save_adapter(folder / "long", prompt.embeddings, tiny, template=Template())
    message = re.escape(
        f"511 virtual tokens do not fit the base model's context of {context} tokens (at most 510: a prompt "
        "token and a generated one need room too)"
    )
    with pytest.raises(AdapterError, match=message):
        load_adapter(folder / "long", tiny)
    adapter = load_adapter(folder / "long")  # no base: nothing to check against
    with pytest.raises(AdapterError, match=message):
        PromptCache(tiny).add("long", adapter)
    with pytest.raises(AdapterError, match=message):
        export_vllm(ExportVllmConfig(adapter=str(folder / "long"), out=str(tmp_path / "out")), base=tiny)
    assert not (tmp_path / "out").exists()
    with LiveServer(create_app(tiny, folder, allow_admin=True)) as live:
        assert re.search(message, live.state.scan["skipped"]["long"])
        r = httpx.post(live.url + "/v1/adapters", json={"name": "long"}, timeout=60)
        assert r.status_code == 400 and re.search(message, error_of(r)["message"])


# ---- rescan mid-write ----------------------------------------------------------------------------------------------
def test_a_rescan_mid_write_keeps_the_served_version(tiny, folder):
    weights = folder / "a" / "adapter_model.safetensors"
    body = dict(model="a", prompt="hello", max_tokens=6, temperature=0)
    with LiveServer(create_app(tiny, folder, allow_admin=True)) as live:
        before = completion(live.url, **body).json()["choices"][0]["text"]
        good = weights.read_bytes()
        weights.write_bytes(good[: len(good) // 2])  # a writer caught half-way
        report = httpx.post(live.url + "/v1/adapters/rescan", timeout=60).json()
        assert report["removed"] == [] and "still serving the version loaded before" in report["skipped"]["a"]
        assert "corrupt or unreadable" in report["skipped"]["a"]
        assert completion(live.url, **body).json()["choices"][0]["text"] == before
        weights.unlink()  # the next moment: the file is gone
        report = httpx.post(live.url + "/v1/adapters/rescan", timeout=60).json()
        assert report["removed"] == [] and "missing" in report["skipped"]["a"]
        os.replace(folder / "a", folder / ".a.old")  # save_adapter's rename: the old folder moved aside
        report = httpx.post(live.url + "/v1/adapters/rescan", timeout=60).json()
        assert report["removed"] == [] and "being replaced" in report["skipped"]["a"]
        assert completion(live.url, **body).json()["choices"][0]["text"] == before
        os.replace(folder / ".a.old", folder / "a")
        weights.write_bytes(good)
        report = httpx.post(live.url + "/v1/adapters/rescan", timeout=60).json()
        assert report["reloaded"] == ["a"] and report["skipped"] == {}
        (folder / "a" / "adapter_config.json").unlink()
        report = httpx.post(live.url + "/v1/adapters/rescan", timeout=60).json()
        assert report["removed"] == [] and "still serving" in report["skipped"]["a"]
        shutil.rmtree(folder / "a")  # really gone: no longer served
        assert httpx.post(live.url + "/v1/adapters/rescan", timeout=60).json()["removed"] == ["a"]
        assert completion(live.url, **body).status_code == 404


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 row-exact mode needs a CPU with native bf16")
def test_a_scored_prompts_completion_continues_from_its_scoring(tmp_path):
    """Echo with logprobs and max_tokens > 0 (what lm-eval sends): each completion takes its scored prompt's
    keys/values instead of running the prompt again, and the answer is the one of its own prefill, bit for bit
    (bf16), with an adapter, n > 1, a prompt of several slices and one shorter than a block."""
    base = tiny_base()
    base.model.to(torch.bfloat16)
    folder = tmp_path / "adapters"
    make_adapter(base, folder, "a", "human-assistant", 3, seed=1)
    prompts = [TEXT, "abcdefghij" * 5 + " yes", "abcdefghij" * 5 + " no", "xyz"]
    body = {"model": "a", "prompt": prompts, "max_tokens": 5, "echo": True, "logprobs": 2, "n": 2, "temperature": 1,
            "seed": 3}  # fmt: skip
    answers = {}
    for hand_over in (False, True):
        with LiveServer(create_app(base, folder)) as live:
            live.state.scheduler.hand_over = hand_over
            r = completion(live.url, **body)
            assert r.status_code == 200
            answers[hand_over] = {k: v for k, v in r.json().items() if k not in ("id", "created")}
            assert live.state.scheduler.snapshot()["score_hand_overs"] == (len(prompts) * 2 if hand_over else 0)
    assert answers[True] == answers[False]
    assert all(len(c["logprobs"]["tokens"]) > len(p) for c, p in zip(answers[True]["choices"][::2], prompts))
