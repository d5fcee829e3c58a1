"""The command line with --method multitask: train on a mixed-task JSONL (--task-field), then generate --task, eval
--task-field and --help; bad task input stops with one line (exit 2) naming the file and line, field or flag."""

import json

from softprompt import cli

RECORDS = [
    {"instruction": f"say {w}", "output": w if task == "copy" else w[::-1], "task": task}
    for w in ("ab", "cd", "ef", "gh")
    for task in ("copy", "flip")
]


def one_error(capsys, argv: list[str], verb: str) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0][len(f"softprompt {verb}: error: ") :]


def test_train_generate_and_eval_a_multitask_adapter(tiny_dir, tmp_path, capsys):
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    argv = ["train", "--data", str(data), "--model", str(tiny_dir), "--out", str(tmp_path / "mt"), "--method",
            "multitask", "--task-field", "task", "--num-virtual-tokens", "3", "--max-steps", "2", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "train: tasks of --task-field 'task': 0 copy, 1 flip (saved with the adapter)" in capsys.readouterr().out
    for task in ("0", "1"):
        argv = ["generate", "--model", str(tiny_dir), "--adapter", str(tmp_path / "mt"), "--task", task, "--greedy",
                "--max-new-tokens", "4", "say ab"]  # fmt: skip
        assert cli.main(argv) == 0 and capsys.readouterr().out
    argv = ["eval", "--data", str(data), "--model", str(tiny_dir), "--adapter", str(tmp_path / "mt"), "--task-field",
            "task", "--max-new-tokens", "0", "--no-progress", "--json", str(tmp_path / "eval.json")]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "eval.json").read_text())["results"][0]
    assert result["method"] == "multitask" and [e["task"] for e in result["examples"]] == [0, 1] * 4

    # bad input: one line each
    message = one_error(
        capsys, ["generate", "--model", str(tiny_dir), "--adapter", str(tmp_path / "mt"), "hi"], "generate"
    )
    assert message == f"--adapter {tmp_path / 'mt'}: a multitask adapter needs --task (one of its tasks, 0..1)"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b", "task": "copy"}) + "\n" + json.dumps(
        {"instruction": "a", "output": "b", "task": "sort"}) + "\n")  # fmt: skip
    argv = ["eval", "--data", str(bad), "--model", str(tiny_dir), "--adapter", str(tmp_path / "mt"), "--task-field",
            "task", "--max-new-tokens", "0", "--no-progress"]  # fmt: skip
    assert one_error(capsys, argv, "eval") == f"{bad}:2: field 'task' names task 'sort', unknown (tasks: copy, flip)"
    bad.write_text(json.dumps({"instruction": "a", "output": "b", "task": 1.5}) + "\n")
    argv = ["train", "--data", str(bad), "--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--method",
            "multitask", "--task-field", "task"]  # fmt: skip
    assert one_error(capsys, argv, "train") == (
        f"{bad}:1: field 'task' must be a task id (an integer >= 0) or a task name (a non-empty string), got float 1.5"
    )
    argv = ["train", "--data", str(bad), "--out", str(tmp_path / "x"), "--task-field", "task"]
    assert one_error(capsys, argv, "train") == "--task-field is for --method multitask (this run has --method prompt)"


def test_help_explains_the_multitask_flags(capsys):
    for verb, flags in (
        (
            "train",
            [
                "--task-field",
                "--num-tasks",
                "--num-ranks",
                "--factor-init",
                "--init-from",
                "--init-from-mode",
                "--init-task",
            ],
        ),
        ("generate", ["--task"]),
        ("eval", ["--task-field", "--task"]),
        ("export-vllm", ["--task"]),
    ):
        try:
            cli.main([verb, "--help"])
        except SystemExit:
            pass
        out = capsys.readouterr().out
        for flag in flags:
            assert f"{flag} " in out, (verb, flag)
