"""Shared by the generation tests: a tiny model with peaked, context-dependent logits, random adapters, and the
reference every engine output is checked against — a step-by-step greedy loop with no cache at all."""

from __future__ import annotations

import pytest
import torch
from helpers import TEST_DEVICE, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from softprompt.core.forward import as_virtual, lm_logits, run_body, text_hidden
from softprompt.core.models import FrozenModel, cpu_has_native_bf16, freeze
from softprompt.formats.adapter import Adapter
from softprompt.inference.batch import eos_ids


def peaked_base(seed: int = 0, hidden: int = 32, layers: int = 2, max_positions: int = 512) -> FrozenModel:
    """A tiny Llama whose greedy choice has a wide margin (large-init weights, a scaled-up untied LM head), so
    equality tests are not at the mercy of near-ties, and whose output depends strongly on the context."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        initializer_range=0.25,
        attn_implementation="sdpa",
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return FrozenModel(model=freeze(model), tokenizer=tokenizer, name="peaked-llama")


def random_adapter(n: int, hidden: int = 32, seed: int = 0) -> Adapter:
    generator = torch.Generator().manual_seed(seed)
    return Adapter(embeddings=torch.randn(n, hidden, generator=generator), config={"num_virtual_tokens": n})


@torch.no_grad()
def reference_greedy(base: FrozenModel, prompt: torch.Tensor | None, ids: list[int], max_new_tokens: int):
    """Greedy decoding by re-running [soft prompt ; tokens so far] from scratch at every step (no decode cache; a
    prefix-tuning `Virtual` puts its keys/values under the whole text each time).
    Returns (token ids, per-step logits [steps, V])."""
    model, ids, out, logits = base.model, list(ids), [], []
    stop = eos_ids(base)
    virtual = as_virtual(prompt)
    for _ in range(max_new_tokens):
        tokens = torch.tensor([ids], device=base.device)
        if virtual is not None and not virtual.embeds_input:  # a prefix: its keys/values under the whole text
            hidden, _ = text_hidden(model, virtual, tokens, torch.ones_like(tokens))
        else:
            embeds = model.get_input_embeddings()(tokens)
            if virtual is not None:
                embeds = torch.cat([virtual.tensor.to(embeds.dtype).to(base.device).unsqueeze(0), embeds], dim=1)
            length = embeds.shape[1]
            mask = torch.ones(1, length, dtype=torch.long, device=base.device)
            hidden, _ = run_body(model, embeds, mask, torch.arange(length, device=base.device).unsqueeze(0))
        step = lm_logits(model, hidden[:, -1])[0]
        token = int(step.argmax())
        out.append(token)
        logits.append(step.cpu())
        ids.append(token)
        if token in stop:
            break
    return out, torch.stack(logits)


BF16 = pytest.param(
    "bfloat16",
    marks=pytest.mark.skipif(
        TEST_DEVICE == "cpu" and not cpu_has_native_bf16(),
        reason="this CPU has no native bf16 (AVX-512 BF16 / AMX): only fp32 runs here",
    ),
)


@pytest.fixture(scope="module", params=["float32", BF16])
def dtype(request):
    """A module's engine tests run in fp32 and, where the CPU computes it natively, in bf16 (row-exact mode)."""
    return getattr(torch, request.param)


@pytest.fixture(scope="module")
def base(dtype):
    """A peaked tiny Llama (engine tests need outputs with clear margins) in the module's dtype, on the test device
    (SOFTPROMPT_TEST_DEVICE: cpu, or cuda in scripts/gpu_check.sh)."""
    base = peaked_base()
    base.model.to(device=TEST_DEVICE, dtype=dtype)
    return base
