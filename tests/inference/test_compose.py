"""Composed key/value adapters (`a+b`, formats/compose.py) through the engine: the same tokens as the one adapter
whose tensor is the parts' concatenated (the folder `softprompt compose` writes) and as a cache-free greedy loop; beside
plain requests in one decode batch; with the prefix cache (blocks reused, forgotten when a part is replaced); and
every bad composition refused in one line."""

import pytest
import torch
from engine_helpers import BF16, base, dtype, peaked_base, reference_greedy  # noqa: F401 (fixtures)

from softprompt.core.forward import Virtual, prefix_width
from softprompt.formats.adapter import Adapter, AdapterError, load_adapter, save_adapter
from softprompt.formats.compose import compose, load_spec, write_composition
from softprompt.inference.batch import GenerationRequest
from softprompt.inference.engine import Engine
from softprompt.inference.prefix_cache import PrefixCache
from softprompt.inference.prompt_cache import UnknownAdapterError

IDS = [7, 12, 30, 41, 9, 22, 15, 8]


def kv_adapter(base, n: int, seed: int, method: str = "cartridge", frozen: int = 1) -> Adapter:
    """Random keys/values of n virtual tokens for `base` (a cartridge with `frozen` frozen tokens, or a prefix)."""
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(n, prefix_width(base.model), generator=generator)
    peft_type = {"cartridge": "CARTRIDGE", "prefix": "PREFIX_TUNING"}[method]
    config = {"peft_type": peft_type, "num_virtual_tokens": n, "task_type": "CAUSAL_LM"}
    if method == "cartridge":
        config["num_frozen_tokens"] = frozen
    return Adapter(embeddings=tensor, config=config)


@pytest.fixture(scope="module")
def parts(base):
    return {"a": kv_adapter(base, 3, 1), "b": kv_adapter(base, 5, 2), "p": kv_adapter(base, 4, 3, "prefix")}


def greedy(engine, adapter, ids=IDS, n=10, batch_size=1):
    return engine.generate([GenerationRequest(list(ids), adapter=adapter, max_new_tokens=n)], batch_size)[0].token_ids


@pytest.mark.parametrize("name", ["a+b", "a+p+b", "a+a"])
def test_a_composition_runs_as_the_concatenated_adapter(base, parts, name):
    engine = Engine(base, parts)
    names = name.split("+")
    tensor = torch.cat([parts[p].embeddings for p in names])
    joined = Engine(base, {"one": Adapter(tensor, {"peft_type": "CARTRIDGE", "num_virtual_tokens": len(tensor)})})
    tokens = greedy(engine, name)
    assert tokens == greedy(joined, "one")
    if base.dtype == torch.float32:  # the cache-free loop is another computation: in bf16 it rounds differently
        assert tokens == reference_greedy(base, Virtual(tensor.to(base.device), "cartridge"), IDS, 10)[0]
    assert tokens != greedy(engine, names[0])  # the later parts matter
    assert engine.prompt_cache.num_virtual_tokens(name) == len(tensor)


def test_the_order_of_the_parts_does_not_change_the_tokens(base, parts):
    """Attention does not see the order of the keys in front (each part's keys carry their own rotation) and the
    text starts at the same position, so a+b and b+a answer alike (their frozen tokens, a's or b's, differ)."""
    engine = Engine(base, parts)
    assert greedy(engine, "a+b") == greedy(engine, "b+a") != greedy(engine, "a")


def test_a_composition_beside_plain_requests_in_one_batch(base, parts):
    engine = Engine(base, parts)
    adapters = [None, "a", "a+b", "b", "p+a", "a+b"]
    prompts = [IDS[: 3 + i] for i in range(len(adapters))]
    requests = [GenerationRequest(list(p), adapter=a, max_new_tokens=8) for p, a in zip(prompts, adapters)]
    mixed = [r.token_ids for r in engine.generate(requests, batch_size=len(requests))]
    assert mixed == [greedy(engine, a, p, 8) for p, a in zip(prompts, adapters)]


