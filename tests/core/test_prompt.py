"""Soft-prompt initialisation strategies and the frozen base."""

import pytest
import torch

from softprompt.core.models import count_parameters, describe_parameters
from softprompt.core.prompt import SoftPrompt
from softprompt.formats.adapter import load_adapter, save_adapter


def test_text_init_tiles_and_truncates(tiny):
    table = tiny.model.get_input_embeddings().weight
    ids = tiny.tokenizer("abc")["input_ids"]
    full = SoftPrompt.initialise(tiny, "text", init_text="abc")
    assert full.num_virtual_tokens == 3 and torch.equal(full.embeddings, table[ids])
    tiled = SoftPrompt.initialise(tiny, "text", num_virtual_tokens=7, init_text="abc")
    assert torch.equal(tiled.embeddings, table[(ids * 3)[:7]])
    assert torch.equal(
        SoftPrompt.initialise(tiny, "text", num_virtual_tokens=2, init_text="abc").embeddings, table[ids[:2]]
    )


def test_vocab_init_uses_real_non_special_rows(tiny):
    prompt = SoftPrompt.initialise(tiny, "vocab", num_virtual_tokens=8, seed=1)
    table = tiny.model.get_input_embeddings().weight
    special = set(tiny.tokenizer.all_special_ids)
    for row in prompt.embeddings:
        match = (table == row).all(1).nonzero().flatten().tolist()
        assert match and not special.intersection(match)
    assert not torch.equal(prompt.embeddings, SoftPrompt.initialise(tiny, "vocab", 8, seed=2).embeddings)


def test_random_init_is_on_the_embedding_scale(tiny):
    table = tiny.model.get_input_embeddings().weight
    prompt = SoftPrompt.initialise(tiny, "random", num_virtual_tokens=400)
    assert abs(prompt.embeddings.std().item() - table.std().item()) < 0.2 * table.std().item()
    assert prompt.embeddings.dtype == torch.float32 and prompt.embeddings.requires_grad


def test_label_init_averages_sub_tokens(tiny):
    table = tiny.model.get_input_embeddings().weight
    prompt = SoftPrompt.initialise(tiny, "labels", num_virtual_tokens=5, label_words=["no", "yes"])
    assert torch.allclose(
        prompt.embeddings[0], table[tiny.tokenizer(" no", add_special_tokens=False)["input_ids"]].mean(0)
    )
    assert torch.allclose(
        prompt.embeddings[1], table[tiny.tokenizer(" yes", add_special_tokens=False)["input_ids"]].mean(0)
    )
    with pytest.raises(ValueError, match=r"init 'labels' needs label words \(--label-words negative,positive\)"):
        SoftPrompt.initialise(tiny, "labels", num_virtual_tokens=5)
    with pytest.raises(ValueError, match="3 label words do not fit in 2 virtual tokens"):
        SoftPrompt.initialise(tiny, "labels", num_virtual_tokens=2, label_words=["a", "b", "c"])


def test_unknown_init_is_rejected(tiny):
    with pytest.raises(ValueError, match="unknown init 'zeros': use one of text, vocab, random, labels"):
        SoftPrompt.initialise(tiny, "zeros")


def test_from_adapter_transfers_a_prompt(tmp_path, tiny):
    source = SoftPrompt.initialise(tiny, "random", num_virtual_tokens=4, seed=5)
    save_adapter(tmp_path / "a", source.embeddings, tiny)
    copy = load_adapter(tmp_path / "a", tiny).soft_prompt()
    assert torch.equal(copy.embeddings, source.embeddings) and copy.embeddings.requires_grad


def test_base_is_frozen_and_parameters_are_reported(tiny):
    prompt = SoftPrompt.initialise(tiny, "random", num_virtual_tokens=10)
    assert not any(p.requires_grad for p in tiny.model.parameters())
    trainable, total = count_parameters(tiny.model, prompt)
    assert trainable == 10 * tiny.hidden_size
    assert total == sum(p.numel() for p in tiny.model.parameters()) + trainable
    assert describe_parameters(tiny.model, prompt) == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
