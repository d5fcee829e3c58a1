"""The prompt-learning family: --method prompt | prefix | ptuning through every verb (tiny models; the PEFT interop is
in test_methods_peft.py). One producer of per-layer keys/values per method, then the same downstream for all."""

import json
import shutil
import sys
from pathlib import Path

import httpx
import pytest
import torch
from engine_helpers import peaked_base
from helpers import text_logits, tiny_base
from train_helpers import RECORDS, config, torchrun, train_until, trainable_base

from softprompt import evaluate, generate_batch
from softprompt.core import forward
from softprompt.core.models import activation_checkpointing
from softprompt.core.prompt import PrefixEncoder, PromptEncoder, SoftPrompt, build_prompt
from softprompt.data.labels import detect_label_words
from softprompt.data.templates import Template, encode_text
from softprompt.evaluation.evaluate import format_table
from softprompt.evaluation.inspect import format_report, inspect_adapter
from softprompt.formats import checkpoint
from softprompt.formats.adapter import Adapter, AdapterError, load_adapter, save_adapter
from softprompt.inference.batch import GenerationRequest
from softprompt.inference.engine import Engine
from softprompt.training import loop as train_module
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train
from softprompt.vllm.client import PrefixNotSupported, completion_payload

METHODS = {
    "prompt": {},
    "prefix": {"prefix_projection": False},
    "prefix-proj": {"prefix_projection": True},
    "ptuning": {},
    "ptuning-lstm": {"encoder_type": "lstm"},
    "cartridge": {"num_frozen_tokens": 1},
}
EVERY = ["prompt", "prefix", "ptuning", "cartridge"]
PEFT_TYPE = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "ptuning": "P_TUNING", "cartridge": "CARTRIDGE"}


def method_of(name: str) -> str:
    return name.split("-")[0]


# ---- the producer: one notion of a soft prompt's per-layer keys/values ------------------------------------------


def test_prefix_layout_follows_peft_for_grouped_query_attention(tiny):
    # tiny: 2 layers, 4 heads, 2 kv heads, head dim 8 -> PEFT's token_dim = 2 x 8 = 16, width 2 x 2 x 16
    assert forward.prefix_layout(tiny.model) == (2, 2, 8)
    assert forward.prefix_width(tiny.model) == 64
    flat = torch.randn(3, 64)
    kv = forward.prefix_kv(tiny.model, flat)
    assert len(kv) == 2 and kv[0][0].shape == (1, 2, 3, 8)
    # PEFT's layout: per position [layer 0 keys | layer 0 values | layer 1 keys | ...], each kv_heads x head_dim
    assert torch.equal(kv[1][0][0, 1, 2], flat[2, 32 + 8 : 32 + 16])
    assert torch.equal(kv[0][1][0, 0, 0], flat[0, 16:24])
    assert torch.equal(forward.flat_prefix(kv), flat)
    with pytest.raises(
        ValueError,
        match=r"a prefix for this model needs shape \[N, 64\] \(2 layers x 2 x 2 kv heads "
        r"x 8\), got \(3, 32\)",
    ):
        forward.prefix_kv(tiny.model, torch.randn(3, 32))


