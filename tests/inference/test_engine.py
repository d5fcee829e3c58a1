"""The generation engine: equal to a no-cache greedy loop, batch-invariant, mixed-task, soft-prompt KV cached once."""

import random

import pytest
import torch
from engine_helpers import base, dtype, peaked_base, random_adapter, reference_greedy  # noqa: F401 (fixtures)

import softprompt.core.attention
import softprompt.core.forward
from softprompt.formats.adapter import AdapterError
from softprompt.inference.batch import DecodeBatch, GenerationRequest
from softprompt.inference.detokenize import Detokenizer
from softprompt.inference.engine import Engine
from softprompt.inference.prompt_cache import PromptCache, UnknownAdapterError
from softprompt.inference.sampling import filter_logits

SIZES = {"a3": 3, "a7": 7, "a12": 12}


@pytest.fixture(scope="module")
def adapters():
    return {name: random_adapter(n, seed=i) for i, (name, n) in enumerate(SIZES.items())}


@pytest.fixture(scope="module")
def engine(base, adapters):
    return Engine(base, adapters)


def same_logits(a, b, dtype):
    """bf16 promises bit-identical logits (row-exact mode); fp32 keeps batched kernels, equal to rounding."""
    return torch.equal(a, b) if dtype != torch.float32 else torch.allclose(a, b, atol=1e-4)


def prompt_of(adapters, name):
    return None if name is None else adapters[name].embeddings


def texts(rng, count):
    words = ["tell", "me", "about", "cats", "a", "long", "story", "why", "sky", "blue", "你好", "2+2=?"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(count)]


def run_alone(engine, request, keep_logits=False):
    """Tokens (and per-step logits) of one request decoded in a batch of its own."""
    batch = DecodeBatch(engine.base, engine.prompt_cache, keep_logits=keep_logits)
    events = batch.add([request])
    while len(batch):
        events += batch.step()
    return [e.token_id for e in events], [e.logits for e in events]


@pytest.mark.parametrize("adapter", [None, "a3", "a12"])
def test_greedy_equals_no_cache_loop_token_for_token(engine, base, adapters, adapter, dtype):
    if dtype != torch.float32:
        pytest.skip("the no-cache loop is another computation; in bf16 it rounds differently (see the bf16 test below)")
    for text in ["hello", "what is the capital of France?"]:
        ids = engine.encode(text, adapter=adapter)
        tokens, logits = run_alone(engine, GenerationRequest(ids, adapter=adapter, max_new_tokens=20), True)
        ref_tokens, ref_logits = reference_greedy(base, prompt_of(adapters, adapter), ids, 20)
        assert tokens == ref_tokens
        assert torch.allclose(torch.stack(logits), ref_logits, atol=1e-4, rtol=1e-4)


def test_greedy_is_batch_invariant_with_left_padding(engine, dtype):
    rng = random.Random(0)
    for trial in range(12):
        adapter = rng.choice([None, "a7"])
        prompts = texts(rng, rng.randint(2, 5))
        requests = [
            GenerationRequest(engine.encode(t, adapter=adapter), adapter=adapter, max_new_tokens=10) for t in prompts
        ]
        batch = DecodeBatch(engine.base, engine.prompt_cache, keep_logits=True)
        events = batch.add(requests)
        while len(batch):
            events += batch.step()
        for request in requests:
            alone, alone_logits = run_alone(engine, request, True)
            mine = [e for e in events if e.request is request]
            assert [e.token_id for e in mine] == alone, f"trial {trial}"
            assert same_logits(torch.stack([e.logits for e in mine]), torch.stack(alone_logits), dtype)


def test_mixed_task_batch_equals_each_row_alone(engine, base, adapters, dtype):
    rng = random.Random(1)
    names = [None, "a3", "a7", "a12", None, "a12", "a3"]
    requests = [
        GenerationRequest(engine.encode(t, adapter=n), adapter=n, max_new_tokens=12, id=i)
        for i, (t, n) in enumerate(zip(texts(rng, len(names)), names))
    ]
    results = engine.generate(requests, batch_size=len(requests))
    for request, result in zip(requests, results):
        alone = run_alone(engine, request)[0]
        assert result.token_ids == alone
        assert result.text == engine.base.tokenizer.decode(alone, skip_special_tokens=True)
        if dtype == torch.float32:
            ref, _ = reference_greedy(base, prompt_of(adapters, request.adapter), request.prompt_ids, 12)
            assert result.token_ids == ref


