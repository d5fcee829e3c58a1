"""Options are declared once, with a valid range, and checked in one place: the Python API and the command line
refuse the same values with the same one-line error naming the flag."""

import dataclasses
import subprocess
import sys

import pytest

from softprompt import cli
from softprompt.demo.config import DemoConfig
from softprompt.evaluation.config import EvalConfig, InspectConfig
from softprompt.formats.config import ComposeConfig
from softprompt.inference.config import ChatConfig, GenerateConfig
from softprompt.options import OptionError, spec_of
from softprompt.serve.config import ServeConfig
from softprompt.training.config import TrainConfig

CONFIGS = [TrainConfig, EvalConfig, InspectConfig, GenerateConfig, ChatConfig, ServeConfig, DemoConfig, ComposeConfig]
NOT_A_RANGE = {"seed"}  # every numeric option below has minimum/above (and seeds a maximum too)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_numeric_option_declares_a_range_and_every_option_a_help(config):
    hints = __import__("typing").get_type_hints(config)
    for field in dataclasses.fields(config):
        spec = spec_of(field)
        assert spec is not None and spec.help.strip(), f"{config.__name__}.{field.name} has no declared help"
        numeric = {int, float} & set(getattr(hints[field.name], "__args__", (hints[field.name],)))
        if numeric:
            assert spec.minimum is not None or spec.above is not None, f"{config.__name__}.{field.name}: no range"


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--batch-size", "-1", "--batch-size must be >= 1, got -1"),
        ("--grad-accum", "0", "--grad-accum must be >= 1, got 0"),
        ("--save-every", "0", "--save-every must be >= 1, got 0"),
        ("--log-every", "0", "--log-every must be >= 1, got 0"),
        ("--num-virtual-tokens", "-5", "--num-virtual-tokens must be >= 1, got -5"),
        ("--num-virtual-tokens", "0", "--num-virtual-tokens must be >= 1, got 0"),
        ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0, got -1"),
        ("--max-steps", "0", "--max-steps must be >= 1, got 0"),
        ("--max-steps", "-1", "--max-steps must be >= 1, got -1"),
        ("--epochs", "0", "--epochs must be > 0, got 0"),
        ("--keep-checkpoints", "0", "--keep-checkpoints must be >= 1, got 0"),
        ("--warmup-steps", "-1", "--warmup-steps must be >= 0, got -1"),
        ("--threads", "0", "--threads must be >= 1, got 0"),
        ("--lr", "inf", "--lr must be a finite number, got inf"),
        ("--lr", "nan", "--lr must be a finite number, got nan"),
        ("--lr", "0", "--lr must be > 0, got 0"),
        ("--eval-fraction", "1", "--eval-fraction must be <= 0.9, got 1"),
        ("--seed", "-1", "--seed must be >= 0, got -1"),
    ],
)
def test_out_of_range_train_flags_stop_with_one_line(flag, value, message, tmp_path, capsys):
    argv = ["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"), flag, value]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"softprompt train: error: {message}\n"
    with pytest.raises(OptionError, match=f"^{message.replace('.', '[.]')}$"):
        TrainConfig(
            data="x",
            out="y",
            **{flag[2:].replace("-", "_"): float(value) if "." in value or value in ("inf", "nan") else int(value)},
        )


def test_the_python_api_checks_types_too():
    with pytest.raises(OptionError, match=r"^--batch-size must be an integer, got str '8'$"):
        TrainConfig(data="x", out="y", batch_size="8")
    with pytest.raises(OptionError, match=r"^--batch-size must be an integer, got True$"):
        TrainConfig(data="x", out="y", batch_size=True)
    with pytest.raises(OptionError, match=r"^--optimizer must be one of adamw, adafactor, got 'sgd'$"):
        TrainConfig(data="x", out="y", optimizer="sgd")
    with pytest.raises(OptionError, match=r"^--top-p must be > 0, got 0$"):
        GenerateConfig(instruction="hi", top_p=0)
    with pytest.raises(OptionError, match=r"^--max-queue must be >= 0, got -1$"):
        ServeConfig(max_queue=-1)
    with pytest.raises(OptionError, match=r"^--top-k must be >= 0, got -1$"):
        InspectConfig(adapter="a", top_k=-1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--data", "x", "--batch-size", "0"], "softprompt eval: error: --batch-size must be >= 1, got 0"),
        (["eval", "--data", "x", "--examples", "-1"], "softprompt eval: error: --examples must be >= 0, got -1"),
        (
            ["generate", "hi", "--max-new-tokens", "0"],
            "softprompt generate: error: --max-new-tokens must be >= 1, got 0",
        ),
        (["generate", "hi", "--temperature", "-1"], "softprompt generate: error: --temperature must be >= 0, got -1"),
        (["chat", "--top-p", "1.5"], "softprompt chat: error: --top-p must be <= 1, got 1.5"),
        (["serve", "--port", "70000"], "softprompt serve: error: --port must be <= 65535, got 70000"),
        (["serve", "--max-batch", "0"], "softprompt serve: error: --max-batch must be >= 1, got 0"),
        (["demo", "--steps", "0"], "softprompt demo: error: --steps must be >= 1, got 0"),
        (["inspect", "a", "--top-k", "-2"], "softprompt inspect: error: --top-k must be >= 0, got -2"),
    ],
)
def test_every_verb_refuses_out_of_range_flags_before_loading_anything(argv, message, capsys):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == message + "\n"


def test_help_imports_no_torch_and_is_quick():
    code = (
        "import sys, time; t = time.perf_counter(); from softprompt import cli; p = cli.build_parser(); "
        "[p.parse_args([v, '--help']) if False else None for v in cli.VERBS]; "
        "heavy = [m for m in ('torch', 'transformers', 'fastapi', 'numpy') if m in sys.modules]; "
        "print(heavy, time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]", f"building the parser imported {out[0]}"
    assert float(out[1]) < 0.5
    for verb in cli.VERBS:
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "softprompt", verb, "--help"], capture_output=True, text=True
        )
        assert done.returncode == 0 and "usage: softprompt" in done.stdout
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert "softprompt.cli" in imported and not {"torch", "transformers"} & imported, f"{verb} --help"
