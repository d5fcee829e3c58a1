"""Tiny random models of every causal-LM family softprompt supports (tests/test_families.py), built in seconds from a
transformers config (no downloads) with the character tokenizer of helpers.py, saved as a folder and loaded back
through `load_base` (so the loader's attention choice and checks run as they do for a real model)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from helpers import tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from softprompt.core.models import FrozenModel, load_base

HIDDEN, LAYERS, HEADS = 64, 2, 4
SLIDING_WINDOW = 6  # shorter than soft prompt + prompt + generated text in every test below

LLAMA_LIKE = {"num_key_value_heads": 2, "intermediate_size": 2 * HIDDEN}
# model_type -> config fields beyond the common ones (hidden size, layers, heads, vocabulary, positions, ids)
FAMILIES: dict[str, dict] = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": {**LLAMA_LIKE, "head_dim": 24},  # Qwen3 sets head_dim apart from hidden / heads
    "gemma2": {
        **LLAMA_LIKE,
        "head_dim": 16,
        "sliding_window": SLIDING_WINDOW,
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "gemma3_text": {
        **LLAMA_LIKE,
        "head_dim": 16,
        "sliding_window": SLIDING_WINDOW,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "mistral": {**LLAMA_LIKE, "sliding_window": SLIDING_WINDOW},
    "phi3": LLAMA_LIKE,
    "gpt2": {},
    "gpt_neox": {"intermediate_size": 2 * HIDDEN},
    "opt": {"ffn_dim": 2 * HIDDEN, "word_embed_proj_dim": HIDDEN},
    "mixtral": {**LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
}


@contextmanager
def threads(count: int = 1):
    """Pin torch's thread count inside a block (module-scoped fixtures run before conftest's per-test pin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def family_config(model_type: str, vocab_size: int, eos: int, pad: int):
    fields = {
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "vocab_size": vocab_size,
        "max_position_embeddings": 256,
        "eos_token_id": eos,
        "bos_token_id": eos,
        "pad_token_id": pad,
        "tie_word_embeddings": False,
        "initializer_range": 0.1,
    }
    fields.update(FAMILIES[model_type])
    return AutoConfig.for_model(model_type, **fields)


def family_model(model_type: str, seed: int = 0):
    """A tiny random model of the family (fp32) and the character tokenizer, with a scaled-up LM head so greedy
    choices have clear margins (equality tests are not at the mercy of near-ties)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = family_config(model_type, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
        model.get_input_embeddings().weight.normal_(0, 1.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def family_base(model_type: str, folder: Path, dtype: str = "float32", seed: int = 0) -> FrozenModel:
    """The family's tiny model saved to `folder` and loaded back with `load_base` (CPU)."""
    model, tokenizer = family_model(model_type, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_base(str(folder), device="cpu", dtype=dtype)
