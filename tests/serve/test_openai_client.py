"""`softprompt serve`'s OpenAI-API completeness, through the official `openai` client: token-id prompts, logprobs,
echo, n, best_of, penalties, logit_bias, chat logprobs, /tokenize and /detokenize.

Log-probabilities are checked against the model's own forward pass with the soft prompt in front (forward.py), and
every request is checked batch-invariant: the same request alone and in a mixed concurrent batch gives the same
tokens and log-probabilities.
"""

import concurrent.futures

import httpx
import openai
import pytest
import torch
from helpers import text_logits
from serve_helpers import LiveServer, make_adapter

from softprompt import create_app, generate_batch
from softprompt.core import forward
from softprompt.data.templates import encode_text
from softprompt.formats.adapter import load_adapter
from softprompt.inference.batch import GenerationRequest
from softprompt.inference.sampling import process_logits
from softprompt.serve.protocol import choice_seed

ADAPTERS = {"alpha": ("human-assistant", 4), "gamma": ("Q: {instruction}\nA:", 3)}


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("openai-adapters")
    for seed, (name, (template, n)) in enumerate(ADAPTERS.items()):
        make_adapter(tiny, path, name, template, n, seed)
    return path


@pytest.fixture(scope="module")
def server(tiny, folder):
    with LiveServer(create_app(tiny, folder, max_tokens_cap=64)) as live:
        yield live


def virtual(tiny, folder, model):
    return None if model == "base" else load_adapter(folder / model, tiny).virtual(tiny.device)


def reference_logprobs(tiny, folder, model, ids: list[int]) -> torch.Tensor:
    """log-softmax over the vocabulary at every position of `ids` [L, V] (row t predicts token t + 1)."""
    with torch.no_grad():
        logits = text_logits(
            tiny.model, virtual(tiny, folder, model), torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)
        )
    return torch.log_softmax(logits[0].float(), dim=-1)


def completion(server, **kw):
    return server.client.completions.create(**kw).model_dump()