def test_continuous_batching_rows_join_and_leave(engine, dtype):
    """Rows with different lengths finish at different steps; queued rows join a live batch (merge, trim)."""
    rng = random.Random(2)
    names = ["a12", None, "a3", "a7", None, "a12", "a3", "a7"]
    requests = [
        GenerationRequest(engine.encode(t, adapter=n), adapter=n, max_new_tokens=rng.randint(1, 15))
        for t, n in zip(texts(rng, len(names)), names)
    ]
    results = engine.generate(requests, batch_size=3)
    for request, result in zip(requests, results):
        assert result.token_ids == run_alone(engine, request)[0]
        assert len(result.token_ids) <= request.max_new_tokens


def test_remove_cancels_a_row_without_disturbing_the_others(engine, dtype):
    requests = [
        GenerationRequest(engine.encode(t, adapter=n), adapter=n, max_new_tokens=8)
        for t, n in [("first one", "a3"), ("second", None), ("the third request", "a12")]
    ]
    batch = DecodeBatch(engine.base, engine.prompt_cache)
    events = batch.add(requests)
    events += batch.step()
    batch.remove([requests[2]])
    assert batch.requests == requests[:2]
    while len(batch):
        events += batch.step()
    for request in requests[:2]:
        assert [e.token_id for e in events if e.request is request] == run_alone(engine, request)[0]


def test_soft_prompt_kv_computed_once_per_adapter(base, adapters, monkeypatch):
    calls = []
    original = softprompt.core.forward.prompt_kv

    def counting(model, prompt):
        calls.append(prompt.shape[0])
        return original(model, prompt)

    monkeypatch.setattr(softprompt.core.forward, "prompt_kv", counting)
    engine = Engine(base, adapters)
    assert sorted(calls) == sorted(SIZES.values())
    for _ in range(2):
        requests = [
            GenerationRequest(engine.encode(t, adapter=n), adapter=n, max_new_tokens=4)
            for t in ["x", "yy zz"]
            for n in SIZES
        ]
        engine.generate(requests, batch_size=4)
        list(engine.stream(requests[0]))
    assert sorted(calls) == sorted(SIZES.values())
    kv, n = engine.prompt_cache.get("a7")
    assert n == 7 and kv[0][0].shape[2] == 7
    assert engine.prompt_cache.get(None) == (None, 0)


def test_seeded_sampling_is_reproducible_and_independent_of_batch_mates(engine, dtype):
    def request(seed, text="tell me a story", adapter="a7"):
        return GenerationRequest(
            engine.encode(text, adapter=adapter),
            adapter=adapter,
            max_new_tokens=15,
            temperature=1.5,
            top_k=40,
            top_p=0.95,
            seed=seed,
        )

    alone = engine.generate([request(7)])[0].token_ids
    assert engine.generate([request(7)])[0].token_ids == alone
    mates = [request(s, t, a) for s, t, a in [(1, "why", None), (None, "a long long prompt here", "a3")]]
    in_batch = engine.generate([mates[0], request(7), mates[1]], batch_size=3)[1].token_ids
    assert in_batch == alone
    others = {tuple(engine.generate([request(s)])[0].token_ids) for s in range(8, 12)}
    assert len(others | {tuple(alone)}) > 1  # seeds matter


