"""grouped_sdpa (CPU attention without key/value head copies) computes what transformers' sdpa and eager compute."""

import copy

import pytest
import torch

from softprompt.core import attention
from helpers import text_logits
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
