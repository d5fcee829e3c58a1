"""The decode step's fast parts give the bits of the plain ones: prepacked bf16 weights (core/packed.py), the cache
that appends in place (core/forward.py `GrowingLayer`), and the Llama decode path (`decode_body`) with its fused products (core/fused.py)."""

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import peaked_base, random_adapter

from softprompt.core import fused as fused_module
from softprompt.core import packed
from softprompt.core.attention import use_grouped_sdpa
from softprompt.core.forward import cache_tensors, decode_body, fast_decode, make_cache
from softprompt.core.models import cpu_has_native_bf16
from softprompt.inference import batch as batch_module
from softprompt.inference.batch import DecodeBatch, GenerationRequest
from softprompt.inference.engine import Engine

needs_bf16 = pytest.mark.skipif(
    not (cpu_has_native_bf16() and packed.supported()), reason="no native bf16 / oneDNN packing on this CPU"
)


@needs_bf16
def test_packed_linear_gives_the_plain_products_bits_and_steps_aside_when_it_must():
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 384).to(torch.bfloat16).requires_grad_(False)
    plain = torch.nn.Linear(256, 384).to(torch.bfloat16)
    plain.load_state_dict(layer.state_dict())
    assert packed.use_packed_linears(layer) == 1 and packed.use_packed_linears(layer) == 1  # idempotent
    x = torch.randn(5, 3, 256).to(torch.bfloat16)
    for rows in (1, 2, 3, 5):
        assert torch.equal(layer(x[:rows]), plain(x[:rows]))
        assert torch.equal(layer(x[:rows, 0]), plain(x[:rows, 0]))
    with packed.packed_weights(False):
        assert torch.equal(layer(x), plain(x))
    grad_x = x.clone().requires_grad_()
    out = layer(grad_x)  # autograd needs the product: plain F.linear, which it can differentiate
    assert out.grad_fn is not None and torch.equal(out.detach(), plain(x))
    with torch.no_grad():
        layer.weight.mul_(2)  # changed in place: the stale packed copy must not be used
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    packed.use_packed_linears(layer)  # repacked from the new weight
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer._softprompt_packed.version == layer.weight._version


def test_growing_cache_appends_like_concatenation_and_never_changes_a_view_it_gave():
    torch.manual_seed(0)
    k0, v0 = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    cache = make_cache([(k0, v0)])
    keys, values, views = k0, v0, []
    for step in range(150):  # past several reallocations (DECODE_SPARE columns each)
        k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
        got_k, got_v = cache.update(k, v, 0)
        keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
        views.append((got_k, keys.clone()))
    assert all(torch.equal(view, copy) for view, copy in views)
    assert torch.equal(cache_tensors(cache)[0][0], keys)
    block = torch.randn(2, 3, 7, 4)  # a multi-token append (a prefill chunk) too
    assert torch.equal(cache.update(block, block, 0)[0], torch.cat([keys, block], dim=2))