def test_a_composition_uses_the_prefix_cache_and_forgets_it_when_a_part_changes(base, parts):
    engine = Engine(base, parts, prefix_cache=PrefixCache(1 << 22, block_tokens=4))
    plain = Engine(base, parts)
    long = IDS * 3
    first = greedy(engine, "a+b", long)
    before = engine.prefix_cache.stats().cached_tokens
    assert greedy(engine, "a+b", long) == first == greedy(plain, "a+b", long)
    assert engine.prefix_cache.stats().cached_tokens - before == 20  # 5 whole blocks of the 24 tokens, reused
    assert engine.prompt_cache.identity("a+b") != engine.prompt_cache.identity("b+a")
    identity = engine.prompt_cache.identity("a+b")
    assert engine.pin_prefix(long, "a+b") == 24
    engine.add_adapter("b", kv_adapter(base, 5, 9))  # b replaced: a+b is a new composition, its blocks go
    assert engine.prompt_cache.identity("a+b") != identity
    greedy(engine, "a", long)  # any admission forgets the owners that are gone
    assert engine.prefix_cache.stats().pinned_blocks == 0
    assert greedy(engine, "a+b", long) == greedy(Engine(base, {**parts, "b": kv_adapter(base, 5, 9)}), "a+b", long)


def test_bad_compositions_are_refused_in_one_line(base, parts):
    engine = Engine(base, {**parts, "soft": Adapter(torch.randn(3, base.hidden_size), {"num_virtual_tokens": 3})})
    cases = {
        "a+x": (UnknownAdapterError, "composition 'a+x': part 'x' is not loaded (loaded: a, b, p, soft)"),
        "a+": (AdapterError, "composition 'a+' has an empty part: join two or more adapter names with '+', e.g. 'a+b'"),
        "a+soft": (
            AdapterError,
            "composition 'a+soft': part 'soft' is a prompt adapter; only key/value adapters (prefix, cartridge) "
            "compose, by concatenating their keys/values",
        ),
    }
    for name, (kind, message) in cases.items():
        with pytest.raises(kind) as err:
            engine.generate([GenerationRequest(list(IDS), adapter=name, max_new_tokens=2)])
        assert str(err.value) == message
    long = Engine(base, {"big": kv_adapter(base, 300, 4), "big2": kv_adapter(base, 300, 5)})
    with pytest.raises(
        AdapterError, match=r"^big\+big2: 600 virtual tokens do not fit the base model's context of 512"
    ):
        greedy(long, "big+big2")
    fits = Engine(base, {"mid": kv_adapter(base, 200, 6)})
    with pytest.raises(ValueError) as err:
        fits.generate([GenerationRequest(list(IDS) * 14, adapter="mid+mid", max_new_tokens=2)])
    assert str(err.value) == (
        "prompt too long: 400 virtual tokens + 112 prompt tokens + max_new_tokens 2 = 514 exceeds the model's "
        "context of 512 tokens; shorten the prompt, lower max_new_tokens, or ask for truncation"
    )


def test_parts_for_another_model_are_refused(base, parts, tmp_path):
    other = peaked_base(hidden=64)
    save_adapter(tmp_path / "a", parts["a"].embeddings, base, method="cartridge")
    save_adapter(tmp_path / "wide", kv_adapter(other, 2, 1).embeddings, other, method="cartridge")
    with pytest.raises(AdapterError) as err:
        compose([load_adapter(tmp_path / "a"), load_adapter(tmp_path / "wide")], ["a", "wide"])
    assert str(err.value) == (
        f"composition 'a+wide': part 'wide' has keys/values of width {prefix_width(other.model)} but part 'a' has "
        f"{prefix_width(base.model)}: they are for models of different shapes"
    )
    with pytest.raises(AdapterError) as err:
        load_spec(f"{tmp_path / 'a'}+{tmp_path / 'wide'}", base)
    assert str(err.value) == (
        f"{tmp_path / 'wide'}: cartridge of width 128 (2 layers x 2 x token_dim 32) does not fit the base model "
        "peaked-llama: its cartridges have width 64 = 2 layers x 2 x 2 kv heads x 8 head dim"
    )
    deep = peaked_base(hidden=16, layers=4)  # the same width, 4 layers x 2 x token_dim 8 instead of 2 x 16
    save_adapter(tmp_path / "deep", kv_adapter(deep, 2, 1).embeddings, deep, method="cartridge")
    with pytest.raises(AdapterError) as err:
        write_composition([tmp_path / "a", tmp_path / "deep"], tmp_path / "out")
    assert str(err.value) == (
        f"composition '{tmp_path / 'a'}+{tmp_path / 'deep'}': part '{tmp_path / 'deep'}' has num_layers 4 but part "
        f"'{tmp_path / 'a'}' has 2: they are for models of different shapes"
    )
    with pytest.raises(AdapterError, match=r"compose two or more adapters"):
        write_composition([tmp_path / "a"], tmp_path / "out")
