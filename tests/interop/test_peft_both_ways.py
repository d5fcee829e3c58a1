"""Prefix-tuning, P-tuning and cartridge adapters interoperate with real PEFT 0.21, both ways, on a grouped-query tiny Llama
(4 heads over 2 key/value heads): PEFT's forward logits (its `generate` is broken on current transformers) and its
loss equal softprompt's, for adapters written by either side, with and without a projection / encoder kind."""

import json

import pytest
import torch
from helpers import assert_written_as_peft_writes, padded_pair, text_logits, tiny_base

from softprompt.core import forward
from softprompt.core.prompt import build_prompt
from softprompt.formats.adapter import load_adapter, save_adapter

peft = pytest.importorskip("peft")

ATOL = 1e-5
VARIANTS = {
    "prefix": ("prefix", {}),
    "prefix-projection": ("prefix", {"prefix_projection": True, "encoder_hidden_size": 24}),
    "ptuning-mlp": ("ptuning", {"encoder_hidden_size": 20}),
    "ptuning-lstm": ("ptuning", {"encoder_type": "lstm", "encoder_hidden_size": 12}),
    "cartridge": ("cartridge", {"num_frozen_tokens": 2}),
    "cartridge-unfrozen": ("cartridge", {"num_frozen_tokens": 0}),
}
KV = ("prefix", "cartridge")


def peft_text_logits(peft_model, method: str, n: int, ids, mask) -> torch.Tensor:
    logits = peft_model(input_ids=ids, attention_mask=mask).logits
    return logits if method in KV else logits[:, n:]  # prompt-style methods return the virtual positions too


def assert_equal_on_real_tokens(ours, theirs, mask):
    assert ours.shape == theirs.shape
    keep = mask.bool()
    assert torch.allclose(ours[keep], theirs[keep], atol=ATOL), (ours[keep] - theirs[keep]).abs().max()


def trained_a_little(base, method: str, options: dict, n: int = 4):
    """A module moved off its initialisation (random updates), so equality is not a coincidence of init."""
    module = build_prompt(base, method, "random", n, seed=2, **options)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * param.std() * torch.randn(param.shape, generator=generator))
    return module


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_softprompt_adapter_loads_in_peft_with_equal_logits_and_loss(tmp_path, variant):
    method, options = VARIANTS[variant]
    base = tiny_base(seed=1)
    module = trained_a_little(base, method, options)
    save_adapter(tmp_path / "sp", module, base)
    config = json.loads((tmp_path / "sp" / "adapter_config.json").read_text())
    peft_model = peft.PeftModel.from_pretrained(tiny_base(seed=1).model, str(tmp_path / "sp"))
    assert peft_model.peft_config["default"].peft_type.value == config["peft_type"]
    ids, mask = padded_pair()
    adapter = load_adapter(tmp_path / "sp", base)
    ours = text_logits(base.model, adapter.virtual(), ids, mask)
    assert_equal_on_real_tokens(ours, peft_text_logits(peft_model, method, 4, ids, mask), mask)

    # the loss PEFT computes from labels equals softprompt's label NLL (a prefix scores from text position 1 on)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        nll, counts = forward.label_nll(base.model, adapter.virtual(), ids, mask, labels)
    assert float(nll.sum() / counts.sum()) == pytest.approx(float(theirs), abs=ATOL)


def peft_config_of(variant: str):
    n = 5
    if variant == "prefix":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    if variant == "prefix-projection":
        return peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=True, encoder_hidden_size=24
        )
    if variant.startswith("cartridge"):
        frozen = VARIANTS[variant][1]["num_frozen_tokens"]
        return peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, num_frozen_tokens=frozen)
    if variant == "ptuning-mlp":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=20)
    return peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_reparameterization_type="LSTM", encoder_hidden_size=12
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_saved_adapter_loads_in_softprompt_with_equal_logits(tmp_path, variant):
    method = VARIANTS[variant][0]
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(tiny_base(seed=1).model, peft_config_of(variant))
    with torch.no_grad():  # move every trainable tensor off PEFT's initialisation
        for param in peft_model.prompt_encoder["default"].parameters():
            param.add_(0.3 * torch.randn_like(param) * (param.std() if param.numel() > 1 else 1))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ids, mask = padded_pair(1)
    theirs = peft_text_logits(peft_model, method, 5, ids, mask)  # PEFT in training mode: through its encoder

    base = tiny_base(seed=1)
    adapter = load_adapter(tmp_path / "peft", base)
    assert adapter.method == method and adapter.num_virtual_tokens == 5
    ours = text_logits(base.model, adapter.virtual(), ids, mask)
    assert_equal_on_real_tokens(ours, theirs, mask)
    reloaded = peft.PeftModel.from_pretrained(tiny_base(seed=1).model, str(tmp_path / "peft"))
    assert_equal_on_real_tokens(ours, peft_text_logits(reloaded, method, 5, ids, mask), mask)

    # and softprompt writes the same adapter_config.json fields PEFT wrote for that adapter
    save_adapter(
        tmp_path / "again",
        adapter.embeddings,
        base,
        method=method,
        peft_fields={
            k: v
            for k, v in adapter.config.items()
            if k in ("prefix_projection", "encoder_hidden_size", "encoder_reparameterization_type", "num_frozen_tokens")
        },
    )
    ours_config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    peft_written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert_written_as_peft_writes(ours_config, peft_written)


def test_prefix_tensor_has_the_shape_peft_uses(tmp_path):
    base = tiny_base(seed=1)
    save_adapter(tmp_path / "sp", build_prompt(base, "prefix", "random", 3), base)
    from safetensors.torch import load_file

    tensor = load_file(str(tmp_path / "sp" / "adapter_model.safetensors"))["prompt_embeddings"]
    peft_model = peft.get_peft_model(
        tiny_base(seed=1).model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    assert tensor.shape == peft_model.prompt_encoder["default"].embedding.weight.shape == (3, 2 * 2 * 16)


def test_cartridge_text_init_is_the_prefill_peft_computes(tmp_path):
    """softprompt's text init of a cartridge (the frozen model's keys/values for the first N tokens of the text) equals
    PEFT's initialize_kv_prefix_from_text on the plain tokenisation (its chat-template variant is not used)."""
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_text

    base = tiny_base(seed=1)
    text = "the quick brown fox jumps over the lazy dog"
    ours = build_prompt(base, "cartridge", "text", 6, init_text=text)
    peft_model = peft.get_peft_model(
        tiny_base(seed=1).model, peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)
    )
    theirs = initialize_kv_prefix_from_text(peft_model, base.tokenizer, text=text, use_chat_template=False)
    with torch.no_grad():
        assert torch.allclose(ours(), theirs.float(), atol=ATOL)
    # and the prefix learned directly starts from the same prefill (one implementation)
    prefix = build_prompt(base, "prefix", "text", 6, init_text=text)
    with torch.no_grad():
        assert torch.equal(prefix(), ours())