def test_growing_cache_concatenates_where_autograd_must_see_the_append():
    prefix = torch.randn(1, 2, 3, 4, requires_grad=True)
    cache = make_cache([(prefix, prefix)])
    keys, _ = cache.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 0)
    keys.sum().backward()
    assert torch.equal(prefix.grad, torch.ones_like(prefix))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["row-exact", "batched", "batched-grouped"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_decode_path_gives_the_model_forwards_bits(dtype, mode, threads, monkeypatch):
    """Decoding through `decode_body` (fused products or not) vs through the model's own forward, row-exact (forced
    in fp32, so it runs on any CPU) and not (fp32's default): the same tokens and bit-identical logits, for rows
    alone, with ghost rows, and rows joining a batch (left pads); batched with transformers' sdpa attention and with
    core/attention.py's grouped SDPA (what load_base switches a model to)."""
    if dtype == "bfloat16" and not cpu_has_native_bf16():
        pytest.skip("no native bf16 on this CPU")
    torch.set_num_threads(threads)  # bits depend on the thread count: both counts (conftest restores it)
    base = peaked_base(seed=3)
    base.model.to(getattr(torch, dtype))
    exact = mode == "row-exact"
    if mode == "batched-grouped":
        assert use_grouped_sdpa(base.model)
    monkeypatch.setattr(DecodeBatch, "exact", exact)
    engine = Engine(base, {"a": random_adapter(3, seed=1), "b": random_adapter(6, seed=2)})
    requests = [
        GenerationRequest(engine.encode(text, adapter=adapter), adapter=adapter, max_new_tokens=n)
        for text, adapter, n in [("tell me", None, 12), ("why sky", "a", 5), ("cats", "b", 9), ("a story", "a", 7)]
    ]

    def run(fast: bool, fused: bool, rows: list) -> list:
        monkeypatch.setattr(DecodeBatch, "fast_path", fast)
        monkeypatch.setattr(DecodeBatch, "fused", fused)
        batch = DecodeBatch(base, engine.prompt_cache, keep_logits=True)
        events = batch.add(rows[:1]) + batch.step() + batch.step() + batch.add(rows[1:])
        while len(batch):
            events += batch.step()
        return [(e.request.id, e.token_id, e.logits) for e in events]

    calls, products = [], []
    monkeypatch.setattr(batch_module, "decode_body", lambda *args: calls.append(1) or decode_body(*args))
    real_product = fused_module._product
    monkeypatch.setattr(fused_module, "_product", lambda *args: products.append(1) or real_product(*args))
    for rows in (requests[:1], requests):
        slow = run(False, False, rows)
        assert not calls
        for fused in (False, True):
            products.clear()
            fast = run(True, fused, rows)
            assert calls and fast_decode(base.model, exact)  # the fast path ran
            assert bool(products) == fused  # the fused products ran (only) when asked for
            calls.clear()
            assert [e[:2] for e in fast] == [e[:2] for e in slow]
            assert all(torch.equal(a[2], b[2]) for a, b in zip(fast, slow))


@pytest.mark.slow
def test_default_model_decodes_through_fused_products_with_the_model_forwards_bits(default_base, monkeypatch):
    """SmolLM2-135M in fp32 (batched kernels, the dtype --dtype auto picks on CPUs without fast bf16): a single
    stream and a mixed batch decoded through `decode_body` with fused products give the logits, bit for bit, of the
    model's own forward; every layer's q/k/v and gate/up groups are fused."""
    engine = Engine(default_base, {"p": random_adapter(5, hidden=default_base.hidden_size, seed=0)})
    texts = [("Write a long story about a lighthouse keeper.", None, 24), ("Name a colour.", "p", 8), ("Hi", None, 6)]
    requests = [
        GenerationRequest(engine.encode(text, adapter=adapter), adapter=adapter, max_new_tokens=n)
        for text, adapter, n in texts
    ]

    def run(fast: bool, rows: list) -> list:
        monkeypatch.setattr(DecodeBatch, "fast_path", fast)
        monkeypatch.setattr(DecodeBatch, "fused", fast)
        batch = DecodeBatch(default_base, engine.prompt_cache, keep_logits=True)
        events = batch.add(rows)
        while len(batch):
            events += batch.step()
        return [(e.request.id, e.token_id, e.logits) for e in events]

    for rows in (requests[:1], requests):
        fast, slow = run(True, rows), run(False, rows)
        assert [e[:2] for e in fast] == [e[:2] for e in slow]
        assert all(torch.equal(a[2], b[2]) for a, b in zip(fast, slow))
    # the probe fuses exactly the groups whose concatenated product gives the separate products' bits on this CPU
    # (MKL's one-row fp32 product on an AMD EPYC splits its sums by the output width, so there none is fused)
    layers = default_base.model.base_model.layers
    same = [concatenated_gives_the_same_bits(layer, group) for layer in layers for group in fused_module.GROUPS]
    assert fused_module.use_fused_projections(layers) == sum(same)
    if not any(same):
        pytest.skip("fp32 fused products round differently from the separate ones on this CPU: none fused")


def concatenated_gives_the_same_bits(layer, group: str) -> bool:
    """Directly: the product with the group's weights concatenated, split, equals each module's own product on the
    probe's row counts, at 1 thread and at the current count."""
    modules = fused_module._modules(layer, group)
    weight = torch.cat([m.weight for m in modules])
    x = torch.randn(max(fused_module.PROBE_ROWS), weight.shape[1], generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        for count in dict.fromkeys((1, threads)):
            torch.set_num_threads(count)
            for rows in fused_module.PROBE_ROWS:
                parts = F.linear(x[:rows], weight).split([m.out_features for m in modules], dim=-1)
                if not all(torch.equal(F.linear(x[:rows], m.weight), part) for m, part in zip(modules, parts)):
                    return False
    finally:
        torch.set_num_threads(threads)
    return True


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_rows_alone_equal_the_same_rows_in_a_mixed_batch(threads, monkeypatch):
    """Batch invariance with fused products (row-exact mode, forced in fp32): each row's logits alone are bit for
    bit its logits in a mixed batch with other adapters and prompt lengths."""
    torch.set_num_threads(threads)
    base = peaked_base(seed=5)
    monkeypatch.setattr(DecodeBatch, "exact", True)
    monkeypatch.setattr(DecodeBatch, "fused", True)
    engine = Engine(base, {"a": random_adapter(3, seed=1), "b": random_adapter(6, seed=2)})
    requests = [
        GenerationRequest(engine.encode(text, adapter=adapter), adapter=adapter, max_new_tokens=8)
        for text, adapter in [("tell me", None), ("why is the sky blue", "a"), ("cats", "b"), ("a story", "a")]
    ]

    def run(rows: list) -> dict:
        batch = DecodeBatch(base, engine.prompt_cache, keep_logits=True)
        events = batch.add(rows)
        while len(batch):
            events += batch.step()
        out = {}
        for e in events:
            out.setdefault(id(e.request), []).append((e.token_id, e.logits))
        return out

    together = run(requests)
    assert fused_module.use_fused_projections(base.model.base_model.layers) == 4  # 2 layers x 2 groups
    for request in requests:
        alone = run([request])[id(request)]
        assert [t for t, _ in alone] == [t for t, _ in together[id(request)]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(alone, together[id(request)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_with_rolled_halves_and_signed_sin_gives_rotate_halfs_bits(dtype):
    """decode_body's RoPE: x * cos + roll(x, D/2) * sin with sin's first half negated is, bit for bit,
    transformers' x * cos + rotate_half(x) * sin (negation is exact and rounding symmetric)."""
    from transformers.models.llama.modeling_llama import rotate_half

    generator = torch.Generator().manual_seed(0)
    for batch, heads, dim in ((2, 15, 64), (5, 6, 8), (1, 3, 128)):
        x = (torch.randn(batch, heads, 1, dim, generator=generator) * 4).to(dtype)
        cos = torch.randn(batch, 1, 1, dim, generator=generator).to(dtype)
        sin = torch.randn(batch, 1, 1, dim, generator=generator).to(dtype)
        half = dim // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        assert torch.equal((x * cos) + (x.roll(half, -1) * signed), (x * cos) + (rotate_half(x) * sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_gives_the_planned_attentions_bits(dtype):
    """A one-token step's attention with each row's query sliced (decode_attention) equals planned_attention, which
    gathers it, for rows with left pads, a row with every key real, and a ghost row past `live` (zeros)."""
    from softprompt.core.attention import decode_attention, decode_plan, planned_attention

    generator = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, length, dim = 4, 6, 2, 19, 16
    key_mask = torch.ones(batch, length, dtype=torch.long)
    key_mask[0, :7], key_mask[2, :3] = 0, 0  # left pads
    qk = torch.randn(batch, heads + kv_heads, 1, dim, generator=generator).to(dtype)
    query = qk[:, :heads]  # as decode_body slices it: not contiguous
    key = torch.randn(batch, kv_heads, length + 5, dim, generator=generator).to(dtype)[:, :, :length]
    value = torch.randn(batch, kv_heads, length + 5, dim, generator=generator).to(dtype)[:, :, :length]
    plan = decode_plan(key_mask, live=3)
    mine = decode_attention(plan, query, key, value, 0.25)
    theirs = planned_attention(plan, query, key, value, 0.25)
    assert torch.equal(mine, theirs) and not mine[3].any()


def test_decode_steps_fuse_by_default_only_in_bf16_on_a_cpu_with_native_bf16(monkeypatch):
    """DecodeBatch.fused None (the default) fuses q/k/v and gate/up in bf16 where the CPU has native bf16 (and
    oneDNN can pack weights), never in fp32; an explicit True / False wins."""
    engine_base = peaked_base(seed=3)
    assert DecodeBatch.fused is None
    assert not batch_module.fused_by_default(engine_base)  # fp32
    assert not DecodeBatch(engine_base, Engine(engine_base).prompt_cache).fused
    engine_base.model.to(torch.bfloat16)
    native = cpu_has_native_bf16() and packed.supported()
    assert batch_module.fused_by_default(engine_base) == native
    cache = Engine(engine_base).prompt_cache
    assert DecodeBatch(engine_base, cache).fused == native
    monkeypatch.setattr(batch_module, "cpu_has_native_bf16", lambda: False)
    assert not DecodeBatch(engine_base, cache).fused
    monkeypatch.setattr(DecodeBatch, "fused", True)
    assert DecodeBatch(engine_base, cache).fused


def test_the_decode_path_calls_a_hooked_module_through_its_hooks(monkeypatch):
    """decode_body runs a module's forward without the module call only where no hook would run: a forward hook on a
    projection, a norm or the MLP, or a global one, still fires at every decode step, and the tokens stay the same."""
    base = peaked_base(seed=3)
    monkeypatch.setattr(DecodeBatch, "exact", True)
    engine = Engine(base)
    request = GenerationRequest(engine.encode("tell me"), max_new_tokens=6)
    plain = engine.generate([request])[0].token_ids
    layer = base.model.base_model.layers[1]
    fired = []
    for module in (layer.self_attn.o_proj, layer.mlp.down_proj, layer.input_layernorm, base.model.base_model.norm):
        module.register_forward_hook(lambda m, args, out, m_=module: fired.append(m_))
    hooked = engine.generate([GenerationRequest(engine.encode("tell me"), max_new_tokens=6)])[0].token_ids
    assert hooked == plain
    steps = len(plain) - 1  # the first token comes from the prefill (the model's own forward)
    assert len(fired) == 4 * (1 + steps)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: fired.append(m))
    try:
        fired.clear()
        tokens = engine.generate([GenerationRequest(engine.encode("tell me"), max_new_tokens=3)])[0].token_ids
        assert len(tokens) == 3  # the prefill and two decode steps, each through q_proj's call
        assert sum(m is layer.self_attn.q_proj for m in fired) == 3
        assert sum(m is layer.mlp for m in fired) == 3  # the MLP module itself, not only its projections
    finally:
        handle.remove()
