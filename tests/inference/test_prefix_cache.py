"""The automatic prefix cache (inference/prefix_cache.py): prompt starts that requests share are computed once per
adapter and reused, with the same tokens as without it — bit for bit in row-exact mode (bf16), to rounding in fp32 —
for every method, in mixed batches where some rows hit and some miss, under a tiny memory budget, across adapter
hot swaps, through the engine, the server, and on the real default model with a long shared system prompt."""

import random

import httpx
import pytest
import torch
from engine_helpers import BF16, base, dtype, peaked_base, random_adapter  # noqa: F401 (fixtures)

from softprompt import create_app
from softprompt.core.models import cpu_has_native_bf16, load_base
from softprompt.core.prompt import SoftPrompt, build_prompt
from softprompt.data.templates import CHAT, Template, encode_text
from softprompt.formats.adapter import Adapter, load_adapter, save_adapter
from softprompt.formats.methods import base_width
from softprompt.inference.batch import DecodeBatch, GenerationRequest
from softprompt.inference.engine import Engine
from softprompt.inference.prefix_cache import PrefixCache
from softprompt.options import OptionError
from softprompt.serve.config import DEFAULT_PREFIX_CACHE_MB, ServeConfig

HEAD = "You are a careful assistant. Answer briefly, check every fact twice, and never invent a source. "  # 96 chars
TAILS = ["Why is the sky blue?", "Name a colour.", "2+2=?", "tell me about cats", "x", "你好 world"]
METHODS = ["prompt", "prefix", "ptuning"]


# ---- the cache alone ---------------------------------------------------------------------------------------------


def block(start: int, tag: float = 0.0) -> torch.Tensor:
    """Stand-in keys/values of one 4-token block [layers 1, 2, kv_heads 1, 4, head_dim 2], telling where it came
    from."""
    return torch.full((1, 2, 1, 4, 2), tag + start)


def test_a_block_is_found_only_with_its_whole_prefix_and_a_token_is_always_left_to_run():
    cache = PrefixCache(1 << 20, block_tokens=4)
    ids = list(range(10))
    cache.store(7, ids, block)
    assert len(cache) == 2  # the full blocks 0..3 and 4..7; tokens 8, 9 are no full block
    hit = cache.match(7, ids)
    assert hit.shape == (1, 2, 1, 8, 2) and hit[0, 0, 0, :, 0].tolist() == [0] * 4 + [4] * 4
    assert cache.match(7, ids[:8]).shape[3] == 4  # 8 tokens: the last block would leave nothing to run
    assert cache.match(7, ids[:4]) is None
    assert cache.match(7, ids[:4] + [9, 9, 9, 9, 1]).shape[3] == 4
    assert cache.match(8, ids) is None  # another adapter (owner)
    assert cache.match(7, [9, 1, 2, 3] + ids[4:]) is None  # the second block's tokens match, not its prefix
    stats = cache.stats()
    assert (stats.lookups, stats.hits, stats.cached_tokens) == (6, 3, 16)
    assert stats.prompt_tokens == 10 + 8 + 4 + 9 + 10 + 10


def test_pinned_blocks_survive_memory_pressure_until_unpinned():
    one = block(0).numel() * block(0).element_size()  # bytes per block
    cache = PrefixCache(4 * one, block_tokens=4)
    document = list(range(100, 112))  # 3 full blocks
    cache.store(7, document, block)
    assert cache.pin(7, document) == 12 and cache.pin(7, document) == 12  # pinning twice is one pin
    for i in range(6):  # other prompts push everything unpinned out
        cache.store(7, [i] * 8, block)
    assert cache.cached_length(7, document + [0]) == 12  # still held: never evicted
    stats = cache.stats()
    assert (stats.pinned_blocks, stats.pinned_bytes, stats.bytes) == (3, 3 * one, 4 * one)
    cache.store(8, list(range(8)), block)  # two blocks, room for one beside the pins
    assert cache.pin(8, list(range(8))) == 4 and cache.stats().pinned_blocks == 4  # its second block was evicted
    assert cache.unpin(7, document) == 12 and cache.stats().pinned_blocks == 1
    for i in range(6):
        cache.store(7, [50 + i] * 8, block)
    assert cache.cached_length(7, document + [0]) == 0  # evicted like any other block once unpinned
    cache.store(7, document, block)
    cache.pin(7, document)
    cache.retain({8})  # its adapter was removed: the pin goes with it
    assert cache.cached_length(7, document + [0]) == 0 and cache.stats().pinned_bytes == one  # owner 8's stays


