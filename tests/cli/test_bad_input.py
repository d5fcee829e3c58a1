"""The command line's messages for bad input: text that is not valid Unicode (in data files, argv and stdin), data
files the JSON parser cannot take, and flags checked before any model loads. Every error is one line naming the
file and line (or the flag), and exits 2."""

import io
import json
import sys
import time

import pytest

from softprompt.cli import main
from softprompt.data.records import DataError, load_records

SURROGATE_MESSAGE = "not valid Unicode: field 'instruction': \\ud800 at character 4 is a lone UTF-16 surrogate"


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def one_error(capsys, argv: list[str], verb: str) -> str:
    """The one-line message of a command that must fail with exit code 2."""
    code, err = run_cli(capsys, argv)
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    prefix = f"softprompt {verb}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix) :]


@pytest.fixture()
def surrogate_file(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"instruction": "ok", "output": "b"}\n{"instruction": "caf\\ud800", "output": "b"}\n')
    return path


# ---- item 3: not valid Unicode -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "verb, argv",
    [
        ("train", ["--data", "{data}", "--out", "{tmp}/out", "--max-steps", "1"]),
        ("eval", ["--data", "{data}", "--max-new-tokens", "0"]),
        ("generate", ["--batch", "{data}"]),
    ],
)
def test_a_lone_surrogate_in_a_data_file_names_the_line(capsys, tiny_dir, tmp_path, surrogate_file, verb, argv):
    argv = [a.format(data=surrogate_file, tmp=tmp_path) for a in argv]
    message = one_error(capsys, [verb, *argv, "--model", str(tiny_dir)], verb)
    assert message == f"{surrogate_file}:2: {SURROGATE_MESSAGE}"


def test_a_lone_surrogate_in_a_json_array_and_in_memory_records(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "x", "output": "\\udfff!"}]')
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert str(caught.value) == (
        f"{path}: record 1: not valid Unicode: field 'output': \\udfff at character 1 is a lone UTF-16 surrogate"
    )
    with pytest.raises(DataError) as caught:
        load_records([{"instruction": "caf\ud800", "output": "b"}])
    assert str(caught.value) == f"<records>: record 0: {SURROGATE_MESSAGE}"


def test_a_surrogate_in_any_batch_field_or_key_is_named(capsys, tmp_path):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"instruction": "a", "extra": {"note": "\\ud83d"}}\n')
    assert one_error(capsys, ["generate", "--batch", str(batch)], "generate") == (
        f"{batch}:1: not valid Unicode: field 'extra.note': \\ud83d at character 1 is a lone UTF-16 surrogate"
    )
    batch.write_text('{"instruction": "a", "k\\udc00": 1}\n')
    assert one_error(capsys, ["generate", "--batch", str(batch)], "generate") == (
        f"{batch}:1: not valid Unicode: the name of field 'k\\udc00': \\udc00 at character 2 is a lone UTF-16 surrogate"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "caf\udcff"], "INSTRUCTION: not valid Unicode: byte 0xff at character 4 is not UTF-8"),
        (["generate", "hi", "--input", "\udcff"], "--input: not valid Unicode: byte 0xff at character 1 is not UTF-8"),
        (
            ["generate", "hi", "--stop", "ok", "--stop", "a\udce9"],
            "--stop: not valid Unicode: byte 0xe9 at character 2 is not UTF-8",
        ),
        (
            ["chat", "--system", "\ud800"],
            "--system: not valid Unicode: \\ud800 at character 1 is a lone UTF-16 surrogate",
        ),
    ],
)
def test_argv_that_is_not_utf8_names_the_argument_before_loading_a_model(capsys, argv, message):
    # Python decodes argv with surrogateescape: the byte 0xff arrives as U+DCFF
    start = time.perf_counter()
    assert one_error(capsys, [*argv, "--model", "/nonexistent/model"], argv[0]) == message
    assert time.perf_counter() - start < 1.0


def test_argv_bytes_through_a_real_process(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.getcwd(), "LC_ALL": "C.UTF-8"}
    done = subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"softprompt", b"generate", b"caf\xff", b"--model", b"/nonexistent"],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == (
        b"softprompt generate: error: INSTRUCTION: not valid Unicode: byte 0xff at character 4 is not UTF-8\n"
    )


@pytest.mark.parametrize(
    "stdin",
    [
        io.StringIO("hi\n\ncaf\udcff\n"),  # what a UTF-8 or C locale gives: surrogateescape
        io.TextIOWrapper(io.BytesIO(b"hi\n\ncaf\xff\n"), encoding="utf-8", errors="strict"),
    ],
)
def test_chat_stdin_that_is_not_utf8_names_the_line(capsys, monkeypatch, tiny_dir, stdin):
    monkeypatch.setattr(sys, "stdin", stdin)
    message = one_error(capsys, ["chat", "--model", str(tiny_dir), "--max-new-tokens", "1", "--greedy"], "chat")
    assert message == "<stdin>:3: not valid Unicode: byte 0xff at character 4 is not UTF-8"