def test_a_fresh_prefix_starts_where_the_same_prompt_init_starts(tiny):
    ids = torch.randint(5, 60, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    prompt = build_prompt(tiny, "prompt", "vocab", 4, seed=3)
    prefix = build_prompt(tiny, "prefix", "vocab", 4, seed=3)
    assert isinstance(prefix, PrefixEncoder) and prefix().shape == (4, 64)
    ours = text_logits(tiny.model, prefix.virtual(), ids, mask)
    assert torch.allclose(ours, text_logits(tiny.model, prompt.virtual(), ids, mask), atol=1e-5)


def test_prefix_scores_the_first_text_token_from_nothing(tiny):
    """As in PEFT, a prefix has no last virtual hidden state: a label on text position 0 is not scored."""
    prefix = build_prompt(tiny, "prefix", "random", 3)
    ids = torch.randint(5, 60, (1, 6))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    nll, counts = forward.label_nll(tiny.model, prefix.virtual(), ids, mask, labels)
    assert counts.tolist() == [5]
    nll_p, counts_p = forward.label_nll(
        tiny.model, build_prompt(tiny, "prompt", "random", 3).virtual(), ids, mask, labels
    )
    assert counts_p.tolist() == [6]
    with pytest.raises(ValueError, match="a prefix-tuning prompt has no input embeddings to concatenate"):
        forward.label_nll(tiny.model, prefix.virtual(), ids, mask, labels, mode="concat")


def test_modules_and_their_saved_tensors(tiny):
    encoder = build_prompt(tiny, "ptuning", "vocab", 5, encoder_hidden_size=12)
    assert isinstance(encoder, PromptEncoder) and encoder().shape == (5, 32)
    assert encoder.peft_fields() == {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": 12}
    lstm = build_prompt(tiny, "ptuning", "vocab", 5, encoder_type="lstm")
    assert lstm().shape == (5, 32) and lstm.peft_fields()["encoder_reparameterization_type"] == "LSTM"
    projected = build_prompt(tiny, "prefix", "vocab", 5, prefix_projection=True)
    assert projected.embedding.shape == (5, 32) and projected().shape == (5, 64)
    assert projected.peft_fields() == {"prefix_projection": True, "encoder_hidden_size": 16}
    # same seed, same module (two processes build the same encoder)
    again = build_prompt(tiny, "ptuning", "vocab", 5, encoder_hidden_size=12)
    assert torch.equal(encoder(), again())
    with pytest.raises(
        ValueError, match="unknown method 'lora': use one of prompt, prefix, ptuning, cartridge, multitask, cpt"
    ):
        build_prompt(tiny, "lora")


# ---- adapter folders ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(METHODS))
def test_adapter_round_trip_keeps_method_and_output(tiny, tmp_path, name):
    module = build_prompt(tiny, method_of(name), "random", 3, **METHODS[name])
    save_adapter(tmp_path / "a", module, tiny, template=Template("Q: {instruction}\nA:"))
    adapter = load_adapter(tmp_path / "a", tiny)
    assert adapter.method == method_of(name) and adapter.num_virtual_tokens == 3
    with torch.no_grad():
        assert torch.equal(adapter.embeddings, module())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE[method_of(name)]
    if method_of(name) in ("prefix", "cartridge"):
        assert (config["num_attention_heads"], config["token_dim"], config["num_layers"]) == (2, 16, 2)
        assert config.get("prefix_projection", False) == (name == "prefix-proj")


def test_prefix_adapter_that_does_not_fit_is_refused(tiny, tmp_path):
    other = tiny_base(layers=3)
    save_adapter(tmp_path / "a", build_prompt(other, "prefix", "random", 2), other)
    with pytest.raises(
        AdapterError,
        match=r"prefix adapter width 96 does not fit the base model tiny-llama \(prefix "
        r"width 64 = 2 layers x 2 x 2 kv heads x 8 head dim\)",
    ):
        load_adapter(tmp_path / "a", tiny)
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_layers": 2}))
    with pytest.raises(
        AdapterError,
        match=r"prompt_embeddings has width 96 but adapter_config.json fields "
        r"num_layers x 2 x token_dim say 64",
    ):
        load_adapter(tmp_path / "a")
    config_path.write_text(json.dumps({**config, "num_virtual_tokens": 5}))
    with pytest.raises(
        AdapterError,
        match=r"prompt_embeddings has shape \(2, 96\), expected "
        r"\[num_virtual_tokens=5, layers x 2 x kv_heads x head_dim\]",
    ):
        load_adapter(tmp_path / "a")


# ---- training ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    return trainable_base()


def cfg(out, base, name, **overrides):
    return config(out, base, method=method_of(name), **{**METHODS[name], **overrides})


@pytest.mark.parametrize("name", ["prefix", "prefix-proj", "ptuning", "ptuning-lstm", "cartridge"])
def test_every_method_learns_and_writes_its_adapter(base, tmp_path, name):
    result = train(cfg(tmp_path / "run", base, name, max_steps=12, eval_fraction=0.25, eval_every=4))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("kind", r.get("type")) != "eval" and "loss" in r]
    assert losses[-1] < losses[0]
    adapter = load_adapter(result.adapter_dir, base)
    assert adapter.method == method_of(name)
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").is_file()
    assert load_adapter(tmp_path / "run" / "best").method == method_of(name)
    assert result.best_step is not None


@pytest.mark.parametrize("name", ["prefix", "prefix-proj", "ptuning", "cartridge"])
def test_resume_restores_the_encoder_exactly(base, tmp_path, monkeypatch, name):
    whole = train(cfg(tmp_path / "whole", base, name))
    train_until(cfg(tmp_path / "cut", base, name), monkeypatch, 6)
    tensors, state = checkpoint.load_checkpoint(checkpoint.list_checkpoints(tmp_path / "cut")[-1])
    assert state["method"] == method_of(name) and any(k.startswith("prompt.") for k in tensors)
    resumed = train(cfg(tmp_path / "cut", base, name, resume=str(tmp_path / "cut")))
    assert resumed.steps == whole.steps == 12
    assert torch.equal(load_adapter(whole.adapter_dir).embeddings, load_adapter(resumed.adapter_dir).embeddings)
    with pytest.raises(
        ValueError,
        match=r"the checkpoint was made with --method " + method_of(name) + r", this run has --method prompt",
    ):
        train(config(tmp_path / "cut", base, resume=str(tmp_path / "cut")))


@pytest.mark.parametrize("name", ["prefix", "prefix-proj", "cartridge"])
def test_key_value_methods_have_equal_gradients_under_gradient_checkpointing(base, name):
    """The prompt's keys/values enter every layer as a read-only cache, which a checkpointed layer's recompute reads
    again unchanged: the gradients equal the unchecked run's (fp32, one thread: tests/conftest.py)."""
    module = build_prompt(base, method_of(name), "random", 3, seed=1, **METHODS[name])
    ids = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    runs = []
    attention = base.model.model.layers[0].self_attn
    for checkpointing in (False, True):
        calls = []
        hook = attention.register_forward_hook(lambda *_: calls.append(1))
        module.zero_grad()
        with activation_checkpointing(base.model, checkpointing):
            nll, _ = forward.label_nll(base.model, module.virtual(), ids, mask, labels)
            nll.sum().backward()
        hook.remove()
        runs.append((float(nll.sum().detach()), [p.grad.clone() for p in module.parameters()], len(calls)))
    (loss, grads, calls), (loss_gc, grads_gc, calls_gc) = runs
    assert (calls, calls_gc) == (1, 2)  # checkpointing did re-run the layer in the backward pass
    assert loss_gc == pytest.approx(loss, abs=1e-6)
    assert all(g.abs().sum() > 0 for g in grads)
    for g, g_gc in zip(grads, grads_gc):
        assert torch.allclose(g, g_gc, atol=1e-6, rtol=1e-5), (g - g_gc).abs().max()


@pytest.mark.parametrize("name", ["prefix", "cartridge"])
def test_key_value_methods_train_the_same_with_gradient_checkpointing(base, tmp_path, name):
    plain = train(cfg(tmp_path / "plain", base, name, max_steps=3))
    checked = train(cfg(tmp_path / "gc", base, name, max_steps=3, gradient_checkpointing=True))
    assert torch.allclose(
        load_adapter(plain.adapter_dir).embeddings, load_adapter(checked.adapter_dir).embeddings, atol=1e-5
    )


def test_ptuning_trains_the_same_with_gradient_checkpointing(base, tmp_path):
    kv = train(cfg(tmp_path / "kv", base, "ptuning", max_steps=3))
    concat = train(cfg(tmp_path / "concat", base, "ptuning", max_steps=3, gradient_checkpointing=True))
    assert torch.allclose(
        load_adapter(kv.adapter_dir).embeddings, load_adapter(concat.adapter_dir).embeddings, atol=1e-5
    )


def test_micro_batches_do_not_change_a_prefix_run(base, tmp_path):
    whole = train(cfg(tmp_path / "whole", base, "prefix-proj", max_steps=3, max_batch_tokens=4096))
    split = train(cfg(tmp_path / "split", base, "prefix-proj", max_steps=3, max_batch_tokens=32))
    assert torch.allclose(
        load_adapter(whole.adapter_dir).embeddings, load_adapter(split.adapter_dir).embeddings, atol=1e-5
    )


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from train_helpers import RECORDS, trainable_base
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train
train(TrainConfig(data=RECORDS, out={out!r}, model=trainable_base(), num_virtual_tokens=4, init="random", lr=0.3,
                  batch_size=2, max_steps=4, progress=False, max_batch_tokens=64, threads=1, method="ptuning"))
"""


def test_two_processes_match_one_for_a_prompt_encoder(base, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parents[1]), out=str(tmp_path / "two")))
    torchrun(script)
    one = train(cfg(tmp_path / "one", base, "ptuning", batch_size=4, max_steps=4))
    assert torch.allclose(
        load_adapter(one.adapter_dir).embeddings, load_adapter(tmp_path / "two").embeddings, atol=1e-5
    )


def test_method_options_are_checked():
    with pytest.raises(
        ValueError, match="--method must be one of prompt, prefix, ptuning, cartridge, multitask, cpt, got 'lora'"
    ):
        TrainConfig(data=RECORDS, out="x", method="lora")
    with pytest.raises(ValueError, match="--encoder-type must be one of mlp, lstm, got 'gru'"):
        TrainConfig(data=RECORDS, out="x", encoder_type="gru")
    with pytest.raises(ValueError, match="--encoder-hidden-size must be >= 1, got 0"):
        TrainConfig(data=RECORDS, out="x", encoder_hidden_size=0)
    with pytest.raises(ValueError, match=r"--encoder-type is for --method ptuning \(this run has --method prompt\)"):
        TrainConfig(data=RECORDS, out="x", encoder_type="lstm")
    with pytest.raises(
        ValueError,
        match="--encoder-hidden-size is for --method ptuning, or --method prefix without --no-prefix-projection",
    ):
        TrainConfig(data=RECORDS, out="x", method="prefix", prefix_projection=False, encoder_hidden_size=8)
    with pytest.raises(ValueError, match="--encoder-hidden-size is for"):
        TrainConfig(data=RECORDS, out="x", encoder_hidden_size=8)
    assert TrainConfig(data=RECORDS, out="x", method="prefix", encoder_hidden_size=8).prefix_projection
    assert (
        TrainConfig(data=RECORDS, out="x", method="prefix").peak_lr,
        TrainConfig(data=RECORDS, out="x", method="ptuning").peak_lr,
        TrainConfig(data=RECORDS, out="x").peak_lr,
    ) == (0.03, 0.03, 0.3)
    assert TrainConfig(data=RECORDS, out="x", method="prefix").peak_lr > 0
    assert TrainConfig(data=RECORDS, out="x", method="prefix", lr=0.01).peak_lr == 0.01


# ---- label words noticed in classification data -------------------------------------------------------------------

CLASSIFICATION = [
    {"instruction": f"film number {i} was {'good' if i % 2 else 'bad'}", "output": "positive" if i % 2 else "negative"}
    for i in range(24)
]


def test_detect_label_words(tiny):
    outputs = [r["output"] for r in CLASSIFICATION]
    assert detect_label_words(outputs, tiny.tokenizer, 20) == ["negative", "positive"]
    assert detect_label_words(outputs[:10], tiny.tokenizer, 20) is None  # too few records
    assert detect_label_words(outputs, tiny.tokenizer, 1) is None  # more words than virtual tokens
    assert detect_label_words([f"answer {i}" for i in range(24)], tiny.tokenizer, 20) is None  # not a few answers
    assert detect_label_words(["a rather long answer"] * 12 + ["b"] * 12, tiny.tokenizer, 20) is None  # 4 words
    assert detect_label_words(["yes"] * 23 + ["no"], tiny.tokenizer, 20) is None  # an answer seen once


def test_train_notices_classification_and_eval_ranks_its_label_words(base, tmp_path, capsys):
    result = train(
        config(tmp_path / "run", base, data=CLASSIFICATION, init=None, max_steps=2, batch_size=8, num_virtual_tokens=4)
    )
    out = capsys.readouterr().out
    assert (
        "train: every training answer is one of 2 short answers (negative, positive): using them as label words "
        "(init labels, saved with the adapter, so softprompt eval ranks them as choices); --no-auto-label-words "
        "turns this off"
    ) in out
    saved = json.loads((tmp_path / "run" / "softprompt.json").read_text())
    assert saved["label_words"] == ["negative", "positive"] and saved["init"] == "labels"
    report = evaluate(
        CLASSIFICATION[:6], base, [result.adapter_dir], max_new_tokens=0, compare_base=True, progress=False
    )
    assert report["choices"] == ["negative", "positive"]
    assert report["choices_from"] == f"label words saved with {result.adapter_dir}"
    assert report["notes"] == [
        f"choices: negative, positive (the label words saved with {result.adapter_dir}; --choices overrides)"
    ]
    assert all("accuracy" in r for r in report["results"])
    other = [{"instruction": "x", "output": "neutral"}]
    report = evaluate(other, base, [result.adapter_dir], max_new_tokens=0, progress=False)
    assert report["choices"] is None and "accuracy" not in report["results"][0]
    assert report["notes"] == [
        f"not ranking {result.adapter_dir}'s saved label words (negative, positive) as "
        "choices: <records>: record 0 answers 'neutral', which is not one of them"
    ]

    off = train(config(tmp_path / "off", base, data=CLASSIFICATION, max_steps=1, batch_size=8, auto_label_words=False))
    assert "using them as label words" not in capsys.readouterr().out
    assert load_adapter(off.adapter_dir).label_words is None


def test_cli_flag_turns_label_words_off(tiny_dir, tmp_path, capsys):
    from softprompt import cli

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CLASSIFICATION))
    assert (
        cli.main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
                "--model",
                str(tiny_dir),
                "--max-steps",
                "1",
                "--no-progress",
                "--no-auto-label-words",
                "--method",
                "prefix",
            ]
        )
        == 0
    )
    assert load_adapter(tmp_path / "o").label_words is None
    assert load_adapter(tmp_path / "o").method == "prefix"
    assert "using them as label words" not in capsys.readouterr().out


# ---- evaluation, generation, serving -------------------------------------------------------------------------------


def methods_dir(base, folder: Path, n: int = 3) -> Path:
    """Adapters of every method for `base`, visibly different from each other and from the base model."""
    for i, name in enumerate(EVERY):
        module = build_prompt(base, name, "random", n + i, seed=i)
        if name in ("prefix", "cartridge"):
            with torch.no_grad():
                module.embedding.add_(torch.randn(module.embedding.shape, generator=torch.Generator().manual_seed(i)))
        save_adapter(folder / name, module, base, template=Template("Q: {instruction}\nA:"))
    return folder


def test_eval_reports_adapters_of_every_method_side_by_side(base, tmp_path):
    folder = methods_dir(base, tmp_path / "adapters")
    paths = [str(folder / m) for m in EVERY]
    rows = [{"instruction": "abc", "output": "ab"}, {"instruction": "cab", "output": "ac"}]
    report = evaluate(rows, base, paths, compare_base=True, choices="ab,ac", max_new_tokens=2)
    assert [r["method"] for r in report["results"]] == [None, *EVERY]
    losses = [r["loss"] for r in report["results"]]
    assert len(set(losses)) == 5
    table = format_table(report["results"])
    assert table.splitlines()[2].split() == ["method", "-", *EVERY]
    # the loss of each adapter is the engine's own: scored through the same per-layer keys/values
    for path, result in zip(paths, report["results"][1:]):
        alone = evaluate(rows, base, [path], choices="ab,ac", max_new_tokens=0)["results"][0]
        assert alone["loss"] == pytest.approx(result["loss"], abs=1e-6)


@pytest.fixture(scope="module")
def peaked():
    return peaked_base()


def mixed_adapters(peaked) -> dict[str, Adapter]:
    out = {}
    for i, name in enumerate(EVERY):
        module = build_prompt(peaked, name, "random", 2 + i, seed=10 + i)
        with torch.no_grad():
            tensor = module().detach() + 0.5 * torch.randn(module().shape, generator=torch.Generator().manual_seed(i))
        out[name] = Adapter(embeddings=tensor, config={"peft_type": PEFT_TYPE[name], "num_virtual_tokens": 2 + i})
    return out


@torch.no_grad()
def reference(base, adapter: Adapter | None, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with no decode cache: every step runs the whole text again behind the adapter's keys/values
    (recomputed from the adapter each time)."""
    ids, out = list(ids), []
    for _ in range(max_new_tokens):
        t = torch.tensor([ids])
        hidden, _ = forward.text_hidden(base.model, adapter.virtual() if adapter else None, t, torch.ones_like(t))
        token = int(forward.lm_logits(base.model, hidden[:, -1])[0].argmax())
        out.append(token)
        ids.append(token)
        if token == base.tokenizer.eos_token_id:
            break
    return out


def test_batch_of_rows_of_every_method_and_the_base_equals_rows_alone(peaked):
    adapters = mixed_adapters(peaked)
    engine = Engine(peaked, adapters)
    texts = ["hello", "a b c d e", "xyz", "the cat"]
    requests = [
        GenerationRequest(encode_text(peaked.tokenizer, t), adapter=a, max_new_tokens=6)
        for t in texts
        for a in [None, *EVERY]
    ]
    batched = engine.generate(requests, batch_size=7)
    outputs = set()
    for request, result in zip(requests, batched):
        alone = engine.generate(
            [GenerationRequest(request.prompt_ids, adapter=request.adapter, max_new_tokens=6)], batch_size=1
        )[0]
        assert result.token_ids == alone.token_ids
        ref = reference(peaked, adapters.get(request.adapter), request.prompt_ids, 6)
        assert result.token_ids == ref, (request.adapter, texts)
        outputs.add((tuple(request.prompt_ids), tuple(result.token_ids)))
    by_text = {}
    for request, result in zip(requests, batched):
        by_text.setdefault(tuple(request.prompt_ids), set()).add(tuple(result.token_ids))
    assert any(len(v) > 1 for v in by_text.values())  # the adapters do change the answers


def test_generate_batch_file_mixes_methods(peaked, tmp_path):
    folder = tmp_path / "adapters"
    for name, adapter in mixed_adapters(peaked).items():
        save_adapter(folder / name, adapter.embeddings, peaked, method=name)
    records = [{"instruction": t, "adapter": a} for t in ["hi", "abc"] for a in [*EVERY, None]]
    options = dict(base=peaked, adapters_dir=str(folder), max_new_tokens=5, progress=False, greedy=True)
    batched = generate_batch(records, batch_size=8, **options)
    for record, out in zip(records, batched):
        assert out["output"] == generate_batch([record], **options)[0]["output"]
    # and with a seed, sampled rows too (record i samples with seed + i, alone or not)
    sampled = generate_batch(records, batch_size=8, **{**options, "greedy": False, "seed": 7})
    for i, (record, out) in enumerate(zip(records, sampled)):
        assert out["output"] == generate_batch([record], **{**options, "greedy": False, "seed": 7 + i})[0]["output"]


@pytest.mark.parametrize("later", ["prefix", "cartridge"])
def test_serve_offers_every_method_and_hot_adds_a_prefix(tiny, tmp_path, later):
    from serve_helpers import LiveServer, alone

    from softprompt import create_app

    folder = methods_dir(tiny, tmp_path / "adapters")
    shutil.move(str(folder / later), str(tmp_path / "later"))
    others = sorted(set(EVERY) - {later})
    engine = Engine(tiny, {n: load_adapter(folder / n, tiny) for n in others})
    with LiveServer(create_app(tiny, folder, allow_admin=True)) as live:
        assert sorted(m.id for m in live.client.models.list().data) == ["base", *others]
        ids = encode_text(tiny.tokenizer, "The cat")
        for name in others:
            out = live.client.completions.create(model=name, prompt="The cat", max_tokens=6, temperature=0)
            assert out.choices[0].text == alone(engine, ids, name, 6).text
        shutil.move(str(tmp_path / "later"), str(folder / later))
        r = httpx.post(live.url + "/v1/adapters", json={"name": later})
        assert r.status_code == 201 and r.json()["num_virtual_tokens"] == 3 + EVERY.index(later)
        engine.add_adapter(later, load_adapter(folder / later, tiny))
        out = live.client.completions.create(model=later, prompt="The cat", max_tokens=6, temperature=0)
        assert out.choices[0].text == alone(engine, ids, later, 6).text
        assert httpx.delete(live.url + "/v1/adapters/" + later).status_code == 200
        assert sorted(m.id for m in live.client.models.list().data) == ["base", *others]


# ---- inspect, vLLM ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prefix", "cartridge"])
def test_inspect_a_prefix_shows_layer_norms_not_nearest_tokens(tiny, tmp_path, method):
    module = build_prompt(tiny, method, "vocab", 3)
    save_adapter(tmp_path / "a", module, tiny)
    info = inspect_adapter(tmp_path / "a", tiny, top_k=5)
    assert info["method"] == method and "vocab_mean_norm" not in info
    assert all("nearest" not in t for t in info["tokens"])
    assert [e["layer"] for e in info["layers"]] == [0, 1]
    flat = module().detach()
    keys0 = flat[:, :16].norm(dim=-1).mean()
    assert info["layers"][0]["key_norm"] == pytest.approx(float(keys0), abs=1e-3)
    assert {"text_key_norm", "text_value_norm"} <= set(info["layers"][0])
    text = format_report(info)
    assert "no nearest vocabulary tokens" in text and "layer  key norm  value norm" in text
    assert f"method {method}: peft_type {PEFT_TYPE[method]}" in text
    assert ("the first 1 frozen" in text) == (method == "cartridge")
    without = inspect_adapter(tmp_path / "a", None, top_k=0)
    assert "text_key_norm" not in without["layers"][0]


def test_inspect_a_ptuning_adapter_finds_nearest_tokens(tiny, tmp_path):
    save_adapter(tmp_path / "a", build_prompt(tiny, "ptuning", "vocab", 3), tiny)
    info = inspect_adapter(tmp_path / "a", tiny, top_k=2)
    assert info["method"] == "ptuning" and all(len(t["nearest"]) == 2 for t in info["tokens"])


def test_vllm_route_refuses_prefix_and_carries_ptuning(tiny, tmp_path):
    save_adapter(tmp_path / "prefix", build_prompt(tiny, "prefix", "vocab", 3), tiny)
    save_adapter(tmp_path / "pt", build_prompt(tiny, "ptuning", "vocab", 3), tiny)
    with pytest.raises(
        PrefixNotSupported,
        match=(
            r"adapter .*prefix uses method prefix \(prefix tuning: keys and values inside every layer\); vLLM's "
            r"prompt_embeds input carries input embeddings only, so it serves prompt and ptuning adapters but not "
            r"prefix ones; serve this adapter with `softprompt serve`"
        ),
    ):
        completion_payload("m", tiny, load_adapter(tmp_path / "prefix", tiny), instruction="hi")
    save_adapter(tmp_path / "cart", build_prompt(tiny, "cartridge", "vocab", 3), tiny)
    with pytest.raises(PrefixNotSupported, match=r"adapter .*cart uses method cartridge \(a cartridge: keys and"):
        completion_payload("m", tiny, load_adapter(tmp_path / "cart", tiny), instruction="hi")
    body = completion_payload("m", tiny, load_adapter(tmp_path / "pt", tiny), instruction="hi")
    assert body["prompt_embeds"]


# ---- demo ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["prefix", "cartridge"])
def test_demo_runs_with_prefix(tiny, tmp_path, method):
    from softprompt import run_demo

    lines = []
    results = run_demo(
        tmp_path / "demo",
        tiny,
        print_fn=lines.append,
        steps=2,
        batch_size=4,
        method=method,
        examples=1,
        progress=False,
    )
    assert results["method"] == method and load_adapter(tmp_path / "demo").method == method
    assert any({"prefix": "prefix tuning", "cartridge": "cartridge"}[method] in line for line in lines)


@pytest.mark.parametrize("method", ["prefix", "ptuning", "cartridge"])
def test_chat_with_any_method_equals_generate(peaked, tmp_path, method):
    import io

    from softprompt import generate
    from softprompt.inference.chat import Conversation, chat_loop
    from softprompt.inference.generate import add_adapter, build_engine

    save_adapter(tmp_path / method, mixed_adapters(peaked)[method].embeddings, peaked, method=method)
    engine = build_engine(peaked)
    name = add_adapter(engine, tmp_path / method)
    conversation = Conversation(engine, name, {"temperature": 0.0, "top_k": 0, "top_p": 1.0}, 8)
    stdout = io.StringIO()
    assert chat_loop(conversation, io.StringIO("hello there\n/quit\n"), stdout, io.StringIO()) == 0
    expected = generate("hello there", base=peaked, adapter=str(tmp_path / method), greedy=True, max_new_tokens=8)
    assert stdout.getvalue() == expected + "\n"
