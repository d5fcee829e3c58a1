"""Every causal-LM family softprompt supports, through every method and verb: a tiny random model of each (2 layers,
hidden 64, the character tokenizer; family_helpers.py) is saved and loaded with `load_base`, then
- prompt tuning, prefix tuning and P-tuning train a few steps (the loss falls) and write folders that load;
- greedy generation of one row alone and of a mixed batch (the base and all three adapters, prompts of different
  lengths, longer than Mistral's and Gemma's sliding windows) equal a no-cache greedy loop token for token;
- real PEFT 0.21 loads each adapter with equal logits (fp32, one thread) and sizes a prefix as softprompt does;
- `serve` answers a completion for each adapter on loopback as the engine does alone.
Models that cannot work are refused at load with one line (the last tests)."""

import json
import shutil
from types import SimpleNamespace

import httpx
import pytest
import torch
from engine_helpers import random_adapter, reference_greedy
from family_helpers import FAMILIES, HIDDEN, SLIDING_WINDOW, family_base, family_model, threads
from helpers import text_logits
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel, PretrainedConfig

from softprompt import create_app
from softprompt.cli import main
from softprompt.core import forward
from softprompt.core.models import (
    FrozenModel,
    UnsupportedModelError,
    check_family,
    cpu_has_native_bf16,
    freeze,
    load_base,
)
from softprompt.core.prompt import build_prompt
from softprompt.data.templates import encode_text
from softprompt.formats.adapter import Adapter, load_adapter
from softprompt.inference.batch import DecodeBatch, GenerationRequest
from softprompt.inference.engine import Engine
from softprompt.serve import BackgroundServer
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train

peft = pytest.importorskip("peft")

METHODS = ("prompt", "prefix", "ptuning")
RECORDS = [{"instruction": f"q{i}", "output": "abab" if i % 2 else "cdcd"} for i in range(8)]
TEXTS = ["hello there, cat", "a b", "xyz 12"]
NEW_TOKENS = 8


