"""Composed cartridges against real PEFT 0.21: the folder `softprompt compose` writes is the one PEFT's
compose_cartridge_adapters writes (same tensor, same config fields), PEFT loads it, and its logits equal softprompt's
composed request `a+b` (served from the parts, never from the folder)."""

import json

import pytest
import torch
from helpers import text_logits, tiny_base

from softprompt.core.prompt import build_prompt
from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.formats.compose import write_composition
from softprompt.inference.batch import DecodeBatch, GenerationRequest
from softprompt.inference.engine import Engine

peft = pytest.importorskip("peft")
from peft.tuners.cartridge.utils import compose_cartridge_adapters  # noqa: E402

ATOL = 1e-5
IDS = [9, 31, 44, 17, 60, 23, 8]


def cartridge(base, n: int, frozen: int, seed: int):
    """A cartridge moved off its initialisation, so equality is not a coincidence of init."""
    module = build_prompt(base, "cartridge", "random", n, seed=seed, num_frozen_tokens=frozen)
    generator = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        module.embedding.add_(0.3 * module.embedding.std() * torch.randn(module.embedding.shape, generator=generator))
    return module


@pytest.fixture
def parts(tmp_path):
    base = tiny_base(seed=1)
    for name, (n, frozen, seed) in {"a": (4, 2, 1), "b": (3, 1, 2), "c": (5, 0, 3)}.items():
        save_adapter(tmp_path / name, cartridge(base, n, frozen, seed), base)
    return base, tmp_path


def test_the_composed_folder_is_what_peft_composes(parts):
    base, folder = parts
    names = [folder / p for p in ("b", "a", "c")]
    write_composition(names, folder / "ours")
    compose_cartridge_adapters([str(p) for p in names], output_path=str(folder / "theirs"))
    ours, theirs = load_adapter(folder / "ours", base), load_adapter(folder / "theirs", base)
    assert torch.equal(ours.embeddings, theirs.embeddings)
    assert ours.num_virtual_tokens == 12 and ours.config["num_frozen_tokens"] == 1  # the first part's (b's) only
    written = {p: json.loads((folder / p / "adapter_config.json").read_text()) for p in ("ours", "theirs")}
    assert written["ours"] == written["theirs"]


def test_peft_loads_the_composed_folder_with_the_logits_of_the_composed_request(parts):
    base, folder = parts
    write_composition([folder / "a", folder / "b"], folder / "ab")
    peft_model = peft.PeftModel.from_pretrained(tiny_base(seed=1).model, str(folder / "ab"))
    assert peft_model.peft_config["default"].num_virtual_tokens == 7
    ids = torch.tensor([IDS])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    composed = load_adapter(folder / "ab", base)
    ours = text_logits(base.model, composed.virtual(), ids, torch.ones_like(ids))
    assert torch.allclose(ours, theirs, atol=ATOL)

    # the request `a+b`, served from the two parts, predicts its first token with PEFT's last-position logits
    engine = Engine(base, {p: load_adapter(folder / p, base) for p in ("a", "b")})
    batch = DecodeBatch(base, engine.prompt_cache, keep_logits=True)
    event = batch.add([GenerationRequest(list(IDS), adapter="a+b", max_new_tokens=1)])[0]
    assert torch.allclose(event.logits, theirs[0, -1], atol=ATOL)
    first_only = batch.add([GenerationRequest(list(IDS), adapter="a", max_new_tokens=1)])[0]
    assert not torch.allclose(first_only.logits, theirs[0, -1], atol=1e-2)  # b's keys/values count