def test_top_k_and_top_p_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert torch.isfinite(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [True, True, False, False, False]
    probs = torch.softmax(logits, -1)  # 0.64, 0.24, 0.09, ...: the first two hold 0.88 of the mass
    kept = torch.isfinite(filter_logits(logits, 1.0, 0, 0.85)).tolist()
    assert kept == [True, True, False, False, False] and probs[:2].sum() > 0.85
    assert torch.isfinite(filter_logits(logits, 1.0, 0, 0.5)).tolist() == [True, False, False, False, False]


def test_stop_strings_cut_the_answer(engine):
    ids = engine.encode("tell me about cats", adapter="a3")
    full = engine.generate([GenerationRequest(ids, adapter="a3", max_new_tokens=20)])[0]
    assert full.finish_reason == "length" and len(full.text) >= 10
    stop = full.text[5:8]
    cut = full.text[: full.text.find(stop)]
    result = engine.generate([GenerationRequest(ids, adapter="a3", max_new_tokens=20, stop=["@@never", stop])])[0]
    assert result.text == cut and result.finish_reason == "stop"
    streamed = [e.text for e in engine.stream(GenerationRequest(ids, adapter="a3", max_new_tokens=20, stop=[stop]))]
    assert "".join(streamed) == cut


def test_eos_stops_and_is_not_in_the_text(adapters):
    base = peaked_base()
    engine = Engine(base, adapters)
    ids = engine.encode("tell me about cats", adapter="a7")
    tokens = engine.generate([GenerationRequest(ids, adapter="a7", max_new_tokens=12)])[0].token_ids
    eos = tokens[4]
    base.model.generation_config.eos_token_id = [base.tokenizer.eos_token_id, eos]
    result = Engine(base, adapters).generate([GenerationRequest(ids, adapter="a7", max_new_tokens=12)])[0]
    first = tokens.index(eos)
    assert result.token_ids == tokens[: first + 1] and result.finish_reason == "stop"
    assert result.text == base.tokenizer.decode(tokens[:first])


def test_prompt_longer_than_context_is_an_error_or_truncated_on_request(engine):
    ids = engine.encode("x" * 480, adapter="a12")
    with pytest.raises(
        ValueError,
        match=r"prompt too long: 12 virtual tokens \+ 500 prompt tokens \+ "
        r"max_new_tokens 32 = 544 exceeds the model's context of 512 tokens",
    ):
        engine.generate([GenerationRequest(ids, adapter="a12", max_new_tokens=32)])
    result = engine.generate([GenerationRequest(ids, adapter="a12", max_new_tokens=32, truncate=True)])[0]
    assert result.prompt_tokens == 512 - 12 - 32 and len(result.token_ids) == 32


def test_bad_requests_and_adapters_are_named(engine, base):
    with pytest.raises(UnknownAdapterError, match="names adapter 'nope', which is not loaded"):
        engine.generate([GenerationRequest([5, 6], adapter="nope")])
    with pytest.raises(ValueError, match="at least one prompt token"):
        engine.generate([GenerationRequest([])])
    with pytest.raises(ValueError, match="top_p must be in"):
        engine.generate([GenerationRequest([5], temperature=1.0, top_p=0.0)])
    with pytest.raises(AdapterError, match="adapter hidden size 16 does not fit the base model peaked-llama"):
        PromptCache(base).add("small", random_adapter(4, hidden=16))


class FakeTokenizer:
    """Decodes ids to fixed pieces; id 9 is half of a multi-byte character."""

    pieces = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 9: "\ufffd", 10: "é"}

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")


def test_detokenizer_holds_back_partial_characters_and_stop_prefixes():
    detok = Detokenizer(FakeTokenizer(), stop=["world"])
    assert detok.push(1) == ("Hel", False)
    assert detok.push(2) == ("lo", False)
    assert detok.push(3) == (" ", False)  # " wor" could begin "world"
    assert detok.push(4) == ("", True)
    assert detok.text == "Hello "
    detok = Detokenizer(FakeTokenizer(), stop=["xyz"])
    assert detok.push(1) == ("Hel", False)
    assert detok.push(9) == ("", False)  # incomplete character held back
    assert detok.push(10) == ("é", False)
    assert detok.flush() == ""


def test_bfloat16_engine_runs_and_matches_its_own_no_cache_loop(adapters):
    base = peaked_base()
    base.model.to(torch.bfloat16)
    engine = Engine(base, adapters)
    ids = engine.encode("hello", adapter="a3")
    result = engine.generate([GenerationRequest(ids, adapter="a3", max_new_tokens=5)])[0]
    assert engine.prompt_cache.get("a3")[0][0][0].dtype == torch.bfloat16
    assert result.token_ids == reference_greedy(base, adapters["a3"].embeddings, ids, 5)[0]


