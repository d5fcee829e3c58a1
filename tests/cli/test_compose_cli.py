"""`softprompt compose` writes the composed folder; `generate --adapter a+b` and `eval --adapter a+b` compose at run
time and answer exactly as that folder does; bad compositions stop with one line."""

import json

import pytest
import torch

from softprompt import cli
from softprompt.core.forward import prefix_width
from softprompt.core.prompt import SoftPrompt
from softprompt.data.templates import Template
from softprompt.formats.adapter import load_adapter, save_adapter

RECORDS = [{"instruction": "say ab", "output": "ab"}, {"instruction": "say ac", "output": "ac"}]


def cartridges(tiny, folder):
    for seed, (name, n) in enumerate({"a": 3, "b": 4}.items()):
        tensor = 3 * torch.randn(n, prefix_width(tiny.model), generator=torch.Generator().manual_seed(seed))
        save_adapter(folder / name, tensor, tiny, method="cartridge", template=Template("Q: {instruction}\nA:"))
    return f"{folder / 'a'}+{folder / 'b'}"


def test_compose_writes_the_folder_that_generate_and_eval_compose_at_run_time(tiny, tiny_dir, tmp_path, capsys):
    spec = cartridges(tiny, tmp_path)
    assert cli.main(["compose", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    assert capsys.readouterr().out == f"softprompt compose: wrote {tmp_path / 'ab'}\n"
    composed = load_adapter(tmp_path / "ab", tiny)
    parts = [load_adapter(tmp_path / p).embeddings for p in "ab"]
    assert torch.equal(composed.embeddings, torch.cat(parts)) and composed.template.spec == "Q: {instruction}\nA:"

    answers = []
    for adapter in (spec, str(tmp_path / "ab")):
        argv = ["generate", "--model", str(tiny_dir), "--adapter", adapter, "--greedy", "--max-new-tokens", "8", "hi"]
        assert cli.main(argv) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    argv = ["eval", "--data", str(data), "--model", str(tiny_dir), "--adapter", spec, str(tmp_path / "ab")]
    assert cli.main([*argv, "--json", str(tmp_path / "eval.json"), "--no-progress", "--max-new-tokens", "3"]) == 0
    ours, folder = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert ours["adapter"] == spec and ours["loss"] == folder["loss"] and ours["examples"] == folder["examples"]


def test_bad_compositions_stop_with_one_line(tiny, tiny_dir, tmp_path, capsys):
    spec = cartridges(tiny, tmp_path)
    prompt = SoftPrompt.initialise(tiny, "random", num_virtual_tokens=2)
    save_adapter(tmp_path / "soft", prompt, tiny)
    cases = [
        (["compose", str(tmp_path / "a"), "--out", str(tmp_path / "o")], "compose two or more adapter folders, got 1"),
        (
            ["compose", str(tmp_path / "a"), str(tmp_path / "soft"), "--out", str(tmp_path / "o")],
            f"composition '{tmp_path / 'a'}+{tmp_path / 'soft'}': part '{tmp_path / 'soft'}' is a prompt adapter; "
            "only key/value adapters (prefix, cartridge) compose, by concatenating their keys/values",
        ),
        (
            ["generate", "--model", str(tiny_dir), "--adapter", spec + "+", "hi"],
            f"composition '{spec}+' has an empty part: join two or more adapter names with '+', e.g. 'a+b'",
        ),
        (
            ["generate", "--model", str(tiny_dir), "--adapter", f"{spec}+{tmp_path / 'none'}", "hi"],
            f"adapter folder not found: {tmp_path / 'none'}",
        ),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        assert capsys.readouterr().err == f"softprompt {argv[0]}: error: {message}\n"
    assert not (tmp_path / "o").exists()


def test_batch_records_name_compositions_of_folders_under_the_adapters_dir(tiny, tmp_path):
    from softprompt.inference.config import BatchOptions
    from softprompt.inference.generate import generate_batch

    cartridges(tiny, tmp_path)
    assert cli.main(["compose", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")]) == 0
    records = [{"instruction": "hi", "adapter": name} for name in ("a+b", "ab", "a", "b+a+b")]
    options = BatchOptions(adapters_dir=str(tmp_path), greedy=True, max_new_tokens=8, progress=False)
    out = [r["output"] for r in generate_batch(records, options, base=tiny)]
    assert out[0] == out[1]  # the composition equals its folder, in one batch with the others
    with pytest.raises(ValueError) as err:
        generate_batch([{"instruction": "hi", "adapter": "a+nope"}], options, base=tiny)
    assert str(err.value) == f"record 1: unknown adapter 'nope': no folder {tmp_path / 'nope'}"
    with pytest.raises(ValueError) as err:
        generate_batch([{"instruction": "hi", "adapter": "a+../b"}], options, base=tiny)
    assert str(err.value).startswith("record 1: invalid adapter name '../b': use 1-64 letters")
