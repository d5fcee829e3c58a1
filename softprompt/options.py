"""Options declared once: a config field carries its default, its help text and its valid range.

`option(...)` makes such a dataclass field. `check_options(config)` checks every field of a config against what
its field declares, in this one place, and raises `OptionError` with one line naming the flag, e.g.
"--batch-size must be >= 1, got 0". Configs call it from `__post_init__`, so the Python API and the command line
refuse the same values. The command line (softprompt/cli) builds its flags from the same fields.

Options shared by several verbs (`--model`, `--device`, `--dtype`, `--threads`, progress bars) are made by the
functions at the end of this module, so each is worded once.

This module imports nothing heavy: `softprompt --help` reads it without loading torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


class OptionError(ValueError):
    """An option value outside its declared range (the message names the flag)."""


@dataclass(frozen=True)
class Spec:
    """What an option field declares besides its default."""

    help: str
    minimum: float | None = None  # value >= minimum
    above: float | None = None  # value > above
    maximum: float | None = None  # value <= maximum
    choices: tuple[str, ...] | None = None
    flag: str | None = None  # default: --field-name (a bool defaulting to True: --no-field-name)
    metavar: str | None = None
    group: str = "options"  # the --help section
    positional: bool = False
    many: bool | str = False  # a list option: True repeats the flag (--stop a --stop b); "+": one flag, several values
    cli: bool = True  # False: Python API only (in-memory data, a preloaded model, ...)


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, **spec: Any) -> Any:
    """A dataclass field with a help text and a declared valid range (see `Spec` for the keywords)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"option": Spec(help, **spec)})


def spec_of(field: dataclasses.Field) -> Spec | None:
    return field.metadata.get("option")


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of an option field."""
    spec = spec_of(field)
    if spec is not None and spec.flag:
        return spec.flag
    name = field.name.replace("_", "-")
    return f"--no-{name}" if field.default is True else f"--{name}"


def check_options(config: Any) -> None:
    """Check every option field of a dataclass instance against its declared type and range."""
    hints = _hints(type(config))
    for field in dataclasses.fields(config):
        spec = spec_of(field)
        value = getattr(config, field.name)
        if spec is None or value is None:
            continue
        name = field.name if not spec.cli else flag_of(field)
        if spec.cli and field.default is True:  # a negative switch: name the option, not the switch
            name = name.replace("--no-", "--", 1)
        _check_type(name, value, hints.get(field.name))
        _check_range(name, value, spec)


def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def base_types(hint: Any) -> set:
    """The plain types an annotation admits (`int | None` -> {int, NoneType})."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return set().union(*(base_types(arg) for arg in typing.get_args(hint)))
    return {typing.get_origin(hint) or hint}


def _check_type(name: str, value: Any, hint: Any) -> None:
    if hint is None:
        return
    allowed = base_types(hint)
    if isinstance(value, bool):
        if bool not in allowed:
            raise OptionError(f"{name} must be {_describe(allowed)}, got {value!r}")
        return
    if (float in allowed and isinstance(value, int)) or (str in allowed and isinstance(value, os.PathLike)):
        return
    if (
        any(t is not typing.Any and isinstance(t, type) and isinstance(value, t) for t in allowed)
        or typing.Any in allowed
        or object in allowed
    ):
        return
    raise OptionError(f"{name} must be {_describe(allowed)}, got {type(value).__name__} {value!r}")


def _describe(allowed: set) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a mapping",
    }
    return " or ".join(names.get(t, getattr(t, "__name__", str(t))) for t in allowed if t is not type(None))


def _check_range(name: str, value: Any, spec: Spec) -> None:
    if spec.choices is not None and value not in spec.choices:
        raise OptionError(f"{name} must be one of {', '.join(spec.choices)}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise OptionError(f"{name} must be a finite number, got {value}")
    if spec.minimum is not None and value < spec.minimum:
        raise OptionError(f"{name} must be >= {_number(spec.minimum)}, got {_number(value)}")
    if spec.above is not None and value <= spec.above:
        raise OptionError(f"{name} must be > {_number(spec.above)}, got {_number(value)}")
    if spec.maximum is not None and value > spec.maximum:
        raise OptionError(f"{name} must be <= {_number(spec.maximum)}, got {_number(value)}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


# ---- options shared by several verbs: worded once ---------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def model_option() -> Any:
    return option(
        None,
        "base model: a local folder, a .gguf file or a Hugging Face hub id (default: the embedded "
        "SmolLM2-135M-Instruct)",
        metavar="MODEL",
        group="model",
    )


def device_option() -> Any:
    return option("auto", "device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N", group="model")


def dtype_option(training: bool = False) -> Any:
    auto = (
        "auto (bfloat16 on a GPU; float32 on a CPU, where bf16 training measured lower on the demo)"
        if training
        else "auto (bfloat16 on a GPU, and on a CPU whose bf16 matrix products measure at least 1.2x faster than "
        "float32 at start-up; else float32)"
    )
    return option(
        "auto",
        f"weights dtype: {auto}, float32, bfloat16 or float16",
        choices=DTYPES,
        group="model",
    )


def threads_option() -> Any:
    return option(None, "torch CPU threads (default: torch's choice)", minimum=1, group="model")


def progress_option() -> Any:
    return option(True, "turn progress bars off", group="output")


def chat_template_option() -> Any:
    return option(
        False,
        "format prompts of the base model, and of adapters saved without a template, with the "
        "model's own chat template (default: the human-assistant template)",
        group="model",
    )


# Defaults of the two anti-repetition options (1.0 / 0: off), used by generate, chat, eval and serve.
DEFAULT_REPETITION_PENALTY, DEFAULT_NO_REPEAT_NGRAM = 1.0, 0
REPETITION_PENALTY_RANGE, NO_REPEAT_NGRAM_MAX = (0.5, 5.0), 64  # also the server's request limits


def repetition_penalty_option(group: str = "sampling", note: str = "") -> Any:
    return option(
        DEFAULT_REPETITION_PENALTY,
        "divide a positive logit of every token the answer already has by this (multiply a negative one; "
        "CTRL's repetition penalty; the prompt does not count); 1 = off" + note,
        minimum=REPETITION_PENALTY_RANGE[0],
        maximum=REPETITION_PENALTY_RANGE[1],
        group=group,
    )


def no_repeat_ngram_option(group: str = "sampling", note: str = "") -> Any:
    return option(
        DEFAULT_NO_REPEAT_NGRAM,
        "never repeat an n-gram of this many tokens within an answer (the prompt does not count); 0 = off" + note,
        minimum=0,
        maximum=NO_REPEAT_NGRAM_MAX,
        group=group,
    )
