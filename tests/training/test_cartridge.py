"""Cartridges (--method cartridge, PEFT's CARTRIDGE) and the key/value initialisations prefix tuning shares with them:
frozen attention-sink tokens, the text / file / zero inits, and the errors a user can cause. PEFT interop both ways is
in test_methods_peft.py; every verb and mixed batches are in test_methods.py."""

import json

import pytest
import torch
from helpers import tiny_base
from train_helpers import config, trainable_base

from softprompt.core.prompt import Cartridge, build_prompt, prefill_kv
from softprompt.formats.adapter import AdapterError, load_adapter, save_adapter
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train


@pytest.fixture(scope="module")
def base():
    return trainable_base()


def test_frozen_tokens_never_move_and_the_rest_trains(base, tmp_path):
    result = train(config(tmp_path / "run", base, method="cartridge", num_frozen_tokens=2, init="vocab"))
    start = build_prompt(base, "cartridge", "vocab", 4, num_frozen_tokens=2)
    trained = load_adapter(result.adapter_dir, base)
    assert trained.method == "cartridge" and trained.config["num_frozen_tokens"] == 2
    with torch.no_grad():
        assert torch.equal(trained.embeddings[:2], start()[:2])  # bit for bit: not even weight decay touches them
        assert (trained.embeddings[2:] - start()[2:]).abs().max() > 1e-3
    # the frozen rows are a buffer: the optimiser sees only the trainable ones, and they get no gradient
    module = trained.soft_prompt()
    assert isinstance(module, Cartridge) and module.num_frozen_tokens == 2
    assert [tuple(p.shape) for p in module.parameters()] == [(2, 64)]
    module().sum().backward()
    assert module.frozen.grad is None and module.embedding.grad.abs().sum() > 0


def test_text_and_file_inits_are_the_prefill_of_the_first_tokens(base, tmp_path):
    text = "abcdefghij klmnop"
    cartridge = build_prompt(base, "cartridge", "text", 5, init_text=text)
    ids = base.tokenizer(text)["input_ids"][:5]
    first = base.model.get_input_embeddings()(torch.tensor(ids)).detach()
    with torch.no_grad():
        assert torch.equal(cartridge(), prefill_kv(base, first))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    from_file = train(
        config(tmp_path / "f", base, method="cartridge", init=None, init_file=str(tmp_path / "corpus.txt"), max_steps=1)
    )
    from_text = train(config(tmp_path / "t", base, method="cartridge", init=None, init_text=text, max_steps=1))
    assert torch.equal(load_adapter(from_file.adapter_dir).embeddings, load_adapter(from_text.adapter_dir).embeddings)
    assert json.loads((tmp_path / "f" / "softprompt.json").read_text())["init"] == "text"


def test_zero_init(base):
    for method, options in [("prefix", {}), ("cartridge", {})]:
        with torch.no_grad():
            assert torch.equal(build_prompt(base, method, "zero", 3, **options)(), torch.zeros(3, 64))
    projected = build_prompt(base, "prefix", "zero", 3, prefix_projection=True)
    with torch.no_grad():
        assert torch.equal(projected(), torch.zeros(3, 64))  # the projection's output starts at zero ...
    projected().sum().backward()
    assert projected.transform[-1].weight.grad.abs().sum() > 0  # ... and still learns
    with pytest.raises(
        ValueError, match=r"init 'zero' is for the key/value methods \(prefix, cartridge\), not 'prompt'"
    ):
        build_prompt(base, "prompt", "zero", 3)


def test_options_are_checked():
    def make(**kw):
        return TrainConfig(data=[{"instruction": "a", "output": "b"}], out="x", **kw)

    cases = [
        ({"num_frozen_tokens": 1}, r"--num-frozen-tokens is for --method cartridge \(this run has --method prompt\)"),
        ({"init": "zero"}, r"--init zero is for --method prefix or cartridge \(this run has --method prompt\)"),
        (
            {"method": "cartridge", "num_virtual_tokens": 3, "num_frozen_tokens": 3},
            r"--num-frozen-tokens 3 leaves nothing to train: it must be below --num-virtual-tokens \(3\)",
        ),
        ({"method": "cartridge", "num_frozen_tokens": -1}, r"--num-frozen-tokens must be >= 0, got -1"),
        ({"init_text": "a", "init_file": "f"}, r"give --init-text or --init-file, not both"),
        (
            {"init_file": "f", "init": "vocab"},
            r"--init-text / --init-file are for --init text \(this run has --init vocab\)",
        ),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            make(**kw)
    assert make(method="cartridge").frozen_tokens == 1 and make(method="cartridge").peak_lr == 0.03


def test_init_file_errors_name_the_file(base, tmp_path):
    with pytest.raises(ValueError, match=r"--init-file .*missing.txt: cannot read: No such file or directory"):
        train(config(tmp_path / "o", base, method="cartridge", init=None, init_file=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"--init-file .*empty.txt: the file is empty"):
        train(config(tmp_path / "o", base, method="cartridge", init=None, init_file=str(tmp_path / "empty.txt")))


def test_a_cartridge_for_another_model_is_refused_in_one_line(tmp_path):
    tiny, other = tiny_base(), tiny_base(layers=3)
    save_adapter(tmp_path / "c", build_prompt(other, "cartridge", "random", 2), other)
    message = (
        f"{tmp_path / 'c'}: cartridge of width 96 (3 layers x 2 x token_dim 16) does not fit the base model "
        "tiny-llama: its cartridges have width 64 = 2 layers x 2 x 2 kv heads x 8 head dim"
    )
    with pytest.raises(AdapterError) as err:
        load_adapter(tmp_path / "c", tiny)
    assert str(err.value) == message
    from softprompt.inference.prompt_cache import PromptCache

    with pytest.raises(AdapterError, match="cartridge of width 96"):
        PromptCache(tiny).add("c", load_adapter(tmp_path / "c"))
    config_path = tmp_path / "c" / "adapter_config.json"
    fields = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**fields, "num_frozen_tokens": 5}))
    with pytest.raises(AdapterError) as err:
        load_adapter(tmp_path / "c")
    assert str(err.value) == (
        f"{config_path}: field 'num_frozen_tokens' must be an integer in 0..2 (the virtual tokens), got 5"
    )


def test_cli_trains_a_cartridge(tmp_path):
    from helpers import save_tiny

    from softprompt.cli import main

    model = save_tiny(trainable_base(), tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [{"instruction": f"q{i}", "output": "ab"} for i in range(8)]))
    (tmp_path / "corpus.txt").write_text("some corpus text to start from")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "o"), "--model", str(model), "--method", "cartridge"]
    args += ["--num-frozen-tokens", "2", "--init-file", str(tmp_path / "corpus.txt"), "--max-steps", "2"]
    assert main(args + ["--num-virtual-tokens", "6", "--no-progress", "--threads", "1"]) == 0
    adapter = load_adapter(tmp_path / "o")
    assert adapter.method == "cartridge" and adapter.num_virtual_tokens == 6
    assert adapter.config["num_frozen_tokens"] == 2