def train_method(base, out, method: str) -> list[float]:
    """A few optimiser steps; the logged losses."""
    config = TrainConfig(
        data=RECORDS,
        out=str(out),
        model=base,
        method=method,
        num_virtual_tokens=4,
        init="random",
        lr=0.3,
        batch_size=4,
        max_steps=6,
        save_every=100,
        log_every=1,
        progress=False,
        max_batch_tokens=64,
    )
    train(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind", r.get("type")) != "eval" and "loss" in r]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """One family's tiny model, loaded from its folder, and one trained adapter of each method (shared by the tests)."""
    folder = tmp_path_factory.mktemp(request.param)
    with threads(1):
        base = family_base(request.param, folder / "model")
        losses = {m: train_method(base, folder / "runs" / m, m) for m in METHODS}
    for m in METHODS:
        shutil.copytree(
            folder / "runs" / m,
            folder / "adapters" / m,
            ignore=shutil.ignore_patterns("checkpoints", "*.png", "*.jsonl"),
        )
    adapters = {m: load_adapter(folder / "adapters" / m, base) for m in METHODS}
    return SimpleNamespace(name=request.param, base=base, folder=folder, losses=losses, adapters=adapters)


def test_every_method_trains_and_its_folder_loads(family):
    for method in METHODS:
        losses = family.losses[method]
        assert len(losses) >= 3 and losses[-1] < losses[0], (method, losses)
        adapter = family.adapters[method]
        assert adapter.method == method and adapter.num_virtual_tokens == 4
        assert adapter.embeddings.shape[1] == (
            forward.prefix_width(family.base.model) if method == "prefix" else family.base.hidden_size
        )


def test_greedy_alone_and_in_a_mixed_batch_equal_the_no_cache_loop(family):
    base, adapters = family.base, family.adapters
    engine = Engine(base, adapters)
    requests = [
        GenerationRequest(encode_text(base.tokenizer, t), adapter=a, max_new_tokens=NEW_TOKENS)
        for t in TEXTS
        for a in (None, *METHODS)
    ]
    assert 4 + len(requests[0].prompt_ids) + NEW_TOKENS > 2 * SLIDING_WINDOW  # windows slide past the soft prompt
    batched = engine.generate(requests, batch_size=len(requests))
    for request, result in zip(requests, batched):
        virtual = adapters[request.adapter].virtual() if request.adapter else None
        expected, _ = reference_greedy(base, virtual, request.prompt_ids, NEW_TOKENS)
        assert result.token_ids == expected, (request.adapter, request.prompt_ids)
        alone = engine.generate(
            [GenerationRequest(request.prompt_ids, adapter=request.adapter, max_new_tokens=NEW_TOKENS)], batch_size=1
        )[0]
        assert alone.token_ids == expected
    assert len({tuple(r.token_ids) for r in batched}) > len(TEXTS)  # the adapters change the answers


def peft_logits(peft_model, method: str, n: int, ids, mask) -> torch.Tensor:
    logits = peft_model(input_ids=ids, attention_mask=mask).logits
    return logits if method == "prefix" else logits[:, n:]  # prompt-style methods return virtual positions too


def test_peft_loads_every_adapter_with_equal_logits(family):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 90, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    keep = mask.bool()
    for method in METHODS:
        fresh = load_base(str(family.folder / "model"), device="cpu", dtype="float32")
        peft_model = peft.PeftModel.from_pretrained(fresh.model, str(family.folder / "adapters" / method))
        with torch.no_grad():
            theirs = peft_logits(peft_model, method, 4, ids, mask)
            ours = text_logits(family.base.model, family.adapters[method].virtual(), ids, mask)
        assert torch.allclose(ours[keep], theirs[keep], atol=1e-5), (method, (ours[keep] - theirs[keep]).abs().max())
    # PEFT, sizing a new prefix from the model's config, gives it the width softprompt gives it
    made = peft.get_peft_model(
        load_base(str(family.folder / "model"), device="cpu", dtype="float32").model,
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    )
    layers, kv_heads, head_dim = forward.prefix_layout(family.base.model)
    config = made.peft_config["default"]
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (layers, kv_heads, kv_heads * head_dim)
    assert made.prompt_encoder["default"].embedding.weight.shape == (3, forward.prefix_width(family.base.model))


def test_serve_answers_each_adapter_as_the_engine_does(family):
    base = family.base
    engine = Engine(base, family.adapters)
    ids = encode_text(base.tokenizer, TEXTS[0])
    with threads(1), BackgroundServer(create_app(base, family.folder / "adapters")) as server:
        for model in ("base", *METHODS):
            body = {"model": model, "prompt": TEXTS[0], "max_tokens": 6, "temperature": 0}
            reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            expected = engine.generate(
                [GenerationRequest(ids, adapter=None if model == "base" else model, max_new_tokens=6)]
            )[0]
            assert reply.json()["choices"][0]["text"] == expected.text


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16: the engine's bf16 is not run")
@pytest.mark.parametrize("name", ["mistral", "gemma3_text"])
def test_sliding_window_rows_in_bf16_are_bit_equal_to_rows_alone(tmp_path, name):
    """Row-exact attention (bf16) with sliding windows: a row's logits do not depend on its batch-mates."""
    base = family_base(name, tmp_path, "bfloat16")
    prefix = torch.randn(4, forward.prefix_width(base.model), generator=torch.Generator().manual_seed(1))
    engine = Engine(
        base,
        {
            "prompt": random_adapter(3, HIDDEN, seed=2),
            "prefix": Adapter(prefix, {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}),
        },
    )
    requests = [
        GenerationRequest(encode_text(base.tokenizer, t), adapter=a, max_new_tokens=NEW_TOKENS)
        for t in TEXTS
        for a in (None, "prompt", "prefix")
    ]

    def decode(rows):
        batch = DecodeBatch(base, engine.prompt_cache, keep_logits=True)
        events = batch.add(rows)
        while len(batch):
            events += batch.step()
        return events

    together = decode(requests)
    for request in requests:
        mine = torch.stack([e.logits for e in together if e.request is request])
        assert torch.equal(mine, torch.stack([e.logits for e in decode([request])])), request.adapter


def test_prefix_layout_sizes_models_whose_layers_differ_as_peft_does():
    """Per-layer head sizes (Gemma-4-style global_head_dim, transformers' per_layer_config) and GPT-2-style names."""
    from peft.utils.other import _prepare_prompt_learning_config

    common = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=3, num_key_value_heads=2, head_dim=16)
    configs = [
        PretrainedConfig(**common, global_head_dim=32, num_global_key_value_heads=1),
        PretrainedConfig(**common, per_layer_config={"2": {"head_dim": 48, "num_key_value_heads": 1}}),
        PretrainedConfig(**common),
        PretrainedConfig(n_embd=48, n_head=3, n_layer=2),
    ]
    expected = [(3, 1, 32), (3, 1, 48), (3, 2, 16), (2, 3, 16)]
    for config, layout in zip(configs, expected):
        sized = _prepare_prompt_learning_config(
            peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), config
        )
        layers, kv_heads, head_dim = forward.prefix_layout(config)
        assert (layers, kv_heads, head_dim) == layout
        assert (sized.num_layers, sized.num_attention_heads, sized.token_dim) == (layers, kv_heads, kv_heads * head_dim)


