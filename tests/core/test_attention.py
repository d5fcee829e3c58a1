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
