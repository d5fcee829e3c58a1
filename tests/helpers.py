"""Tiny, randomly initialised models and a character-level tokenizer, built inside the tests (no downloads)."""

from __future__ import annotations

import copy
import os
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from softprompt.core import forward
from softprompt.core.attention import use_grouped_sdpa
from softprompt.core.mlp import use_lean_mlp
from softprompt.core.models import FrozenModel, freeze, load_base
from softprompt.core.norm import use_lean_norm
from softprompt.formats.adapter import PEFT_VERSION

# The device the device-parametrised tests run on: cpu here and in CI; scripts/gpu_check.sh sets cuda.
TEST_DEVICE = os.environ.get("SOFTPROMPT_TEST_DEVICE", "cpu")

SPECIALS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus a few CJK characters, with EOS/PAD and a chat template."""
    chars = list(dict.fromkeys(string.printable + "你好世界中文"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    assert use_grouped_sdpa(model)  # what load_base does: tiny tests run the production attention and MLP
    assert use_lean_mlp(model) == layers
    assert use_lean_norm(model) == 2 * layers + 1  # two per layer and the final one
    return freeze(model)


def tiny_base(seed: int = 0, hidden: int = 32, layers: int = 2) -> FrozenModel:
    tokenizer = tiny_tokenizer()
    return FrozenModel(model=tiny_llama(len(tokenizer), seed, hidden, layers), tokenizer=tokenizer, name="tiny-llama")


def save_tiny(base: FrozenModel, folder: Path) -> Path:
    """Save a tiny model + tokenizer as a Hugging Face folder, loadable with --model FOLDER."""
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return folder


def reload_tiny(folder: Path) -> FrozenModel:
    return load_base(str(folder), device="cpu", dtype="float32")


def text_logits(
    model, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str = "kv"
) -> torch.Tensor:
    """Full logits at the text positions [B, L, V] with the soft prompt in front (the library only ever applies the
    LM head where it needs it; tests compare whole logit tensors)."""
    hidden, _ = forward.text_hidden(model, prompt, input_ids, attention_mask, mode)
    return forward.lm_logits(model, hidden)


def padded_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of two rows of 9 tokens, the second right-padded after 6 (PEFT numbers positions
    without looking at the mask, so interop checks compare the real tokens)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def stock_copy(model, matches):
    """A deep copy of `model` whose modules that `matches` run their class's own forward again (the instance
    forward set by `core.patch.route_forward`, e.g. use_lean_norm / use_lean_mlp, removed)."""
    other = copy.deepcopy(model)
    for module in other.modules():
        if matches(module):
            del module.forward
    return other


def saved_bytes(model, prompt, ids, mask) -> int:
    """Bytes autograd keeps for the backward pass, weights excluded (they are the model's own memory)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        key = tensor.untyped_storage().data_ptr()
        if key not in weights and key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward.label_nll(model, prompt.detach().clone().requires_grad_(), ids, mask, ids)
    return total


def loss_and_grad(model, prompt, ids, mask):
    """The mean answer-token loss over every unmasked token, and its gradient with respect to `prompt`."""
    prompt = prompt.detach().clone().requires_grad_()
    nll, count = forward.label_nll(model, prompt, ids, mask, ids.masked_fill(mask == 0, -100))
    loss = nll.sum() / count.sum()
    (grad,) = torch.autograd.grad(loss, prompt)
    return loss.detach(), grad


def assert_written_as_peft_writes(ours: dict, peft: dict) -> None:
    """softprompt's adapter_config.json holds what PEFT writes for the same adapter: the same keys and values, but the
    base model's path (each run's own) and peft_version, which softprompt stamps with PEFT_VERSION, the release whose
    format it writes (the installed PEFT may be newer)."""
    assert set(ours) == set(peft)
    assert ours["peft_version"] == PEFT_VERSION
    skip = {"base_model_name_or_path", "peft_version"}
    assert {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in peft.items() if k not in skip}