# ---- fallbacks and refusals ---------------------------------------------------------------------------------------


def test_a_model_without_sdpa_falls_back_to_eager_with_a_notice(tmp_path, capsys):
    base = family_base("gemma2", tmp_path)
    assert base.model.config._attn_implementation == "eager"
    notice = (
        "softprompt: Gemma2ForCausalLM has no SDPA attention in this transformers; using eager attention "
        "(slower; below fp32 a generated row may depend on its batch-mates)"
    )
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("softprompt")] == [notice]


class NoEmbedsConfig(LlamaConfig):
    model_type = "softprompt-test-no-embeds"


class NoEmbedsModel(LlamaModel):
    config_class = NoEmbedsConfig

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )


class NoEmbedsForCausalLM(LlamaForCausalLM):
    config_class = NoEmbedsConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = NoEmbedsModel(config)


class NoCacheModel(LlamaModel):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        )


class NoCacheForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model = NoCacheModel(config)


def small_llama() -> dict:
    return dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def test_a_model_without_input_embeddings_is_refused_at_load(tmp_path, capsys):
    AutoConfig.register(NoEmbedsConfig.model_type, NoEmbedsConfig, exist_ok=True)
    AutoModelForCausalLM.register(NoEmbedsConfig, NoEmbedsForCausalLM, exist_ok=True)
    _, tokenizer = family_model("llama")
    NoEmbedsForCausalLM(NoEmbedsConfig(**small_llama())).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    message = (
        "NoEmbedsForCausalLM cannot be used: its forward takes no input embeddings (inputs_embeds), which "
        "every prompt-learning method feeds it"
    )
    with pytest.raises(UnsupportedModelError) as err:
        load_base(str(tmp_path), device="cpu", dtype="float32")
    assert str(err.value) == message
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path), "--dtype", "float32", "hello"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"softprompt generate: error: {message}"


def test_a_model_without_a_kv_cache_is_refused():
    with pytest.raises(UnsupportedModelError) as err:
        check_family(NoCacheForCausalLM(LlamaConfig(**small_llama())))
    assert str(err.value) == (
        "NoCacheForCausalLM cannot be used: its forward takes no KV cache (past_key_values), "
        "which prefix tuning and cached generation need"
    )
    check_family(LlamaForCausalLM(LlamaConfig(**small_llama())))  # a usable model passes


GEMMA4 = dict(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    global_head_dim=16,
    vocab_size_per_layer_input=40,
    layer_types=["sliding_attention", "full_attention"],
)


def test_a_model_that_derives_inputs_from_token_ids_is_refused():
    config = AutoConfig.for_model("gemma4_text", **GEMMA4, hidden_size_per_layer_input=4)
    with pytest.raises(UnsupportedModelError) as err:
        check_family(AutoModelForCausalLM.from_config(config))
    assert str(err.value) == (
        "Gemma4ForCausalLM cannot be used: it derives per-layer inputs from the token ids "
        "(hidden_size_per_layer_input), so a soft prompt, which has no token ids, cannot feed it"
    )


def test_a_prefix_for_layers_of_different_shapes_is_refused():
    """Prompt tuning runs on such a model; a prefix (one shape for every layer) is refused in one line."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma4_text", **GEMMA4, hidden_size_per_layer_input=0)
    base = FrozenModel(freeze(AutoModelForCausalLM.from_config(config)), family_model("llama")[1], "tiny-gemma4")
    message = (
        "prefix tuning cannot run on Gemma4ForCausalLM: its layers' keys/values differ in shape (kv heads x "
        "head dim: 1 x 8, 1 x 16) and a prefix gives every layer one shape; use --method prompt or ptuning"
    )
    with pytest.raises(ValueError) as err:
        build_prompt(base, "prefix", "random", 2)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        forward.prefix_kv(base.model, torch.zeros(2, forward.prefix_width(base.model)))
    assert str(err.value) == message
    kv, _ = forward.prompt_kv(base.model, build_prompt(base, "prompt", "random", 2)().detach())
    assert [k.shape[-1] for k, _ in kv] == [8, 16]
