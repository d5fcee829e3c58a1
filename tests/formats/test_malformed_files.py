"""On-disk formats refuse bad input early, with one line naming the file and the field or line: one atomic folder
replace for adapters and checkpoints, adapter folders checked at load time, BOM and non-UTF-8 data files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from softprompt.data.records import DataError, load_records
from softprompt.data.templates import Template, TemplateError
from softprompt.formats import adapter as adapter_module
from softprompt.formats import checkpoint, folders
from softprompt.formats.adapter import MAX_ABS_VALUE, AdapterError, AdapterMetadata, load_adapter, save_adapter

# ---- one atomic folder replace -----------------------------------------------------------------------------------


def test_replace_folder_moves_a_new_folder_into_place(tmp_path):
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "f").write_text("new")
    assert folders.replace_folder(staging, tmp_path / "final") == tmp_path / "final"
    assert (tmp_path / "final" / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_replace_folder_swaps_out_an_existing_folder_and_leaves_nothing_behind(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "old-only").write_text("old")
    (tmp_path / ".final.old").mkdir()  # left by an earlier crash mid-swap
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "f").write_text("new")
    folders.replace_folder(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["f"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_replace_folder_failing_keeps_the_old_folder(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "f").write_text("old")
    with pytest.raises(OSError):
        folders.replace_folder(tmp_path / "no-such-staging", final)
    assert (final / "f").read_text() == "old"


def test_adapters_and_checkpoints_share_the_one_folder_replace(tmp_path, tiny, monkeypatch):
    assert not hasattr(adapter_module, "_replace_dir") and not hasattr(checkpoint, "_fsync_dir")
    calls = []
    real = folders.replace_folder

    def spy(staging, final):
        calls.append(final.name)
        return real(staging, final)

    monkeypatch.setattr(adapter_module, "replace_folder", spy)
    monkeypatch.setattr(checkpoint, "replace_folder", spy)
    save_adapter(tmp_path / "a", torch.zeros(2, tiny.hidden_size), tiny)
    prompt = torch.zeros(2, tiny.hidden_size, requires_grad=True)
    optimizer = torch.optim.AdamW([prompt])
    checkpoint.save_checkpoint(tmp_path / "run", 3, prompt, tiny, AdapterMetadata(), optimizer, {})
    checkpoint.save_checkpoint(tmp_path / "run", 3, prompt, tiny, AdapterMetadata(), optimizer, {})  # re-saving a step
    assert calls == ["a", ".staging-step-000003", "step-000003", ".staging-step-000003", "step-000003"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000003"]
    assert checkpoint.verify_checkpoint(tmp_path / "run" / "checkpoints" / "step-000003")


# ---- adapter folders are checked when loaded ---------------------------------------------------------------------


def _adapter(tmp_path, tiny, name="a", rows=3):
    return save_adapter(tmp_path / name, torch.zeros(rows, tiny.hidden_size), tiny, label_words=["no", "yes"])


def _edit_extra(folder, **changes):
    path = folder / "softprompt.json"
    extra = json.loads(path.read_text())
    extra.update(changes)
    path.write_text(json.dumps(extra))


@pytest.mark.parametrize(
    "template, message",
    [
        (7, r"field 'template' must be a string, got int 7"),
        (["Q: {instruction}"], r"field 'template' must be a string, got list"),
        (
            "Q: no placeholder",
            r"field 'template': template 'Q: no placeholder' must be 'human-assistant', 'chat', or a "
            r"string containing \{instruction\}",
        ),
        ("Q: {{instruction}}", r"must be 'human-assistant', 'chat', or a string containing \{instruction\}"),
        (
            "Q: {instruction[0]}",
            r"has the placeholder \{instruction\[0\]\}; only \{instruction\} and \{input\} are "
            r"allowed \(no index, attribute, conversion or format spec\)",
        ),
        ("Q: {instruction.upper}", r"has the placeholder \{instruction.upper\}"),
        ("Q: {instruction.__class__}", r"has the placeholder \{instruction.__class__\}"),
        ("Q: {input[0]} {instruction}", r"has the placeholder \{input\[0\]\}"),
        ("Q: {instruction:>999999}", r"has the placeholder \{instruction:>999999\}"),
        ("Q: {instruction!r}", r"has the placeholder \{instruction!r\}"),
        ("Q: {0} {instruction}", r"has the placeholder \{0\}"),
        ("Q: {answer} {instruction}", r"has the placeholder \{answer\}"),
        ("Q: {instruction} }", r"has a stray brace \(Single '\}' encountered"),
        ("Q: {instruction} {", r"has a stray brace \(Single '\{' encountered"),
    ],
)
def test_a_bad_template_is_refused_at_load_time(tmp_path, tiny, template, message):
    folder = _adapter(tmp_path, tiny)
    _edit_extra(folder, template=template)
    with pytest.raises(AdapterError, match=message) as caught:
        load_adapter(folder)
    text = str(caught.value)
    assert text.startswith(f"{folder / 'softprompt.json'}: field 'template'") and "\n" not in text


def test_good_templates_still_load(tmp_path, tiny):
    folder = _adapter(tmp_path, tiny)
    for spec, expected in [
        ("Q: {instruction} {input}\nA: {{literal}}", None),
        ("reference", "human-assistant"),
        ("chat", None),
        (None, "human-assistant"),
    ]:
        _edit_extra(folder, template=spec)
        assert load_adapter(folder).template.spec == (expected or spec)


@pytest.mark.parametrize(
    "spec",
    [
        "{instruction[0]}",
        "{instruction.upper}",
        "{instruction:{input}}",
        "{}",
        3,
        None,
        "{instruction} {instruction.__class__}",
        "{instruction} {input.upper}",
        "{instruction} {input:>99999999}",
    ],
)
def test_template_validation_refuses_indexing_and_attributes(spec):
    with pytest.raises(TemplateError):
        Template(spec)


@pytest.mark.parametrize(
    "words, message",
    [
        ("no,yes", r"field 'label_words' must be a list of strings or null, got str 'no,yes'"),
        ({"0": "no"}, r"field 'label_words' must be a list of strings or null, got dict"),
        (["no", 1], r"field 'label_words' must hold non-empty strings, got 1"),
        (["no", ""], r"field 'label_words' must hold non-empty strings, got ''"),
    ],
)
def test_bad_label_words_are_refused(tmp_path, tiny, words, message):
    folder = _adapter(tmp_path, tiny)
    _edit_extra(folder, label_words=words)
    with pytest.raises(AdapterError, match=message) as caught:
        load_adapter(folder)
    assert str(caught.value).startswith(f"{folder / 'softprompt.json'}: field 'label_words'")


def _set_weights(folder, tensor, rows=None, **more):
    save_file({"prompt_embeddings": tensor, **more}, str(folder / "adapter_model.safetensors"))
    if rows is not None:
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        config["num_virtual_tokens"] = rows
        path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda h: torch.zeros(0, h),
            r"prompt_embeddings has shape \(0, 32\): a soft prompt needs at least one virtual "
            r"token",
        ),
        (
            lambda h: torch.zeros(3, h, dtype=torch.int64),
            r"prompt_embeddings has dtype int64; a soft prompt must be a "
            r"floating-point tensor",
        ),
        (lambda h: torch.zeros(3, h, dtype=torch.int8), r"has dtype int8"),
        (lambda h: torch.zeros(3, h, dtype=torch.bool), r"has dtype bool"),
        (lambda h: torch.full((3, h), float("inf")), r"contains NaN or inf"),
        (
            lambda h: torch.full((3, h), 1e5),
            r"holds a value of magnitude 1e\+05, above the 10000 any embedding could "
            r"have",
        ),
        (lambda h: torch.zeros(3, h).index_fill_(1, torch.tensor([5]), -2e4), r"magnitude 2e\+04"),
        (lambda h: torch.full((3, h), 3e4, dtype=torch.float16), r"magnitude 3e\+04"),
        (
            lambda h: torch.zeros(3, h + 1),
            r"prompt_embeddings has hidden size 33 but adapter_config.json field "
            r"'token_dim' says 32",
        ),
    ],
)
def test_bad_prompt_tensors_are_refused(tmp_path, tiny, make, message):
    folder = _adapter(tmp_path, tiny)
    tensor = make(tiny.hidden_size)
    _set_weights(folder, tensor, rows=tensor.shape[0])
    with pytest.raises(AdapterError, match=message) as caught:
        load_adapter(folder)
    assert str(caught.value).startswith(f"{folder / 'adapter_model.safetensors'}: ")


def test_prompt_values_up_to_the_bound_and_extra_tensors_are_fine(tmp_path, tiny):
    folder = _adapter(tmp_path, tiny)
    tensor = torch.full((3, tiny.hidden_size), -MAX_ABS_VALUE)
    _set_weights(folder, tensor, other=torch.zeros(2, dtype=torch.int64))
    loaded = load_adapter(folder, tiny)
    assert loaded.embeddings.dtype == torch.float32 and loaded.embeddings.min().item() == -MAX_ABS_VALUE
    assert 100 * 30 < MAX_ABS_VALUE < torch.finfo(torch.float16).max  # far above real values, inside fp16


def test_errors_name_the_file_without_needing_the_absolute_path(tmp_path, tiny):
    """The server shows errors with the adapters folder replaced by <adapters>: the rest must still say what and
    where."""
    folder = _adapter(tmp_path, tiny, name="sst2")
    _edit_extra(folder, template="{instruction.upper}")
    with pytest.raises(AdapterError) as caught:
        load_adapter(folder, tiny)
    shown = str(caught.value).replace(str(tmp_path), "<adapters>")
    assert shown.startswith(
        "<adapters>/sst2/softprompt.json: field 'template': template '{instruction.upper}' has "
        "the placeholder {instruction.upper}"
    )


# ---- data files: byte-order marks and text that is not UTF-8 -----------------------------------------------------

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize(
    "name, body",
    [
        ("d.jsonl", b'{"instruction": "caf\xc3\xa9", "output": "b"}\n{"instruction": "c", "output": "d"}\n'),
        ("d.json", b'[{"instruction": "caf\xc3\xa9", "output": "b"}, {"instruction": "c", "output": "d"}]'),
        ("d.csv", b"instruction,output\r\ncaf\xc3\xa9,b\r\nc,d\r\n"),
    ],
)
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name, body):
    (tmp_path / name).write_bytes(BOM + body)
    records = load_records(tmp_path / name)
    assert [(r.instruction, r.output) for r in records.items] == [("café", "b"), ("c", "d")]
    if name != "d.json":
        assert records.items[0].where == f"{tmp_path / name}:{1 if name == 'd.jsonl' else 2}"


def test_jsonl_files_joined_with_their_byte_order_marks_load(tmp_path):
    line = b'{"instruction": "a", "output": "b"}\n'
    (tmp_path / "d.jsonl").write_bytes(BOM + line + BOM + line)
    assert len(load_records(tmp_path / "d.jsonl")) == 2


@pytest.mark.parametrize(
    "name, body, line, column",
    [
        ("d.jsonl", b'{"instruction": "a", "output": "b"}\n\n{"instruction": "caf\xe9", "output": "d"}\n', 3, 21),
        ("d.json", b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "d"}\n]', 3, 22),
        ("d.csv", b'instruction,output\na,b\n"two\nlines",c\ncaf\xe9,d\n', 5, 4),
    ],
)
def test_text_that_is_not_utf8_names_the_line(tmp_path, name, body, line, column):
    (tmp_path / name).write_bytes(body)
    with pytest.raises(DataError) as caught:
        load_records(tmp_path / name)
    assert str(caught.value) == (
        f"{tmp_path / name}:{line}: not valid Unicode: byte 0xe9 at column {column} is "
        "not UTF-8; save the file as UTF-8"
    )


def test_a_large_latin1_file_names_the_line_past_the_first_read_chunk(tmp_path):
    rows = [json.dumps({"instruction": f"q{i}", "output": "a"}).encode() + b"\n" for i in range(5000)]
    rows.append('{"instruction": "déjà", "output": "b"}\n'.encode("latin-1"))
    (tmp_path / "d.jsonl").write_bytes(b"".join(rows))
    with pytest.raises(DataError, match=r"d.jsonl:5001: not valid Unicode: byte 0xe9 at column 19 is not UTF-8"):
        load_records(tmp_path / "d.jsonl")


def test_a_utf16_file_is_named_as_such(tmp_path):
    (tmp_path / "d.csv").write_text("instruction,output\nhi,b\n", encoding="utf-16")
    with pytest.raises(
        DataError,
        match=r"d.csv:1: not valid Unicode: byte 0xff at column 1 is not UTF-8 "
        r"\(it looks like UTF-16\)",
    ):
        load_records(tmp_path / "d.csv")
