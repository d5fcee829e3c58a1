"""bf16 where the CPU has it: `--dtype auto` picks it, and generation stays batch-invariant in it.

Every row of a mixed batch equals the same row run alone, token for token (and logit for logit), through each door a
request can come in by: the engine (tests/test_engine.py runs its invariance tests in both dtypes), `generate_batch`
and the generate CLI, `softprompt eval`'s greedy answers, and the server under concurrent load (streaming included).
On a CPU without native bf16 these tests are skipped: `auto` keeps fp32 there.
"""

import concurrent.futures
import json
import random

import openai
import pytest
import torch
from engine_helpers import peaked_base, random_adapter
from helpers import save_tiny

from softprompt import create_app, evaluate, generate_batch
from softprompt.cli import main
from softprompt.core import models
from softprompt.core.models import cpu_has_native_bf16, load_base, resolve_dtype
from softprompt.core.prompt import SoftPrompt
from softprompt.data.templates import Template, encode_text
from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.inference.batch import DecodeBatch, GenerationRequest
from softprompt.inference.engine import Engine
from softprompt.serve import BackgroundServer

pytestmark = pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16 / AMX): --dtype auto keeps fp32"
)

TEMPLATES = {"alpha": ("human-assistant", 4), "beta": ("chat", 6), "gamma": ("Q: {instruction}\nA:", 1)}
WORDS = ["tell", "me", "about", "cats", "a", "long", "story", "why", "sky", "blue", "你好", "2+2=?", "north"]


@pytest.fixture(scope="module")
def bf16_tiny(tmp_path_factory):
    """A tiny Llama with peaked, context-dependent outputs, loaded in bf16, its folder and three adapters."""
    root = tmp_path_factory.mktemp("bf16")
    folder = save_tiny(peaked_base(seed=4), root / "model")
    base = load_base(str(folder), device="cpu", dtype="bfloat16")  # as the CLI loads it (RoPE tables stay fp32)
    adapters = root / "adapters"
    for seed, (name, (template, n)) in enumerate(TEMPLATES.items()):
        save_adapter(adapters / name, random_adapter(n, seed=seed).embeddings, base, template=Template(template))
    return base, folder, adapters


def sentences(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(count)]


def alone(engine, ids, adapter, max_new_tokens, **kw):
    return engine.generate(
        [GenerationRequest(ids, adapter=adapter, max_new_tokens=max_new_tokens, **kw)], batch_size=1
    )[0]


def test_auto_picks_bf16_where_it_measures_faster_and_the_cli_uses_it(bf16_tiny, tmp_path, capsys, monkeypatch):
    base, folder, adapters = bf16_tiny
    monkeypatch.setattr(models, "cpu_bf16_speedup", lambda: 2.0)  # as measured on CPUs where bf16 products win
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert load_base(str(folder), device="cpu").dtype == torch.bfloat16
    records = [
        {"instruction": t, **({"adapter": a} if a else {})}
        for t, a in zip(sentences(1, 9), [None, "alpha", "beta", "gamma"] * 3)
    ]
    batch = tmp_path / "in.jsonl"
    batch.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    outputs = []
    for size in ["1", "5"]:  # default dtype (auto = bf16 here); one at a time vs mixed batches
        out = tmp_path / f"out{size}.jsonl"
        assert (
            main(
                [
                    "generate",
                    "--model",
                    str(folder),
                    "--batch",
                    str(batch),
                    "--out",
                    str(out),
                    "--adapters-dir",
                    str(adapters),
                    "--greedy",
                    "--max-new-tokens",
                    "12",
                    "--batch-size",
                    size,
                ]
            )
            == 0
        )
        outputs.append([json.loads(line)["output"] for line in out.read_text(encoding="utf-8").splitlines()])
    assert outputs[0] == outputs[1]
    api = generate_batch(records, base=base, adapters_dir=adapters, greedy=True, max_new_tokens=12, batch_size=4)
    assert [r["output"] for r in api] == outputs[0]  # the CLI's default really computed in bf16