# ---- item 8: data files the JSON parser cannot take, and record messages -----------------------------------------
@pytest.mark.parametrize(
    "name, body, message",
    [
        (
            "d.jsonl",
            '{"instruction": "a", "output": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
            "d.jsonl:2: JSON nested too deeply for the parser (at most about 1000 levels)",
        ),
        (
            "d.json",
            '[{"instruction": "a", "output": "b"},\n\n' + "[" * 100_000 + "]" * 100_000 + "]",
            "d.json:3: JSON nested too deeply for the parser (at most about 1000 levels)",
        ),
        (
            "d.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ' + "7" * 5000 + "}\n",
            "d.jsonl:2: a number with 5000 digits is too long (at most 4300)",
        ),
        (
            "d.json",
            '[{"instruction": "a", "output": "b"},\n{"instruction": "a",\n"output": ' + "7" * 5000 + "}]",
            "d.json:3: a number with 5000 digits is too long (at most 4300)",
        ),
    ],
)
def test_what_the_json_parser_cannot_take_names_the_line(tmp_path, name, body, message):
    (tmp_path / name).write_text(body)
    with pytest.raises(DataError) as caught:
        load_records(tmp_path / name)
    assert str(caught.value) == f"{tmp_path}/{message}"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"instruction": None, "output": "b"}, "field 'instruction' is null (the instruction must be a string)"),
        ({"instruction": "a", "output": None}, "field 'output' is null (the output must be a string)"),
        ({"instruction": "a", "output": " \n"}, "field 'output' is empty (only whitespace)"),
        ({"instruction": "a", "output": ""}, "field 'output' is empty"),
        ({"instruction": "\t", "output": "b"}, "field 'instruction' is empty (only whitespace)"),
    ],
)
def test_null_and_blank_fields_are_named_as_such(row, message):
    with pytest.raises(DataError) as caught:
        load_records([row])
    assert str(caught.value) == f"<records>: record 0: {message}"


# ---- item 8: flags checked before the model loads ----------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate"], "nothing to answer: give an INSTRUCTION or --batch FILE.jsonl"),
        (["generate", "hi", "--batch", "b.jsonl"], "give either an INSTRUCTION or --batch FILE.jsonl, not both"),
        (["chat", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["generate", "hi", "--top-p", "0"], "--top-p must be > 0, got 0"),
        (["eval", "--data", "d.jsonl", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (
            ["eval", "--data", "d.jsonl", "--choices", "yes"],
            "--choices needs at least 2 non-empty comma-separated words, got ['yes']",
        ),
        (
            ["eval", "--data", "d.jsonl", "--fields", "sentence"],
            "field mapping 'sentence' must look like role=name, e.g. instruction=sentence",
        ),
        (
            ["eval", "--data", "d.jsonl", "--template", "{nope}"],
            "template '{nope}' has the placeholder {nope}; only {instruction} and {input} are allowed (no index, "
            "attribute, conversion or format spec)",
        ),
    ],
)
def test_flags_are_refused_before_any_model_loads(capsys, monkeypatch, argv, message):
    import softprompt.core.models as models
    import softprompt.evaluation.evaluate as evaluate

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(models, "load_base", no_model)
    monkeypatch.setattr(evaluate, "load_base", no_model)
    assert one_error(capsys, argv, argv[0]) == message


def test_flag_errors_come_before_torch_is_even_imported():
    import os
    import subprocess

    code = (
        "import sys; from softprompt.cli import main\n"
        "for argv in (['chat', '--max-new-tokens', '0'], ['generate', 'hi', '--seed', '-1'],\n"
        "             ['eval', '--data', 'd.jsonl', '--limit', '0']):\n"
        "    assert main(argv) == 2\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert done.stdout == "[]\n", done.stderr
    assert done.stderr.splitlines() == [
        "softprompt chat: error: --max-new-tokens must be >= 1, got 0",
        "softprompt generate: error: --seed must be >= 0, got -1",
        "softprompt eval: error: --limit must be >= 1, got 0",
    ]


def test_eval_json_that_cannot_be_written_is_refused_before_evaluating(capsys, monkeypatch, tmp_path):
    import softprompt.evaluation.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_base", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "file").write_text("")
    cases = [
        (tmp_path / "file" / "r.json", f"{tmp_path / 'file'} is not a folder"),
        (tmp_path / "file" / "sub" / "r.json", f"{tmp_path / 'file'} is not a folder"),
    ]
    for out, reason in cases:
        message = one_error(capsys, ["eval", "--data", str(data), "--json", str(out)], "eval")
        assert message == f"--json {out}: cannot write there: {reason}"
    assert one_error(capsys, ["eval", "--data", str(data), "--json", str(tmp_path)], "eval") == (
        f"--json {tmp_path}: is a folder, not a file"
    )
    assert one_error(capsys, ["eval", "--data", str(data), "--json", str(data)], "eval") == (
        f"--json {data} is the --data file: writing it would overwrite the input; choose another --json"
    )


def test_generate_refuses_to_overwrite_its_batch_file(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"instruction": "a"}\n')
    before = batch.read_bytes()
    for out in ("b.jsonl", "./sub/../b.jsonl", str(batch)):
        assert one_error(
            capsys, ["generate", "--batch", "b.jsonl", "--out", out, "--model", "/nonexistent"], "generate"
        ) == (f"--out {out} is the --batch file: writing it would overwrite the input; choose another --out")
    assert batch.read_bytes() == before


def test_an_empty_batch_file_is_an_error(capsys, tmp_path):
    batch = tmp_path / "b.jsonl"
    for body in ("", "\n  \n\n"):
        batch.write_text(body)
        assert one_error(capsys, ["generate", "--batch", str(batch), "--model", "/nonexistent"], "generate") == (
            f"{batch}: no records (the file is empty or holds only blank lines)"
        )
