"""CPT adapter folders (peft_type CPT): what softprompt writes, and every malformed one refused at load in one line
naming the file and field; the command line refuses --cpt-* values out of range before any model loads."""

import json

import pytest
import torch
from helpers import tiny_base

from softprompt.core.prompt import ContextPrompt
from softprompt.formats.adapter import AdapterError, load_adapter, save_adapter

TYPES = [1, 2, 2, 3, 4]


@pytest.fixture()
def folder(tmp_path):
    base = tiny_base()
    module = ContextPrompt.from_tokens(base, [10, 11, 12, 13, 14], TYPES, loss="decay", decay_factor=0.9)
    save_adapter(tmp_path / "cpt", module, base)
    return tmp_path / "cpt"


def edit(folder, **fields):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))
    return path


def test_a_cpt_folder_records_its_context_and_rule(folder):
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "CPT" and config["task_type"] == "CAUSAL_LM"
    assert config["cpt_token_ids"] == [10, 11, 12, 13, 14] and config["cpt_tokens_type_mask"] == TYPES
    assert config["cpt_mask"] == [1] * 5 and config["num_virtual_tokens"] == 5 and config["token_dim"] == 32
    assert config["opt_weighted_loss_type"] == "decay" and config["opt_loss_decay_factor"] == 0.9
    assert config["opt_projection_epsilon"] == config["opt_projection_format_epsilon"] == 0.1
    adapter = load_adapter(folder, tiny_base())
    assert adapter.method == "cpt" and adapter.embeddings.shape == (5, 32)
    assert adapter.soft_prompt().embeddings.shape == (5, 32)  # transfer: a plain prompt of those rows


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"cpt_token_ids": [10, 11, 12, 13]},
            "field 'cpt_token_ids' has 4 entries but adapter_model.safetensors's prompt_embeddings has 5 rows "
            "(one per context token)",
        ),
        (
            {"cpt_tokens_type_mask": [1, 2, 3]},
            "field 'cpt_tokens_type_mask' has 3 entries but adapter_model.safetensors's prompt_embeddings has 5 rows "
            "(one per context token)",
        ),
        ({"cpt_tokens_type_mask": [1, 2, 2.5, 3, 4]}, "field 'cpt_tokens_type_mask' must be a list of integers, got "),
        (
            {"cpt_tokens_type_mask": [1, -2, 2, 3, 4]},
            "field 'cpt_tokens_type_mask' holds a negative token type, -2 (types are 0 or more)",
        ),
        ({"cpt_mask": [1, 1, 2, 1, 1]}, "field 'cpt_mask' must hold 0s and 1s, got [1, 2]"),
        ({"cpt_token_ids": None}, "field 'cpt_token_ids' must be a list of integers, got None"),
    ],
)
def test_malformed_cpt_folders_are_refused_in_one_line(folder, fields, message):
    path = edit(folder, **fields)
    with pytest.raises(AdapterError) as caught:
        load_adapter(folder)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_a_peft_folder_without_mask_or_types_loads(folder):
    """PEFT fills a missing cpt_mask or cpt_tokens_type_mask with 1s, so a folder may leave them out."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["cpt_mask"], config["cpt_tokens_type_mask"]
    path.write_text(json.dumps(config))
    assert torch.equal(load_adapter(folder).embeddings, load_adapter(folder).embeddings)