def test_engine_pins_a_document_and_requests_reuse_it_exactly(base, dtype):
    """A pinned document stays cached through traffic that would evict it, and a question about it gives the
    tokens it gives with no cache at all (bit for bit in bf16)."""
    adapter = random_adapter(5, seed=4)
    plain = Engine(base, {"a": adapter})
    cache = PrefixCache(1 << 17)
    engine = Engine(base, {"a": adapter}, prefix_cache=cache)
    document = engine.encode(HEAD * 3, adapter="a")[:-4]
    pinned = engine.pin_prefix(document, adapter="a")
    assert pinned == len(document) // 16 * 16 and cache.stats().pinned_blocks == pinned // 16
    rng = random.Random(0)
    noise = [GenerationRequest(engine.encode(rng.choice(TAILS) * 20, adapter="a"), adapter="a", max_new_tokens=2)
             for _ in range(6)]  # fmt: skip
    engine.generate(noise)
    assert cache.stats().evicted_blocks > 0  # the traffic did overflow the cache
    owner = engine.prompt_cache.identity("a")
    assert cache.cached_length(owner, document + [1]) == pinned
    question = GenerationRequest(document + engine.encode("Why?"), adapter="a", max_new_tokens=8)
    before = cache.stats().cached_tokens
    (got,) = engine.generate([question])
    (want,) = plain.generate([question])
    assert cache.stats().cached_tokens - before == pinned
    assert got.token_ids == want.token_ids
    assert engine.unpin_prefix(document, adapter="a") == pinned
    small = Engine(base, {"a": adapter}, prefix_cache=PrefixCache(cache.stats().bytes // 8))
    with pytest.raises(ValueError) as err:
        small.pin_prefix(document, adapter="a")
    assert str(err.value).startswith(f"the prefix cache ({small.prefix_cache.max_bytes:,} bytes) cannot hold this ")
    assert small.prefix_cache.stats().pinned_blocks == 0


def test_store_computes_only_blocks_it_does_not_hold():
    cache = PrefixCache(1 << 20, block_tokens=4)
    asked = []

    def kv(start):
        asked.append(start)
        return block(start)

    cache.store(1, list(range(12)), kv)
    cache.store(1, list(range(8)) + [0, 0, 0, 0, 5], kv)
    assert asked == [0, 4, 8, 8] and len(cache) == 4 and cache.stats().stored_blocks == 4


def test_lru_eviction_keeps_memory_bounded_and_evicts_leaves_first():
    size = block(0).numel() * block(0).element_size()
    cache = PrefixCache(3 * size, block_tokens=4)
    first, second = list(range(13)), [50 + i for i in range(9)]
    cache.store(1, first, block)  # blocks a0 a1 a2
    cache.store(1, second, block)  # b0 b1: two of first's blocks must go, its leaves (a2, then a1)
    stats = cache.stats()
    assert stats.bytes == 3 * size and stats.blocks == 3 and stats.evicted_blocks == 2
    assert cache.match(1, first).shape[3] == 4  # a0 is still reachable: a parent outlives its children
    assert cache.match(1, second).shape[3] == 8
    cache.store(1, first, block)  # a0 was touched last: b1, then b0 make room for a1, a2
    assert cache.match(1, first).shape[3] == 12 and cache.match(1, second) is None
    assert cache.stats().bytes <= 3 * size


def test_a_block_larger_than_the_budget_is_not_kept():
    cache = PrefixCache(10, block_tokens=4)
    cache.store(1, list(range(9)), block)
    assert len(cache) == 0 and cache.match(1, list(range(9))) is None


def test_retain_drops_the_blocks_of_owners_that_are_gone():
    cache = PrefixCache(1 << 20, block_tokens=4)
    for owner in (1, 2, 3):
        cache.store(owner, list(range(9)), block)
    cache.retain({1, 3})
    assert cache.match(2, list(range(9))) is None and cache.match(3, list(range(9))) is not None
    assert cache.stats().blocks == 4 and cache.stats().evicted_blocks == 2
    cache.clear()
    assert len(cache) == 0 and cache.stats().bytes == 0


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 0, got -1"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="block_tokens must be an integer >= 1, got 0"):
        PrefixCache(1024, block_tokens=0)


# ---- the engine: cached equals uncached ----------------------------------------------------------------------------


def method_adapters(base) -> dict[str, Adapter]:
    """A visibly different adapter of each method (2, 3 and 4 virtual tokens), plus a plain prompt of 7."""
    out = {"plain": random_adapter(7, seed=3)}
    for i, method in enumerate(METHODS):
        module = build_prompt(base, method, "random", 2 + i, seed=10 + i)
        with torch.no_grad():
            tensor = module().detach().float() + 0.5 * torch.randn(
                module().shape, generator=torch.Generator().manual_seed(i)
            )
        peft_type = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "ptuning": "P_TUNING"}[method]
        out[method] = Adapter(embeddings=tensor, config={"peft_type": peft_type, "num_virtual_tokens": 2 + i})
    return out


@pytest.fixture(scope="module")
def engine(base):
    return Engine(base, method_adapters(base))


def same(a: torch.Tensor, b: torch.Tensor, dtype) -> bool:
    """Row-exact mode (bf16) promises bit-identical logits; fp32 keeps batched kernels, equal to rounding."""
    return torch.equal(a, b) if dtype != torch.float32 else torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def decode(engine, requests, prefix_cache=None, join_at=None):
    """Every request's (tokens, logits [steps, V]) from one batch; rows from `join_at` on join the live batch after
    one step."""
    batch = DecodeBatch(engine.base, engine.prompt_cache, keep_logits=True, prefix_cache=prefix_cache)
    split = len(requests) if join_at is None else join_at
    events = batch.add(requests[:split])
    if split < len(requests):
        events += batch.step() + batch.add(requests[split:])
    while len(batch):
        events += batch.step()
    return {
        id(r): (
            [e.token_id for e in events if e.request is r],
            torch.stack([e.logits for e in events if e.request is r]),
        )
        for r in requests
    }


def request(engine, text, adapter, max_new_tokens=8):
    return GenerationRequest(encode_text(engine.base.tokenizer, text), adapter=adapter, max_new_tokens=max_new_tokens)


def assert_equal_to_uncached(engine, requests, got, dtype):
    for r in requests:
        alone = decode(engine, [r])[id(r)]
        assert got[id(r)][0] == alone[0], (r.adapter, r.prompt_ids)
        assert same(got[id(r)][1], alone[1], dtype), (r.adapter, r.prompt_ids)


@pytest.mark.parametrize("adapter", [None, "plain"] + METHODS)
def test_cached_prompt_start_gives_the_uncached_tokens_and_logits(engine, adapter, dtype):
    cache = PrefixCache(1 << 20)
    decode(engine, [request(engine, HEAD + "warm up", adapter)], cache)
    assert cache.stats().blocks == len(HEAD + "warm up") // 16
    requests = [request(engine, HEAD + tail, adapter) for tail in TAILS] + [request(engine, HEAD + "warm up", adapter)]
    got = {}
    for r in requests:  # one at a time: each row alone, with its cached start
        got.update(decode(engine, [r], cache))
    assert_equal_to_uncached(engine, requests, got, dtype)
    stats = cache.stats()
    assert stats.hits == len(requests) and stats.cached_tokens >= len(requests) * (len(HEAD) // 16 * 16)


def test_mixed_batch_where_some_rows_hit_and_some_miss(engine, dtype):
    cache = PrefixCache(1 << 20)
    decode(engine, [request(engine, HEAD + "warm", a) for a in ("prompt", "prefix", None)], cache)
    rng = random.Random(0)
    requests = [
        request(engine, HEAD + tail, adapter, rng.randint(1, 9))
        for tail, adapter in [
            (TAILS[0], "prompt"),
            (TAILS[1], "ptuning"),
            (TAILS[2], "prefix"),
            (TAILS[3], None),
            (TAILS[4], "plain"),
            (TAILS[5], "prompt"),
        ]
    ]
    requests += [request(engine, text, adapter) for text, adapter in [("short one", "prefix"), ("hi", None)]]
    rng.shuffle(requests)
    before = cache.stats().hits
    got = decode(engine, requests, cache, join_at=3)
    assert cache.stats().hits - before == 4  # HEAD was cached for prompt, prefix and the base model only
    assert_equal_to_uncached(engine, requests, got, dtype)


def test_a_burst_sharing_a_new_prompt_start_computes_it_once(engine, dtype, monkeypatch):
    cache = PrefixCache(1 << 20)
    requests = [request(engine, HEAD + tail, adapter) for tail in TAILS[:4] for adapter in ("ptuning", None)]
    requests.append(request(engine, "unrelated", "ptuning"))
    prefills = []
    original = DecodeBatch._prefill
    monkeypatch.setattr(DecodeBatch, "_prefill", lambda self, *a: prefills.append(len(a[0])) or original(self, *a))
    batch = DecodeBatch(engine.base, engine.prompt_cache, keep_logits=True, prefix_cache=cache)
    events = batch.add(requests)
    assert [e.request for e in events] == requests  # first tokens in request order, whatever the waves
    assert prefills == [3, 6]  # the first row of each adapter computes HEAD (and "unrelated" runs at once) ...
    stats = cache.stats()
    assert stats.hits == 6 and stats.cached_tokens == 6 * (len(HEAD) // 16 * 16)  # ... the others find it
    while len(batch):
        events += batch.step()
    got = {
        id(r): (
            [e.token_id for e in events if e.request is r],
            torch.stack([e.logits for e in events if e.request is r]),
        )
        for r in requests
    }
    monkeypatch.setattr(DecodeBatch, "_prefill", original)
    assert_equal_to_uncached(engine, requests, got, dtype)
    prefills.clear()
    monkeypatch.setattr(DecodeBatch, "_prefill", lambda self, *a: prefills.append(len(a[0])) or original(self, *a))
    DecodeBatch(engine.base, engine.prompt_cache, prefix_cache=cache).add(requests)
    assert prefills == [len(requests)]  # all cached now: one prefill


def test_a_tiny_budget_evicts_and_answers_stay_equal(engine, dtype):
    probe = PrefixCache(1 << 20)
    decode(engine, [request(engine, "x" * 17, None)], probe)
    block_bytes = probe.stats().bytes
    cache = PrefixCache(3 * block_bytes)
    requests = [request(engine, HEAD + tail, adapter) for tail in TAILS[:3] for adapter in ("prompt", "prefix")]
    got = {}
    for r in requests + requests[::-1]:
        got.update(decode(engine, [r], cache))
        assert cache.stats().bytes <= 3 * block_bytes
    stats = cache.stats()
    assert stats.evicted_blocks > 0 and stats.hits > 0
    assert_equal_to_uncached(engine, requests, got, dtype)


def test_a_replaced_adapter_never_meets_the_blocks_of_the_old_one(base, dtype):
    cache = PrefixCache(1 << 20)
    engine = Engine(base, {"a": random_adapter(5, seed=1)}, prefix_cache=cache)
    r = request(engine, HEAD + TAILS[0], "a")
    old = engine.generate([r])[0].token_ids
    assert engine.generate([r])[0].token_ids == old and cache.stats().hits == 1
    engine.add_adapter("a", random_adapter(5, seed=2))  # a hot swap under the same name
    new = engine.generate([r])[0].token_ids
    stats = cache.stats()
    assert stats.hits == 1 and stats.evicted_blocks == len(r.prompt_ids) // 16  # the old blocks are gone
    assert new == Engine(base, {"a": random_adapter(5, seed=2)}).generate([r])[0].token_ids
    assert new != old
    engine.prompt_cache.remove("a")
    engine.generate([request(engine, "hello there", None)])
    assert cache.stats().blocks == 0


def test_engine_generate_and_stream_share_one_cache(base, dtype):
    adapters = method_adapters(base)
    cache = PrefixCache(1 << 20)
    cached, plain = Engine(base, adapters, prefix_cache=cache), Engine(base, adapters)
    requests = [request(plain, HEAD + tail, adapter) for tail in TAILS[:3] for adapter in [None] + METHODS]
    results = cached.generate(requests, batch_size=3)
    assert [x.token_ids for x in results] == [x.token_ids for x in plain.generate(requests, batch_size=3)]
    assert cache.stats().hits > 0
    streamed = [e.token_id for e in cached.stream(requests[1])]
    assert streamed == results[1].token_ids


# ---- the real default model: a long shared system prompt -------------------------------------------------------------


SYSTEM = " ".join(f"Rule {i}: answer politely, and check the facts about topic {i}." for i in range(30))
QUESTIONS = [
    "What is the capital of France?",
    "Name two primary colours.",
    "Why is the sky blue?",
    "What is 12 times 7?",
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["float32", BF16])
def test_real_model_answers_with_a_cached_system_prompt_equal_uncached(dtype_name):
    """SmolLM2-135M, a ~500-token system prompt shared by chat requests for the base model and an adapter: the
    cached prefill runs only the question, and gives the uncached tokens (bf16: the same logits bit for bit; fp32:
    measured within ~5e-5)."""
    base = load_base(device="cpu", dtype=dtype_name)
    prompt = SoftPrompt.initialise(base, "vocab", num_virtual_tokens=8, seed=0)
    engine = Engine(
        base,
        {"t": Adapter(embeddings=prompt.embeddings.detach().cpu(), config={"num_virtual_tokens": 8})},
        Template(CHAT),
    )
    messages = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    requests = [
        GenerationRequest(engine.encode_chat(m, a), adapter=a, max_new_tokens=6) for m in messages for a in (None, "t")
    ]
    assert min(len(r.prompt_ids) for r in requests) > 500
    cache = PrefixCache(64 << 20)
    got = {}
    for r in requests:
        got.update(decode(engine, [r], cache))
    stats = cache.stats()
    assert stats.hits == len(requests) - 2 and stats.cached_tokens >= (len(requests) - 2) * 480
    for r in requests:
        tokens, logits = decode(engine, [r])[id(r)]
        assert got[id(r)][0] == tokens
        if base.dtype == torch.float32:
            assert torch.allclose(got[id(r)][1], logits, atol=5e-4, rtol=0)
        else:
            assert torch.equal(got[id(r)][1], logits)


# ---- the server ----------------------------------------------------------------------------------------------------


def chat_adapter(base, folder, name, seed):
    prompt = SoftPrompt.initialise(base, "random", num_virtual_tokens=4, seed=seed)
    save_adapter(folder / name, prompt.embeddings * 8, base, template=Template(CHAT))


def test_server_reuses_a_shared_system_prompt_and_answers_as_without_it(tiny, tmp_path):
    from serve_helpers import LiveServer, alone

    chat_adapter(tiny, tmp_path, "helper", seed=1)
    engine = Engine(tiny, {"helper": load_adapter(tmp_path / "helper", tiny)}, Template("human-assistant"))
    system = {"role": "system", "content": HEAD * 2}
    with LiveServer(create_app(tiny, tmp_path, max_tokens_cap=64)) as live:
        for question in TAILS[:4]:
            messages = [system, {"role": "user", "content": question}]
            out = live.client.chat.completions.create(model="helper", messages=messages, max_tokens=8, temperature=0)
            ref = alone(engine, engine.encode_chat(messages, "helper"), "helper", 8)
            assert out.choices[0].message.content == ref.text
            text = HEAD + question
            out = live.client.completions.create(model="base", prompt=text, max_tokens=8, temperature=0)
            assert out.choices[0].text == alone(engine, encode_text(tiny.tokenizer, text), None, 8).text
        health = httpx.get(live.url + "/health").json()
    stats = health["prefix_cache"]
    assert stats["hits"] == 6 and stats["cached_tokens"] >= 3 * (2 * len(HEAD) // 16 * 16)
    assert stats["max_bytes"] == DEFAULT_PREFIX_CACHE_MB << 20 and stats["bytes"] > 0
    with LiveServer(create_app(tiny, tmp_path, prefix_cache_mb=0)) as live:
        assert httpx.get(live.url + "/health").json()["prefix_cache"] is None


def test_server_hot_swap_drops_the_old_adapters_blocks(tmp_path):
    from serve_helpers import LiveServer, alone

    tiny = peaked_base()  # its answers depend on the soft prompt even behind a long prompt
    folder = tmp_path / "adapters"
    chat_adapter(tiny, folder, "swap", seed=1)
    text = HEAD * 2 + "The cat sat on"

    def answer(live):
        return live.client.completions.create(model="swap", prompt=text, max_tokens=10, temperature=0).choices[0].text

    with LiveServer(create_app(tiny, folder, allow_admin=True)) as live:
        old = answer(live)
        assert answer(live) == old and live.state.prefix_cache.stats().hits == 1
        chat_adapter(tiny, folder, "swap", seed=2)
        assert httpx.post(live.url + "/v1/adapters", json={"name": "swap", "replace": True}).status_code == 201
        new = answer(live)
        assert live.state.prefix_cache.stats().hits == 1  # the new adapter's first request found nothing
    engine = Engine(tiny, {"swap": load_adapter(folder / "swap", tiny)})
    assert new == alone(engine, encode_text(tiny.tokenizer, text), "swap", 10).text
    assert new != old and old and new


def test_the_budget_option_is_declared_once_with_its_range():
    assert ServeConfig().prefix_cache_mb == DEFAULT_PREFIX_CACHE_MB == 256
    assert ServeConfig(prefix_cache_mb=0).prefix_cache_mb == 0
    with pytest.raises(OptionError, match=r"^--prefix-cache-mb must be >= 0, got -1$"):
        ServeConfig(prefix_cache_mb=-1)
    with pytest.raises(OptionError, match=r"^--prefix-cache-mb must be <= 1048576, got 2000000$"):
        ServeConfig(prefix_cache_mb=2_000_000)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_a_cached_block_does_not_depend_on_the_prompt_that_computed_it(method):
    """SmolLM2-135M in bf16: the blocks a 50-token shared start leaves in the cache are the same tensors whether a
    short or a long prompt computed them (SDPA rounds a query differently with more keys after it, so the engine
    runs a prefill's attention block by block), and a prompt that reuses a sibling's blocks answers bit for bit as
    alone."""
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16")
    base = load_base(device="cpu", dtype="bfloat16")
    width = base_width(method, base)
    adapter = Adapter(
        embeddings=torch.randn(8, width, generator=torch.Generator().manual_seed(0)) * 0.3,
        config={"num_virtual_tokens": 8, "peft_type": {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}[method]},
    )
    engine = Engine(base, {"t": adapter})
    head = "the careful assistant answers briefly, checks every fact twice and never invents a source; " * 3
    short, long = (
        encode_text(base.tokenizer, head + tail)
        for tail in ("why?", "why is the sky blue, and why do the cats and the dogs never check a fact twice?")
    )
    blocks = []
    for ids in (short, long):
        cache = PrefixCache(16 << 20)
        decode(engine, [GenerationRequest(ids, adapter="t", max_new_tokens=1)], cache)
        blocks.append(cache.match(engine.prompt_cache.identity("t"), short + [0] * 16))
    assert blocks[0].shape[3] == 16 * (len(short) // 16) >= 32
    assert torch.equal(blocks[0], blocks[1][:, :, :, : blocks[0].shape[3]])
    cache = PrefixCache(16 << 20)
    decode(engine, [GenerationRequest(long, adapter="t", max_new_tokens=1)], cache)
    request = GenerationRequest(short, adapter="t", max_new_tokens=4)
    tokens, logits = decode(engine, [request], cache)[id(request)]
    assert cache.stats().cached_tokens >= 32
    alone_tokens, alone_logits = decode(engine, [request])[id(request)]
    assert tokens == alone_tokens and torch.equal(logits, alone_logits)