def test_generate_batch_rows_equal_each_row_alone(bf16_tiny):
    base, _, adapters = bf16_tiny
    records = [
        {"instruction": t, **({"adapter": a} if a else {})}
        for t, a in zip(sentences(2, 14), ["gamma", None, "alpha", "beta", "alpha", "gamma", None] * 2)
    ]
    together = generate_batch(records, base=base, adapters_dir=adapters, greedy=True, max_new_tokens=16, batch_size=8)
    one_by_one = generate_batch(records, base=base, adapters_dir=adapters, greedy=True, max_new_tokens=16, batch_size=1)
    assert together == one_by_one
    sampled = dict(base=base, adapters_dir=adapters, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert generate_batch(records, batch_size=8, **sampled) == generate_batch(records, batch_size=1, **sampled)


def test_eval_greedy_answers_do_not_depend_on_the_batch(bf16_tiny):
    base, _, adapters = bf16_tiny
    choices = ["north", "south", "east", "west"]
    records = [{"instruction": t, "output": choices[i % 4]} for i, t in enumerate(sentences(3, 10))]
    runs = [
        evaluate(
            records,
            model=base,
            adapters=[adapters / "alpha", adapters / "gamma"],
            compare_base=True,
            choices=choices,
            max_new_tokens=6,
            batch_size=size,
        )
        for size in (1, 10)
    ]
    for one, many in zip(runs[0]["results"], runs[1]["results"]):
        assert [e["generation"] for e in one["examples"]] == [e["generation"] for e in many["examples"]]
        assert one["exact_match"] == many["exact_match"]


def test_server_under_concurrent_load_matches_requests_run_alone(bf16_tiny):
    base, _, adapters = bf16_tiny
    engine = Engine(base, {n: load_adapter(adapters / n, base) for n in TEMPLATES}, Template("human-assistant"))
    jobs = [
        (model, text, 4 + i % 11)
        for i, (model, text) in enumerate(zip(["alpha", "beta", "gamma", "base"] * 5, sentences(4, 20)))
    ]
    with BackgroundServer(create_app(base, adapters, max_tokens_cap=64, max_batch=16)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)

        def call(job):
            model, text, k = job
            return client.completions.create(model=model, prompt=text, max_tokens=k, temperature=0)

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            outs = list(pool.map(call, jobs))
        assert server.app.state.softprompt.scheduler.snapshot()["max_live"] > 1  # they really shared batches
        stream = client.chat.completions.create(
            model="beta", messages=[{"role": "user", "content": "why sky"}], max_tokens=15, temperature=0, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    for (model, text, k), out in zip(jobs, outs):
        ref = alone(engine, encode_text(base.tokenizer, text), None if model == "base" else model, k)
        assert out.choices[0].text == ref.text, (model, text)
    ids = engine.encode_chat([{"role": "user", "content": "why sky"}], "beta")
    assert streamed == alone(engine, ids, "beta", 15).text


@pytest.mark.slow
def test_real_model_rows_equal_themselves_alone_in_batches_of_2_to_16():
    """SmolLM2-135M in bf16: prefill and decode logits of every row of mixed batches of 2..16 (ten adapters of
    1..24 virtual tokens, the base model, prompts of 3..30 tokens, rows joining a live batch) are bit for bit those
    of the row alone."""
    base = load_base(device="cpu", dtype="bfloat16")
    names = {f"t{n}": n for n in (1, 5, 8, 12, 16, 24)}
    engine = Engine(base, {name: _real_adapter(base, n, seed) for seed, (name, n) in enumerate(names.items())})
    rng = random.Random(0)
    texts = [
        "Hi",
        "What is 12 times 7?",
        "Name a famous painter.",
        "Why is the sky blue?",
        "Tell me a long story about a dragon who learns to cook pasta in Rome, with three twists.",
        "Translate 'good morning' into Spanish.",
        "Write a haiku about the sea.",
        "2+2?",
    ]
    pool = [
        GenerationRequest(engine.encode(t, adapter=a), adapter=a, max_new_tokens=4)
        for t in texts
        for a in rng.sample([None] + list(names), 2)
    ]

    def run(requests, split):
        batch = DecodeBatch(base, engine.prompt_cache, keep_logits=True)
        events = batch.add(requests[:split])
        if split < len(requests):
            events += batch.step() + batch.add(requests[split:])
        while len(batch):
            events += batch.step()
        return events

    reference = {id(r): run([r], 1) for r in pool}
    for size in (2, 3, 8, 16):
        requests = rng.sample(pool, size)
        events = run(requests, max(1, size // 2))
        for request in requests:
            mine = [e for e in events if e.request is request]
            assert [e.token_id for e in mine] == [e.token_id for e in reference[id(request)]], size
            assert all(torch.equal(a.logits, b.logits) for a, b in zip(mine, reference[id(request)])), size


def _real_adapter(base, n, seed):
    from softprompt.formats.adapter import Adapter

    prompt = SoftPrompt.initialise(base, "vocab", num_virtual_tokens=n, seed=seed)
    return Adapter(embeddings=prompt.embeddings.detach().cpu(), config={"num_virtual_tokens": n})