def test_every_row_equals_itself_alone_in_batches_of_1_to_16(engine, dtype):
    """Prefill and every decode step: a row's logits in mixed batches of 2..16 (other adapters, other lengths, rows
    joining a live batch) are those of the row alone; in bf16 bit for bit."""
    rng = random.Random(5)
    names = [None, "a3", "a7", "a12"]
    pool = [
        GenerationRequest(engine.encode(t, adapter=n), adapter=n, max_new_tokens=rng.randint(1, 9))
        for t, n in zip(texts(rng, 16) + ["x"], [rng.choice(names) for _ in range(16)] + ["a3"])
    ]
    alone = {id(r): run_alone(engine, r, keep_logits=True) for r in pool}
    for size in [2, 3, 5, 8, 16]:
        requests = rng.sample(pool, size)
        batch = DecodeBatch(engine.base, engine.prompt_cache, keep_logits=True)
        events = batch.add(requests[: size // 2 + 1])
        events += batch.step()
        events += batch.add(requests[size // 2 + 1 :])  # later rows join a live batch (merge, left pads)
        while len(batch):
            events += batch.step()
        for request in requests:
            tokens, logits = alone[id(request)]
            mine = [e for e in events if e.request is request]
            assert [e.token_id for e in mine] == tokens, size
            assert same_logits(torch.stack([e.logits for e in mine]), torch.stack(logits), dtype), size


def test_row_exact_mode_follows_the_dtype(adapters):
    fp32 = peaked_base()
    assert DecodeBatch(fp32, PromptCache(fp32)).exact is False
    bf16 = peaked_base()
    bf16.model.to(torch.bfloat16)
    assert DecodeBatch(bf16, PromptCache(bf16)).exact is True
    assert bf16.model.config._attn_implementation == softprompt.core.attention.NAME


@pytest.mark.parametrize("adapter", [None, "a7"])
def test_logprobs_are_the_reference_loops_log_softmax(engine, base, adapters, adapter, dtype):
    """A request's logprobs are the log-softmax of the logits the no-cache loop computes at each step, and the
    top-N list is that distribution's N largest entries in order; greedy picks the first of them."""
    if dtype != torch.float32:
        pytest.skip("the no-cache loop rounds differently in bf16; the bf16 promise is batch invariance (below)")
    ids = engine.encode("tell me about cats", adapter=adapter)
    (result,) = engine.generate([GenerationRequest(ids, adapter=adapter, max_new_tokens=8, logprobs=3)])
    ref_tokens, ref_logits = reference_greedy(base, prompt_of(adapters, adapter), ids, 8)
    assert result.token_ids == ref_tokens and len(result.logprobs) == len(ref_tokens)
    for entry, token, logits in zip(result.logprobs, ref_tokens, ref_logits):
        logp = torch.log_softmax(logits.float(), dim=-1)
        values, top_ids = torch.topk(logp, 3)
        assert entry.token_id == token and [i for i, _ in entry.top] == top_ids.tolist()
        assert entry.top[0][0] == token
        assert entry.logprob == pytest.approx(float(logp[token]), abs=1e-4)
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_logprobs_do_not_depend_on_batch_mates(engine, dtype):
    """The same request alone and in a mixed batch (other adapters, other lengths, one without logprobs) gets the
    same tokens and the same log-probabilities: bit-identical in bf16, to rounding in fp32."""
    rng = random.Random(3)
    mine = GenerationRequest(engine.encode("why sky blue", adapter="a3"), adapter="a3", max_new_tokens=6, logprobs=2)
    others = [
        GenerationRequest(engine.encode(t, adapter=a), adapter=a, max_new_tokens=9, logprobs=n)
        for t, a, n in zip(texts(rng, 4), [None, "a7", "a12", "a3"], [None, 1, None, 0])
    ]
    (alone,) = engine.generate([mine])
    together = engine.generate(others[:2] + [mine] + others[2:], batch_size=3)[2]
    assert together.token_ids == alone.token_ids
    exact = dtype != torch.float32
    for a, b in zip(alone.logprobs, together.logprobs):
        assert a.top == b.top if exact else [i for i, _ in a.top] == [i for i, _ in b.top]
        assert a.logprob == b.logprob if exact else a.logprob == pytest.approx(b.logprob, abs=1e-5)
    assert engine.generate(others[:1])[0].logprobs is None  # not asked: not computed


def test_stream_and_generate_run_the_same_scheduler(engine):
    """A streamed request yields the tokens generate returns for it, one event per token, the last with the finish."""
    request = GenerationRequest(engine.encode("a long story", adapter="a12"), adapter="a12", max_new_tokens=7)
    events = list(engine.stream(request))
    (result,) = engine.generate([request])
    assert [e.token_id for e in events] == result.token_ids
    assert "".join(e.text for e in events) == result.text
    assert [e.finish_reason for e in events][-1] == result.finish_reason and events[-1].finish_reason is not None
    assert all(e.finish_reason is None for e in events[:-1])
