"""CPT adapters interoperate with real PEFT 0.21, both ways: a folder softprompt trains loads in PEFT with equal
forward logits (PEFT's `generate` is broken on current transformers) and the same context fields, a folder PEFT writes
loads in softprompt with PEFT's logits, and softprompt writes the adapter_config.json PEFT wrote."""

import json

import pytest
import torch
from helpers import assert_written_as_peft_writes, padded_pair, text_logits, tiny_base
from train_helpers import config, trainable_base

from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.formats.methods import CPT_DEFAULTS, CPT_LISTS
from softprompt.training.loop import train

peft = pytest.importorskip("peft")

ATOL = 1e-5


def assert_equal_on_real_tokens(ours, theirs, mask):
    assert ours.shape == theirs.shape
    keep = mask.bool()
    assert torch.allclose(ours[keep], theirs[keep], atol=ATOL), (ours[keep] - theirs[keep]).abs().max()


def test_a_trained_cpt_adapter_loads_in_peft_with_equal_logits(tmp_path):
    base = trainable_base()
    result = train(config(tmp_path / "run", base, method="cpt", init=None, cpt_examples=2, lr=0.3, cpt_loss="decay"))
    adapter = load_adapter(result.adapter_dir, base)
    n = adapter.num_virtual_tokens
    peft_model = peft.PeftModel.from_pretrained(trainable_base().model, result.adapter_dir)
    theirs_config = peft_model.peft_config["default"]
    assert theirs_config.peft_type.value == "CPT" and theirs_config.num_virtual_tokens == n
    for key in CPT_LISTS + tuple(CPT_DEFAULTS):
        assert getattr(theirs_config, key) == adapter.config[key]
    ids, mask = padded_pair()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits[:, n:]
        ours = text_logits(base.model, adapter.virtual(), ids, mask)
    assert_equal_on_real_tokens(ours, theirs, mask)
    # the tensor is the context's embeddings moved: not the plain embeddings of its tokens
    table = base.model.get_input_embeddings().weight.detach()
    assert not torch.allclose(adapter.embeddings, table[torch.tensor(adapter.config["cpt_token_ids"])])


def test_a_peft_written_cpt_adapter_loads_in_softprompt_with_equal_logits(tmp_path):
    types = [1, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8]
    cfg = peft.CPTConfig(
        task_type="CAUSAL_LM",
        cpt_token_ids=list(range(10, 10 + len(types))),
        cpt_mask=[1] * len(types),
        cpt_tokens_type_mask=types,
        opt_weighted_loss_type="decay",
        opt_loss_decay_factor=0.8,
        opt_projection_epsilon=0.5,
        opt_projection_format_epsilon=0.2,
    )
    peft_model = peft.get_peft_model(tiny_base(seed=1).model, cfg)
    encoder = peft_model.prompt_encoder["default"]
    generator = torch.Generator().manual_seed(3)
    encoder.delta_embedding.weight.data = torch.randn(len(types), 32, generator=generator)  # projected on use
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ids, mask = padded_pair(1)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits[:, len(types) :]

    base = tiny_base(seed=1)
    adapter = load_adapter(tmp_path / "peft", base)
    assert adapter.method == "cpt" and adapter.num_virtual_tokens == len(types)
    ours = text_logits(base.model, adapter.virtual(), ids, mask)
    assert_equal_on_real_tokens(ours, theirs, mask)
    reloaded = peft.PeftModel.from_pretrained(tiny_base(seed=1).model, str(tmp_path / "peft"))
    with torch.no_grad():
        again = reloaded(input_ids=ids, attention_mask=mask).logits[:, len(types) :]
    assert_equal_on_real_tokens(ours, again, mask)

    # softprompt writes the adapter_config.json PEFT wrote for that adapter
    fields = {k: v for k, v in adapter.config.items() if k in CPT_LISTS or k in CPT_DEFAULTS}
    save_adapter(tmp_path / "again", adapter.embeddings, base, method="cpt", peft_fields=fields)
    ours_config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    peft_written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert_written_as_peft_writes(ours_config, peft_written)
