import json

import pytest
import torch

from softprompt import cli
from softprompt.core.models import DEFAULT_MODEL, DEFAULT_MODEL_NAME
from softprompt.evaluation.inspect import base_for, format_report, inspect_adapter
from softprompt.formats.adapter import save_adapter


def vocab_rows_adapter(base, tmp_path, ids, scale=1.0):
    table = base.model.get_input_embeddings().weight.detach()
    emb = table[torch.tensor(ids)] * scale
    return save_adapter(
        tmp_path / "adapter", emb, base, init="text", init_text="hi", label_words=["a", "b"], extra={"steps": 3}
    )


def test_nearest_tokens_are_the_rows_the_prompt_is_made_of(tiny, tmp_path):
    tok = tiny.tokenizer
    ids = [tok.convert_tokens_to_ids(c) for c in "hey"]
    # Scaling keeps the direction, so cosine similarity still finds the very rows.
    path = vocab_rows_adapter(tiny, tmp_path, ids, scale=3.0)
    info = inspect_adapter(path, tiny, top_k=3)
    assert [t["nearest"][0]["id"] for t in info["tokens"]] == ids
    assert [t["nearest"][0]["token"] for t in info["tokens"]] == ["h", "e", "y"]
    assert all(t["nearest"][0]["cosine"] == pytest.approx(1.0, abs=1e-4) for t in info["tokens"])
    assert all(len(t["nearest"]) == 3 for t in info["tokens"])
    table = tiny.model.get_input_embeddings().weight.detach()
    assert info["tokens"][1]["norm"] == pytest.approx(3.0 * float(table[ids[1]].norm()), rel=1e-4)


def test_size_parameters_and_config(tiny, tmp_path):
    path = vocab_rows_adapter(tiny, tmp_path, [5, 6, 7, 8])
    info = inspect_adapter(path, tiny, top_k=2)
    assert info["num_virtual_tokens"] == 4
    assert info["trainable_parameters"] == 4 * tiny.hidden_size
    assert info["size_bytes"] == sum(f.stat().st_size for f in path.iterdir())
    assert set(info["files"]) == {"adapter_config.json", "adapter_model.safetensors", "softprompt.json"}
    assert info["config"]["peft_type"] == "PROMPT_TUNING"
    assert info["softprompt"]["label_words"] == ["a", "b"]
    text = format_report(info)
    assert f"{4 * tiny.hidden_size:,} trainable parameters" in text
    assert "label words: ['a', 'b']" in text
    assert '"steps": 3' in text


def test_without_a_model_only_norms(tiny, tmp_path):
    path = vocab_rows_adapter(tiny, tmp_path, [5, 6])
    info = inspect_adapter(path, None)
    assert "nearest" not in info["tokens"][0] and "vocab_mean_norm" not in info
    assert "per-token norms" in format_report(info)


def test_cli_json(tiny, tiny_dir, tmp_path, capsys):
    ids = [tiny.tokenizer.convert_tokens_to_ids(c) for c in "ab"]
    path = vocab_rows_adapter(tiny, tmp_path, ids)
    assert cli.main(["inspect", str(path), "--model", str(tiny_dir), "--json", "--top-k", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [t["nearest"][0]["token"] for t in info["tokens"]] == ["a", "b"]
    assert info["base_model"] == str(tiny_dir)


def test_cli_bad_folder(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 2
    assert "softprompt inspect: error: adapter folder not found" in capsys.readouterr().err


def test_base_for():
    assert base_for({"base_model_name_or_path": DEFAULT_MODEL_NAME}, None) == DEFAULT_MODEL
    assert base_for({"base_model_name_or_path": "/models/x"}, None) == "/models/x"
    assert base_for({"base_model_name_or_path": "/models/x"}, "/other") == "/other"
