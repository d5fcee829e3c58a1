"""Adapter folders: PEFT's format both ways (real PEFT as the oracle), and clear errors for bad folders."""

import json

import pytest
import torch
from helpers import reload_tiny, text_logits, tiny_base
from safetensors.torch import load_file, save_file

from softprompt.core.prompt import SoftPrompt
from softprompt.data.templates import Template
from softprompt.formats.adapter import AdapterError, load_adapter, save_adapter

peft = pytest.importorskip("peft")

TEXT = "Hello robot, this is a test."


def _batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def test_saved_folder_has_peft_layout(tmp_path, tiny):
    prompt = SoftPrompt.initialise(tiny, "random", num_virtual_tokens=4)
    out = save_adapter(
        tmp_path / "a",
        prompt.embeddings,
        tiny,
        init="random",
        template=Template("Q: {instruction}"),
        label_words=["no", "yes"],
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["num_virtual_tokens"] == 4 and config["token_dim"] == tiny.hidden_size
    assert config["base_model_name_or_path"] == "tiny-llama"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    assert tensors["prompt_embeddings"].dtype == torch.float32
    assert torch.equal(tensors["prompt_embeddings"], prompt.embeddings.detach())
    loaded = load_adapter(out, tiny)
    assert loaded.template == Template("Q: {instruction}") and loaded.label_words == ["no", "yes"]
    assert config["prompt_tuning_init"] == "RANDOM" and loaded.extra["init"] == "random"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left behind


def test_softprompt_adapter_loads_in_peft_with_equal_logits(tmp_path):
    base = tiny_base(seed=1)
    prompt = SoftPrompt.initialise(base, "vocab", num_virtual_tokens=6, seed=3)
    save_adapter(tmp_path / "sp", prompt.embeddings, base, init="vocab")
    ids, mask = _batch(base.tokenizer, ["Human: hi\n\nAssistant: ", "Human: a longer request\n\nAssistant: "])
    ours = text_logits(base.model, prompt.embeddings, ids, mask)

    peft_model = peft.PeftModel.from_pretrained(tiny_base(seed=1).model, str(tmp_path / "sp"))
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits[:, 6:]
    valid = mask.bool()
    assert torch.allclose(ours[valid], theirs[valid], atol=1e-5)
    # and the prompt really is used (PEFT would silently ignore it without task_type CAUSAL_LM)
    plain = base.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(plain[valid], theirs[valid], atol=1e-3)


def test_peft_saved_adapter_loads_in_softprompt_with_equal_logits(tmp_path):
    model = tiny_base(seed=2).model
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="RANDOM")
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        weight = peft_model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn_like(weight) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    base = tiny_base(seed=2)
    adapter = load_adapter(tmp_path / "peft", base)
    assert adapter.num_virtual_tokens == 5 and adapter.template == Template("human-assistant")
    ids, mask = _batch(base.tokenizer, ["Human: two\n\nAssistant: ", "Human: three words\n\nAssistant: x"])
    ours = text_logits(base.model, adapter.embeddings, ids, mask)
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits[:, 5:]
    assert torch.allclose(ours[mask.bool()], theirs[mask.bool()], atol=1e-5)


def test_text_init_matches_peft_text_init(tiny_dir):
    base = reload_tiny(tiny_dir)
    for n in (5, 40):  # truncated and tiled
        config = peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=n,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=TEXT,
            tokenizer_name_or_path=str(tiny_dir),
        )
        peft_model = peft.get_peft_model(reload_tiny(tiny_dir).model, config)
        theirs = peft_model.prompt_encoder["default"].embedding.weight
        ours = SoftPrompt.initialise(base, "text", num_virtual_tokens=n, init_text=TEXT).embeddings
        assert torch.equal(ours, theirs)


def test_text_init_is_recorded_for_peft(tmp_path, tiny):
    prompt = SoftPrompt.initialise(tiny, "text", init_text="abc")
    config = json.loads((save_adapter(tmp_path / "t", prompt, tiny) / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == "abc"
    with pytest.raises(ValueError, match=r"init 'text' needs its init text to be recorded"):
        save_adapter(tmp_path / "u", prompt.embeddings, tiny, init="text")


def _adapter(tmp_path, tiny, name="a"):
    return save_adapter(tmp_path / name, torch.zeros(3, tiny.hidden_size), tiny)


def test_missing_folder_and_files(tmp_path, tiny):
    with pytest.raises(AdapterError, match=r"adapter folder not found: .*nope"):
        load_adapter(tmp_path / "nope")
    out = _adapter(tmp_path, tiny)
    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: missing"):
        load_adapter(out)
    (out / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config.json: missing \(not an adapter folder\)"):
        load_adapter(out)


def test_pickle_only_adapter_is_refused(tmp_path, tiny):
    out = _adapter(tmp_path, tiny)
    (out / "adapter_model.safetensors").rename(out / "adapter_model.bin")
    with pytest.raises(
        AdapterError, match=r"only adapter_model.bin \(pickle\) found; softprompt reads safetensors only"
    ):
        load_adapter(out)


def test_corrupt_files(tmp_path, tiny):
    out = _adapter(tmp_path, tiny)
    (out / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: corrupt or unreadable safetensors file"):
        load_adapter(out)
    (out / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match=r"adapter_config.json: not valid JSON"):
        load_adapter(out)


def test_wrong_kind_of_adapter(tmp_path, tiny):
    out = _adapter(tmp_path, tiny)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(
        AdapterError,
        match=r"peft_type is 'LORA'; softprompt loads only PROMPT_TUNING, PREFIX_TUNING, P_TUNING, CARTRIDGE, MULTITASK_PROMPT_TUNING adapters",
    ):
        load_adapter(out)
    (out / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    with pytest.raises(AdapterError, match=r"task_type is 'SEQ_CLS'; expected CAUSAL_LM"):
        load_adapter(out)


def test_shape_and_values_are_checked(tmp_path, tiny):
    out = _adapter(tmp_path, tiny)
    save_file({"prompt_embeddings": torch.zeros(4, tiny.hidden_size)}, str(out / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"has shape \(4, 32\), expected \[num_virtual_tokens=3, hidden\]"):
        load_adapter(out)
    save_file({"other": torch.zeros(3, 8)}, str(out / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"no tensor 'prompt_embeddings' \(found: other\)"):
        load_adapter(out)
    save_file(
        {"prompt_embeddings": torch.full((3, tiny.hidden_size), float("nan"))}, str(out / "adapter_model.safetensors")
    )
    with pytest.raises(AdapterError, match=r"contains NaN or inf"):
        load_adapter(out)


def test_hidden_size_must_fit_the_base(tmp_path, tiny):
    bigger = tiny_base(hidden=48)
    out = save_adapter(tmp_path / "big", torch.zeros(3, 48), bigger)
    with pytest.raises(
        AdapterError, match=r"adapter hidden size 48 does not fit the base model tiny-llama \(hidden size 32\)"
    ):
        load_adapter(out, tiny)


def test_saving_over_an_existing_adapter_replaces_it(tmp_path, tiny):
    _adapter(tmp_path, tiny)
    save_adapter(tmp_path / "a", torch.ones(7, tiny.hidden_size), tiny)
    assert load_adapter(tmp_path / "a").num_virtual_tokens == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