# ---- prompts as token ids ----------------------------------------------------------------------------------------
def test_token_id_prompts_equal_text_prompts(server, tiny):
    ids = encode_text(tiny.tokenizer, "The cat sat")
    by_text = server.client.completions.create(model="alpha", prompt="The cat sat", max_tokens=8, temperature=0)
    by_ids = server.client.completions.create(model="alpha", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == 4 + len(ids)
    other = encode_text(tiny.tokenizer, "dog")
    several = server.client.completions.create(model="alpha", prompt=[ids, other], max_tokens=8, temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == by_text.choices[0].text
    assert several.usage.prompt_tokens == 2 * 4 + len(ids) + len(other)


# ---- logprobs and echo ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["alpha", "base"])
def test_logprobs_are_the_models_distribution(server, tiny, folder, model):
    ids = encode_text(tiny.tokenizer, "abc")
    out = completion(server, model=model, prompt="abc", max_tokens=6, temperature=0, logprobs=3)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    generated = encode_text(tiny.tokenizer, choice["text"])
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    ref = reference_logprobs(tiny, folder, model, ids + generated)
    for k, (token, value, top) in enumerate(zip(generated, lp["token_logprobs"], lp["top_logprobs"])):
        row = ref[len(ids) + k - 1]
        assert value == pytest.approx(float(row[token]), abs=1e-4)
        assert len(top) == 3 and value == max(top.values())  # greedy: the chosen token is the most likely
        best = torch.topk(row, 3)
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)


def test_server_logprobs_equal_generate_batch_logprobs(server, tiny, folder):
    """One engine: the server's logprobs of a greedy completion are the ones `generate_batch(..., logprobs=N)`
    returns offline for the same prompt and adapter (same tokens, same values, same alternatives)."""
    out = completion(server, model="gamma", prompt="Q: dog\nA:", max_tokens=6, temperature=0, logprobs=2)
    lp = out["choices"][0]["logprobs"]
    (record,) = generate_batch(
        [{"instruction": "dog", "adapter": "gamma"}],
        base=tiny,
        adapters_dir=str(folder),
        greedy=True,
        max_new_tokens=6,
        logprobs=2,
    )
    offline = record["logprobs"]
    assert record["output"] == out["choices"][0]["text"]
    assert [e["token"] for e in offline] == lp["tokens"]
    assert [e["logprob"] for e in offline] == lp["token_logprobs"]
    assert [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in offline] == lp["top_logprobs"]


def test_echo_scores_the_prompt_like_label_nll(server, tiny, folder):
    """What lm-evaluation-harness sends for a log-likelihood request: echo, max_tokens 0 (or 1), logprobs."""
    text = "Human: hi\n\nAssistant: yes"
    ids = encode_text(tiny.tokenizer, text)
    out = completion(server, model="alpha", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert lp["tokens"] == [tiny.tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the first token: no prediction
    labels = torch.tensor([[-100] + ids[1:]])
    nll, count = forward.label_nll(
        tiny.model,
        virtual(tiny, folder, "alpha"),
        torch.tensor([ids]),
        torch.ones(1, len(ids), dtype=torch.long),
        labels,
    )
    assert sum(lp["token_logprobs"][1:]) == pytest.approx(-float(nll[0]), abs=1e-4)
    usage = out["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        4 + len(ids),
        0,
        4 + len(ids),
    )

    one = completion(server, model="alpha", prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp1 = one["choices"][0]["logprobs"]
    assert len(lp1["token_logprobs"]) == len(ids) + 1  # the prompt's tokens, then the one generated
    assert lp1["token_logprobs"][0] is None and lp1["tokens"][:-1] == lp["tokens"]
    assert lp1["token_logprobs"][1:-1] == pytest.approx(lp["token_logprobs"][1:], abs=1e-6)
    assert one["choices"][0]["text"].startswith(text)
    # echo without logprobs: the text only
    plain = completion(server, model="alpha", prompt=text, max_tokens=3, echo=True, temperature=0)
    rest = completion(server, model="alpha", prompt=text, max_tokens=3, temperature=0)["choices"][0]["text"]
    assert plain["choices"][0]["text"] == text + rest and plain["choices"][0]["logprobs"] is None


def test_streamed_logprobs_and_echo(server, tiny):
    kw = dict(model="gamma", prompt="xy", max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = completion(server, **kw)
    chunks = [
        c.model_dump()
        for c in server.client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    ]
    parts = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(p["text"] for p in parts) == whole["choices"][0]["text"]
    tokens = [t for p in parts if p["logprobs"] for t in p["logprobs"]["tokens"]]
    values = [v for p in parts if p["logprobs"] for v in p["logprobs"]["token_logprobs"]]
    offsets = [v for p in parts if p["logprobs"] for v in p["logprobs"]["text_offset"]]
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]
    assert values == pytest.approx(whole["choices"][0]["logprobs"]["token_logprobs"], abs=1e-6)
    assert offsets == whole["choices"][0]["logprobs"]["text_offset"]
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


# ---- n, best_of, seeds ---------------------------------------------------------------------------------------------
def test_n_choices_are_seeded_and_reproducible(server):
    kw = dict(model="alpha", prompt="Once", max_tokens=8, temperature=1.0, seed=5)
    many = completion(server, n=3, **kw)
    again = completion(server, n=3, **kw)
    assert [c["text"] for c in many["choices"]] == [c["text"] for c in again["choices"]]
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert many["choices"][0]["text"] == completion(server, **kw)["choices"][0]["text"]  # choice 0 = n=1
    assert len({c["text"] for c in many["choices"]}) > 1
    assert many["usage"]["prompt_tokens"] == completion(server, **kw)["usage"]["prompt_tokens"]  # counted once
    two_prompts = completion(server, n=2, **{**kw, "prompt": ["Once", "Twice"]})
    assert [c["index"] for c in two_prompts["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in two_prompts["choices"][:2]] == [c["text"] for c in many["choices"][:2]]
    assert choice_seed(None, 3) is None and choice_seed(7, 0) == 7 and choice_seed(7, 1) != choice_seed(7, 2)


def test_best_of_returns_the_most_likely_candidates(server):
    kw = dict(model="gamma", prompt="Hi", max_tokens=5, temperature=1.0, seed=21)
    candidates = completion(server, n=4, logprobs=0, **kw)["choices"]
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in candidates]
    best = completion(server, n=2, best_of=4, **kw)
    order = sorted(range(4), key=lambda i: -sums[i])[:2]
    assert [c["text"] for c in best["choices"]] == [candidates[i]["text"] for i in sorted(order)]
    assert best["choices"][0]["logprobs"] is None  # not asked for: not returned


# ---- chat ------------------------------------------------------------------------------------------------------------
def test_chat_logprobs_top_logprobs_and_n(server):
    messages = [{"role": "user", "content": "Name a colour."}]
    out = server.client.chat.completions.create(
        model="alpha", messages=messages, max_completion_tokens=6, temperature=0, logprobs=True, top_logprobs=2, n=2
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content  # greedy: the same answer
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.logprob == t.top_logprobs[0].logprob
        assert bytes(t.bytes).decode("utf-8") == t.token
    plain = server.client.chat.completions.create(model="alpha", messages=messages, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content
    stream = server.client.chat.completions.create(
        model="alpha", messages=messages, max_tokens=6, temperature=0, logprobs=True, stream=True
    )
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


# ---- penalties and logit_bias ------------------------------------------------------------------------------------
def test_logit_bias_and_penalties(server, tiny, folder):
    x = tiny.tokenizer.convert_tokens_to_ids("x")
    out = completion(
        server, model="alpha", prompt="abc", max_tokens=5, temperature=0, logit_bias={str(x): 100}, logprobs=1
    )
    assert out["choices"][0]["text"] == "xxxxx"
    assert all(v < 0 for v in out["choices"][0]["logprobs"]["token_logprobs"])  # raw logprobs, before the bias
    banned = completion(server, model="alpha", prompt="abc", max_tokens=8, temperature=0, logit_bias={str(x): -100})
    assert "x" not in banned["choices"][0]["text"]
    # penalties: greedy decoding equals a reference loop over the forward pass applying OpenAI's formula
    kw = dict(presence_penalty=1.5, frequency_penalty=0.7, logit_bias={1: -100.0})  # no EOS: all 8 tokens
    fresh = completion(
        server,
        model="gamma",
        prompt="aaaa",
        max_tokens=8,
        temperature=0,
        logit_bias={"1": -100},
        presence_penalty=1.5,
        frequency_penalty=0.7,
    )
    ids, generated = encode_text(tiny.tokenizer, "aaaa"), []
    for _ in range(8):
        row = reference_logprobs(tiny, folder, "gamma", ids + generated)[-1]
        generated.append(int(process_logits(row, GenerationRequest([1], **kw), generated).argmax()))
    assert fresh["choices"][0]["text"] == tiny.tokenizer.decode(generated)
    # the repetition penalty and the n-gram ban: the same engine code as generate / chat / eval
    kw = dict(repetition_penalty=2.5, no_repeat_ngram_size=2, logit_bias={1: -100.0})
    fresh = completion(
        server,
        model="gamma",
        prompt="aaaa",
        max_tokens=8,
        temperature=0,
        logit_bias={"1": -100},
        extra_body={"repetition_penalty": 2.5, "no_repeat_ngram_size": 2},
    )  # vLLM-style extras
    generated = []
    for _ in range(8):  # raw logits: the repetition penalty scales them, so log-probabilities would differ
        with torch.no_grad():
            row = text_logits(
                tiny.model,
                virtual(tiny, folder, "gamma"),
                torch.tensor([ids + generated]),
                torch.ones(1, len(ids + generated), dtype=torch.long),
            )[0, -1]
        generated.append(int(process_logits(row, GenerationRequest([1], **kw), generated).argmax()))
    assert fresh["choices"][0]["text"] == tiny.tokenizer.decode(generated)
    once = completion(
        server,
        model="gamma",
        prompt="aaaa",
        max_tokens=8,
        temperature=0,
        logit_bias={"1": -100},
        extra_body={"no_repeat_ngram_size": 1},
    )["choices"][0]["text"]
    assert len(once) == 8 and len(set(once)) == 8  # character tokens: none twice
    logits = torch.randn(20)
    request = GenerationRequest([1], presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 2.0})
    processed = process_logits(logits, request, [4, 4, 7])
    expected = logits.clone()
    expected[4] -= 0.5 + 0.5
    expected[7] -= 0.5 + 0.25
    expected[3] += 2.0
    assert torch.equal(processed, expected)


# ---- batch invariance ------------------------------------------------------------------------------------------------
def test_same_request_alone_and_in_a_mixed_batch(server, tiny):
    x = tiny.tokenizer.convert_tokens_to_ids("e")
    requests = [
        dict(model="alpha", prompt="one", max_tokens=7, temperature=0, logprobs=2),
        dict(
            model="gamma",
            prompt=encode_text(tiny.tokenizer, "two"),
            max_tokens=5,
            temperature=0.9,
            seed=3,
            logprobs=1,
            n=2,
        ),
        dict(
            model="base",
            prompt="three",
            max_tokens=6,
            temperature=0,
            presence_penalty=1.0,
            logprobs=0,
            logit_bias={str(x): 5.0},
        ),
        dict(model="alpha", prompt="four four", max_tokens=0, echo=True, logprobs=3),
        dict(
            model="gamma",
            prompt="five",
            max_tokens=6,
            temperature=1.0,
            seed=9,
            frequency_penalty=0.5,
            best_of=3,
            logprobs=1,
        ),
    ] * 2
    alone = [completion(server, **kw) for kw in requests[:5]] * 2
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        mixed = list(pool.map(lambda kw: completion(server, **kw), requests))
    for a, m in zip(alone, mixed):
        for ca, cm in zip(a["choices"], m["choices"]):
            assert cm["text"] == ca["text"]
            assert cm["logprobs"]["tokens"] == ca["logprobs"]["tokens"]
            assert [v for v in cm["logprobs"]["token_logprobs"] if v is not None] == pytest.approx(
                [v for v in ca["logprobs"]["token_logprobs"] if v is not None], abs=1e-5
            )


# ---- tokenizer endpoints and refusals ------------------------------------------------------------------------------
def test_tokenize_and_detokenize(server, tiny):
    r = httpx.post(server.url + "/tokenize", json={"model": "alpha", "prompt": "hello"}).json()
    assert r == {
        "count": 5,
        "max_model_len": 512,
        "tokens": encode_text(tiny.tokenizer, "hello"),
        "num_virtual_tokens": 4,
    }
    chat = httpx.post(
        server.url + "/tokenize", json={"model": "gamma", "messages": [{"role": "user", "content": "hi"}]}
    ).json()
    assert chat["tokens"] == encode_text(tiny.tokenizer, "Q: hi\nA:")
    back = httpx.post(server.url + "/detokenize", json={"model": "base", "tokens": r["tokens"]}).json()
    assert back == {"prompt": "hello"}
    bad = httpx.post(server.url + "/detokenize", json={"model": "base", "tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(server.url + "/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize(
    "body,param,message",
    [
        ({"max_tokens": 0}, "max_tokens", "0 is only allowed with echo"),
        ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"n": 2, "best_of": 1}, "best_of", "must be >= n"),
        ({"best_of": 2, "stream": True}, "best_of", "cannot be combined with stream"),
        ({"prompt": [5, 10**6]}, "prompt", "token id 1000000 is outside the vocabulary"),
        ({"prompt": [[5], [10**6]]}, "prompt.1", "token id 1000000 is outside the vocabulary"),
        ({"prompt": [[5], []]}, "prompt.1", "prompt is empty"),
        ({"logit_bias": {"a": 1}}, "logit_bias", "keys are token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "must be in [-100, 100]"),
        ({"logit_bias": {"999999": 1}}, "logit_bias", "outside the vocabulary"),
        ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
        ({"repetition_penalty": 0.1}, "repetition_penalty", "greater than or equal to 0.5"),
        ({"no_repeat_ngram_size": 65}, "no_repeat_ngram_size", "less than or equal to 64"),
        ({"n": 100}, "n", "less than or equal to 64"),
        ({"n": 64, "prompt": ["a", "b"]}, "n", "2 prompt(s) x 64 choices (n / best_of) in one request can never be"),
    ],
)
def test_refusals_name_the_field(server, body, param, message):
    r = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_chat_refusals_name_the_field(server):
    messages = [{"role": "user", "content": "x"}]
    for body, param in [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"echo": True}, "echo"),
    ]:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "alpha", "messages": messages, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
