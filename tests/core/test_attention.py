"""grouped_sdpa (CPU attention without key/value head copies) computes what transformers' sdpa and eager compute."""

import copy

import pytest
import torch
from helpers import text_logits

from softprompt.core import attention
from softprompt.core.forward import label_nll


def _batch(tiny):
    torch.manual_seed(1)
    ids = torch.randint(5, len(tiny.tokenizer), (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("reference", ["sdpa", "eager"])
def test_grouped_sdpa_equals_transformers_attention(tiny, reference):
    assert tiny.model.config._attn_implementation == attention.NAME
    assert tiny.model.config.num_key_value_heads < tiny.model.config.num_attention_heads  # grouped heads
    other = copy.deepcopy(tiny.model)
    other.set_attn_implementation(reference)
    prompt = (torch.randn(3, tiny.hidden_size) * 0.1).requires_grad_()
    ids, mask = _batch(tiny)
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (tiny.model, other):
        logits = text_logits(model, prompt, ids, mask)
        nll, count = label_nll(model, prompt, ids, mask, labels)
        (grad,) = torch.autograd.grad(nll.sum() / count.sum(), prompt)
        results.append((logits.detach(), grad))
    keep = mask.bool()
    assert torch.allclose(results[0][0][keep], results[1][0][keep], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_grouped_sdpa_leaves_other_attention_alone(tiny):
    other = copy.deepcopy(tiny.model)
    other.set_attn_implementation("eager")
    assert attention.use_grouped_sdpa(other) is False
    assert other.config._attn_implementation == "eager"


def _module(heads=4, kv_heads=2):
    return type("Attn", (), {"num_key_value_groups": heads // kv_heads, "is_causal": True})()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_exact_attention_gives_a_row_the_same_bits_alone_and_padded(dtype):
    """A row's queries and keys placed after other rows' pads, with pads between its prompt and its new tokens, or
    alone: in row-exact mode the attention output of its real queries is bit-identical."""
    torch.manual_seed(0)
    heads, kv_heads, dim, n_keys, n_new = 4, 2, 8, 11, 5
    q = torch.randn(1, heads, n_new, dim, dtype=dtype)
    k = torch.randn(1, kv_heads, n_keys, dim, dtype=dtype)
    v = torch.randn(1, kv_heads, n_keys, dim, dtype=dtype)
    causal = torch.ones(n_new, n_keys, dtype=torch.bool).tril(n_keys - n_new)

    def run(q, k, v, mask, live=None):
        with attention.row_exact(live):
            return attention.grouped_sdpa(_module(), q, k, v, mask, scaling=dim**-0.5)[0]

    alone = run(q, k, v, causal[None, None])
    # batch of 3: row 1 is ours with 4 left pads and 2 pad queries (right-padded block); rows 0 and 2 are noise
    left, extra = 4, 2
    t, lq = left + n_keys + extra, n_new + extra
    qb, kb, vb = (
        torch.randn(3, heads, lq, dim, dtype=dtype),
        torch.randn(3, kv_heads, t, dim, dtype=dtype),
        torch.randn(3, kv_heads, t, dim, dtype=dtype),
    )
    key_cols = list(range(left, left + n_keys - n_new)) + list(range(t - lq, t - lq + n_new))
    qb[1, :, :n_new] = q[0]
    kb[1, :, key_cols], vb[1, :, key_cols] = k[0], v[0]
    real = torch.zeros(3, t, dtype=torch.bool)
    real[:, key_cols] = True
    mask = (torch.ones(lq, t, dtype=torch.bool).tril(t - lq)[None] & real[:, None, :])[:, None]
    batched = run(qb, kb, vb, mask)
    assert torch.equal(batched[1, :n_new], alone[0])
    assert torch.allclose(
        alone.float(),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
        .transpose(1, 2)
        .float(),
        atol=1e-2 if dtype == torch.bfloat16 else 1e-6,
    )
    ghosts = run(qb, kb, vb, mask, live=2)  # rows past `live` are ghosts: skipped, zero output
    assert torch.equal(ghosts[:2], batched[:2]) and not ghosts[2].any()


def test_row_exact_mode_matches_batched_attention_in_fp32(tiny):
    """The row-exact path computes the same attention (to rounding) as the batched one, on padded batches."""
    prompt = torch.randn(3, tiny.hidden_size) * 0.1
    ids, mask = _batch(tiny)
    with torch.no_grad():
        batched = text_logits(tiny.model, prompt, ids, mask)
        with attention.row_exact():
            rows = text_logits(tiny.model, prompt, ids, mask)
    keep = mask.bool()
    assert torch.allclose(batched[keep], rows[keep], atol=1e-5)


def _masked_inputs(dtype, batch=3, q_len=7, prefix=4, heads=6, kv_heads=2, dim=16):
    """Queries after `prefix` keys, right-padded rows (row 1 has 2 pad tokens, row 2 has 5), the bool mask
    transformers' sdpa_mask gives: causal over the row's own tokens, every prefix key, no pad key."""
    torch.manual_seed(3)
    k_len = prefix + q_len
    q = torch.randn(batch, q_len, heads, dim).to(dtype).transpose(1, 2)  # the layout attention hands SDPA
    k, v = (torch.randn(batch, kv_heads, k_len, dim).to(dtype) for _ in range(2))
    real = torch.ones(batch, k_len, dtype=torch.bool)
    real[1, -2:], real[2, -5:] = False, False
    mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(prefix)[None] & real[:, None, :]
    return q, k, v, mask[:, None]


def _attention_grads(fn, q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_attention_forward_is_sdpas_and_its_gradients_are_as_accurate(dtype):
    """grouped_sdpa where autograd needs the product (bf16: GroupedAttention) gives F.scaled_dot_product_attention's
    forward bits, and gradients of q, k, v that agree with fp64 autograd at least as well as SDPA's own backward
    (bf16: within 1e-2 of the largest gradient; fp32, SDPA's backward itself: 1e-5)."""
    q, k, v, mask = _masked_inputs(dtype)
    grad = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], generator=torch.Generator().manual_seed(5))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mine = _attention_grads(lambda q, k, v: attention.grouped_sdpa(_module(6, 2), q, k, v, mask, scaling=0.25)[0],
                            q, k, v, grad)  # fmt: skip
    plain = _attention_grads(
        lambda q, k, v: sdpa(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True).transpose(1, 2), q, k, v, grad
    )
    exact = _attention_grads(
        lambda q, k, v: sdpa(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.25, enable_gqa=True)
        .transpose(1, 2),
        q, k, v, grad,
    )  # fmt: skip
    assert torch.equal(mine[0], plain[0])
    for ours, theirs, reference in zip(mine[1], plain[1], exact[1]):
        scale = reference.abs().max()
        ours_err = ((ours.double() - reference).abs().max() / scale).item()
        theirs_err = ((theirs.double() - reference).abs().max() / scale).item()
        assert ours.dtype == dtype and ours.shape == reference.shape
        assert ours_err <= max(theirs_err, 1e-6 if dtype == torch.float32 else 1e-3)
        assert ours_err < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_bf16_training_attention_runs_where_autograd_needs_it_and_not_elsewhere(tiny, monkeypatch):
    """bf16 training through the tiny model goes through GroupedAttention in every layer, scoring (no_grad) and fp32
    training through plain SDPA; a query that sees no key gets a zero gradient, not NaN."""
    calls = []
    original = attention.GroupedAttention.apply
    monkeypatch.setattr(attention.GroupedAttention, "apply", lambda *a: calls.append(1) or original(*a))
    ids, mask = _batch(tiny)
    labels = ids.masked_fill(mask == 0, -100)
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    for net, dtype, expected in (
        (tiny.model, torch.float32, 0),
        (model, torch.bfloat16, model.config.num_hidden_layers),
    ):
        prompt = (torch.randn(3, tiny.hidden_size) * 0.1).requires_grad_()
        with torch.no_grad():
            label_nll(net, prompt, ids, mask, labels)
        assert not calls
        nll, count = label_nll(net, prompt, ids, mask, labels)
        nll.sum().backward()
        assert len(calls) == expected and torch.isfinite(prompt.grad).all() and prompt.grad.any()
        calls.clear()
    q, k, v, bool_mask = _masked_inputs(torch.bfloat16)
    bool_mask = bool_mask.clone()
    bool_mask[0, :, 2] = False  # query 2 of row 0 sees nothing
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    attention.GroupedAttention.apply(*leaves, bool_mask, 0.25).float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert not leaves[0].grad[0, :, 2].any()
