"""The prompt-learning family on the real embedded model, SmolLM2-135M-Instruct (30 layers, 9 heads over 3 key/value
heads, head dim 64): PEFT interop, training, mixed-method generation and the demo. Marked slow."""

import json

import pytest
import torch
from helpers import text_logits

from softprompt.core import forward
from softprompt.core.models import load_base
from softprompt.core.prompt import build_prompt
from softprompt.formats.adapter import load_adapter, save_adapter
from softprompt.inference.batch import GenerationRequest
from softprompt.inference.engine import Engine

pytestmark = pytest.mark.slow


def test_real_model_prefix_layout_and_peft_logits(default_base, tmp_path):
    peft = pytest.importorskip("peft")
    assert forward.prefix_layout(default_base.model) == (30, 3, 64)
    tok = default_base.tokenizer
    ids = torch.tensor([tok("Human: Is the sky blue?\n\nAssistant:", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    for method, options in [("prefix", {}), ("ptuning", {"encoder_hidden_size": 64}), ("cartridge", {})]:
        module = build_prompt(default_base, method, "text", seed=1, **options)
        if method in ("prefix", "cartridge"):
            with torch.no_grad():  # off the init (which equals the prompt-tuning init exactly)
                module.embedding.add_(
                    0.1 * torch.randn(module.embedding.shape, generator=torch.Generator().manual_seed(0))
                )
        save_adapter(tmp_path / method, module, default_base)
        config = json.loads((tmp_path / method / "adapter_config.json").read_text())
        adapter = load_adapter(tmp_path / method, default_base)
        if method in ("prefix", "cartridge"):
            assert (config["num_attention_heads"], config["token_dim"]) == (3, 192)
            assert adapter.embeddings.shape == (module.num_virtual_tokens, 30 * 2 * 192)
        with torch.no_grad():
            ours = text_logits(default_base.model, adapter.virtual(), ids, mask)
            wrapped = peft.PeftModel.from_pretrained(
                load_base(device="cpu", dtype="float32").model, str(tmp_path / method)
            )
            theirs = wrapped(input_ids=ids, attention_mask=mask).logits
            if method == "ptuning":
                theirs = theirs[:, adapter.num_virtual_tokens :]
        assert torch.allclose(ours, theirs, atol=1e-4), (method, (ours - theirs).abs().max())


def test_real_model_peft_cartridge_from_text_loads_with_equal_logits(default_base, tmp_path):
    """A cartridge PEFT initialises from a text and saves loads in softprompt with PEFT's logits, and equals
    softprompt's own text init of that length."""
    peft = pytest.importorskip("peft")
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_text

    text = "A short corpus: the sky is blue, grass is green and the sun is bright."
    peft_model = peft.get_peft_model(
        load_base(device="cpu", dtype="float32").model,
        peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
    )
    initialize_kv_prefix_from_text(peft_model, default_base.tokenizer, text=text, use_chat_template=False)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    tok = default_base.tokenizer
    ids = torch.tensor([tok("Human: Is the sky blue?\n\nAssistant:", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    adapter = load_adapter(tmp_path / "peft", default_base)
    assert adapter.method == "cartridge" and adapter.config["num_frozen_tokens"] == 1
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        ours = text_logits(default_base.model, adapter.virtual(), ids, mask)
        assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
        mine = build_prompt(default_base, "cartridge", "text", 8, init_text=text)()
        assert torch.allclose(mine, adapter.embeddings, atol=1e-4)


def test_real_model_trains_every_method_and_decodes_a_mixed_batch(default_base, tmp_path):
    from softprompt.training.config import TrainConfig
    from softprompt.training.loop import train

    rows = [
        {"instruction": f"Is {w} a colour?", "output": "yes" if i % 2 == 0 else "no"}
        for i, w in enumerate(["red", "table", "blue", "chair", "green", "spoon", "pink", "river"] * 3)
    ]
    adapters = {}
    for method in ("prompt", "prefix", "ptuning"):
        result = train(
            TrainConfig(
                data=rows,
                out=str(tmp_path / method),
                model=default_base,
                method=method,
                num_virtual_tokens=8,
                max_steps=6,
                batch_size=8,
                save_every=6,
                progress=False,
                max_batch_tokens=4096,
            )
        )
        lines = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
        assert result.train_loss is not None and all(
            torch.isfinite(torch.tensor(r["loss"])) for r in lines if "loss" in r
        )
        adapter = load_adapter(result.adapter_dir, default_base)
        assert adapter.method == method and adapter.label_words == ["yes", "no"]  # noticed classification data
        adapters[method] = adapter
    engine = Engine(default_base, adapters)
    requests = [
        GenerationRequest(engine.encode(q, adapter=a), adapter=a, max_new_tokens=4)
        for q in ("Is red a colour?", "Is a spoon a colour?")
        for a in (None, "prompt", "prefix", "ptuning")
    ]
    batched = engine.generate(requests, batch_size=8)
    for request, result in zip(requests, batched):
        alone = engine.generate(
            [GenerationRequest(request.prompt_ids, adapter=request.adapter, max_new_tokens=4)], batch_size=1
        )[0]
        assert result.token_ids == alone.token_ids
        ids, out = list(request.prompt_ids), []
        virtual = adapters[request.adapter].virtual() if request.adapter else None
        with torch.no_grad():  # no-cache reference: the whole text again behind the adapter at every step
            for _ in range(len(result.token_ids)):
                t = torch.tensor([ids])
                hidden, _ = forward.text_hidden(default_base.model, virtual, t, torch.ones_like(t))
                out.append(int(forward.lm_logits(default_base.model, hidden[:, -1])[0].argmax()))
                ids.append(out[-1])
        assert result.token_ids == out


def test_real_model_demo_with_prefix(default_base, tmp_path):
    from softprompt import run_demo

    lines = []
    results = run_demo(
        tmp_path / "demo",
        default_base,
        print_fn=lines.append,
        steps=6,
        batch_size=8,
        method="prefix",
        examples=1,
        progress=False,
    )
    assert results["method"] == "prefix" and load_adapter(tmp_path / "demo").method == "prefix"
    assert any("prefix tuning: 20 virtual tokens for 6 steps" in line for line in lines)
