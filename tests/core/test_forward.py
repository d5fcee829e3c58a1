"""The shared soft-prompt forward: kv and concat modes agree, rows are padding-invariant, the loss is exact."""

import pytest
import torch
import torch.nn.functional as F
from helpers import text_logits, tiny_llama

from softprompt.core import packed
from softprompt.core.forward import SharedPrefix, head_nll, label_nll, lm_logits
from softprompt.core.models import cpu_has_native_bf16

torch.manual_seed(0)


def _rows(tiny, lengths, left=False):
    ids = torch.randint(5, len(tiny.tokenizer), (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        if left:
            mask[r, max(lengths) - n :] = 1
        else:
            mask[r, :n] = 1
    return ids, mask


@pytest.mark.parametrize("left", [False, True])
def test_each_row_equals_the_row_alone(tiny, left):
    prompt = torch.randn(4, tiny.hidden_size) * 0.1
    ids, mask = _rows(tiny, [7, 3, 5], left)
    for mode in ("kv", "concat"):
        batch = text_logits(tiny.model, prompt, ids, mask, mode)
        for r in range(3):
            keep = mask[r].bool()
            alone = text_logits(
                tiny.model, prompt, ids[r : r + 1, keep], torch.ones(1, int(keep.sum()), dtype=torch.long)
            )
            assert torch.allclose(batch[r][keep], alone[0], atol=1e-5), (mode, r)


def test_kv_and_concat_modes_agree_with_gradients(tiny):
    prompt = (torch.randn(3, tiny.hidden_size) * 0.1).requires_grad_()
    ids, mask = _rows(tiny, [6, 4])
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for mode in ("kv", "concat"):
        nll, count = label_nll(tiny.model, prompt, ids, mask, labels, mode)
        (grad,) = torch.autograd.grad(nll.sum() / count.sum(), prompt)
        grads.append((nll.detach(), grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    assert grads[0][1].abs().sum() > 0


def test_label_nll_equals_cross_entropy_on_full_logits(tiny):
    prompt = torch.randn(2, tiny.hidden_size) * 0.1
    ids, mask = _rows(tiny, [8, 5])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt part of a record
    nll, count = label_nll(tiny.model, prompt, ids, mask, labels)
    # reference: full logits over [prompt ; text], shift by one, CE over labelled positions
    embeds = torch.cat([prompt.unsqueeze(0).expand(2, -1, -1), tiny.model.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(2, 2, dtype=torch.long), mask], 1)
    logits = tiny.model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, 1:-1]  # predicts text tokens
    full_labels = labels
    expected = (
        F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), full_labels.reshape(-1), reduction="none", ignore_index=-100
        )
        .view(2, -1)
        .sum(1)
    )
    assert torch.equal(count, (labels != -100).sum(1))
    assert torch.allclose(nll, expected, atol=1e-4)


def test_first_text_token_is_predicted_from_the_last_virtual_token(tiny):
    prompt = torch.randn(2, tiny.hidden_size) * 0.1
    ids = torch.tensor([[10, 11, 12]])
    labels = torch.tensor([[10, -100, -100]])
    nll, count = label_nll(tiny.model, prompt, ids, torch.ones_like(ids), labels)
    logits = tiny.model(inputs_embeds=prompt.unsqueeze(0)).logits[0, -1]
    assert count.tolist() == [1]
    assert torch.allclose(nll, F.cross_entropy(logits[None], torch.tensor([10])), atol=1e-5)


def test_without_prompt_equals_the_plain_model(tiny):
    ids, mask = _rows(tiny, [5, 5])
    assert torch.allclose(text_logits(tiny.model, None, ids, mask), tiny.model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("cap", [None, 3.0])
def test_fused_head_nll_equals_autograd_cross_entropy(tiny, cap, monkeypatch):
    monkeypatch.setattr(tiny.model.config, "final_logit_softcapping", cap, raising=False)
    hidden = (torch.randn(11, tiny.hidden_size) * 3).requires_grad_()
    targets = torch.randint(0, len(tiny.tokenizer), (11,))
    upstream = torch.rand(11)
    fused = head_nll(tiny.model, hidden, targets, chunk=4)  # 3 chunks, the last one short
    (fused_grad,) = torch.autograd.grad((fused * upstream).sum(), hidden)
    plain = F.cross_entropy(lm_logits(tiny.model, hidden), targets, reduction="none")
    (plain_grad,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    assert torch.allclose(fused, plain, atol=1e-5)
    assert torch.allclose(fused_grad, plain_grad, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(head_nll(tiny.model, hidden, targets, chunk=4), plain, atol=1e-5)
    assert head_nll(tiny.model, hidden[:0], targets[:0]).shape == (0,)


def test_shared_prefix_gives_the_gradient_of_per_batch_prompt_runs(tiny):
    prompt = (torch.randn(3, tiny.hidden_size) * 0.1).requires_grad_()
    batches = [_rows(tiny, [6, 4]), _rows(tiny, [9]), _rows(tiny, [2, 2, 3])]
    for ids, mask in batches:
        nll, _ = label_nll(tiny.model, prompt, ids, mask, ids.masked_fill(mask == 0, -100))
        nll.sum().backward()
    expected, prompt.grad = prompt.grad, None
    prefix = SharedPrefix(tiny.model, prompt)
    for ids, mask in batches:
        nll, _ = label_nll(tiny.model, prompt, ids, mask, ids.masked_fill(mask == 0, -100), prefix=prefix)
        nll.sum().backward()
    assert prompt.grad is None  # nothing reaches the prompt before the one backward through the virtual tokens
    prefix.backward()
    assert torch.allclose(prompt.grad, expected, atol=1e-6)
    assert expected.abs().sum() > 0


@pytest.mark.skipif(not (cpu_has_native_bf16() and packed.supported()), reason="no native bf16 / oneDNN packing")
def test_bf16_fused_head_uses_a_packed_gradient_product_with_the_plain_ones_bits():
    """In bf16 on the CPU the fused head's gradient product runs on a prepacked W^T (packed.head_gradient): the same
    NLL and gradient bits as the plain product (packed_weights(False)); the copy is made once and again when the
    weight changes in place."""
    model = tiny_llama(120, seed=2, hidden=64).to(torch.bfloat16)
    head = model.get_output_embeddings()
    generator = torch.Generator().manual_seed(1)
    hidden = (torch.randn(150, 64, generator=generator) * 3).to(torch.bfloat16)  # 2 chunks of 128, the last short
    targets = torch.randint(0, 120, (150,), generator=generator)

    def nll_and_grad():
        leaf = hidden.clone().requires_grad_()
        nll = head_nll(model, leaf, targets)
        (grad,) = torch.autograd.grad(nll.sum(), leaf)
        return nll, grad

    calls = []
    product = packed.head_gradient(head)
    assert product is not None and packed.head_gradient(head) is product  # made once, kept
    original = packed.HeadGradient.__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packed.HeadGradient, "__call__", lambda self, d: calls.append(len(d)) or original(self, d))
        mine = nll_and_grad()
    assert calls == [128, 22]
    with packed.packed_weights(False):
        assert packed.head_gradient(head) is None
        plain = nll_and_grad()
    assert torch.equal(mine[0], plain[0]) and torch.equal(mine[1], plain[1])
    with torch.no_grad():
        head.weight.mul_(0.5)
    assert packed.head_gradient(head) is not product  # the weight changed: packed again
    with packed.packed_weights(False):
        plain = nll_and_grad()
    assert all(torch.equal(a, b) for a, b in zip(nll_and_grad(), plain))
    assert packed.head_gradient(model.model.layers[0].mlp.act_fn) is None  # not a linear layer
    assert packed.head_gradient(tiny_llama(120, seed=2, hidden=64).get_output_embeddings()) is None  # fp32
