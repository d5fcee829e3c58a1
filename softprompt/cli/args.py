"""Flags from config dataclasses: each option is declared once, as a field (softprompt.options.option), and this
module turns fields into argparse flags and parsed arguments back into the config.

- a field without a default is a required flag (or a positional argument with `positional=True`);
- a bool defaulting to False is a switch (`--skip-bad`), one defaulting to True a negative switch (`--no-progress`);
- `int` / `float` fields parse as numbers; list fields (`many=True`) take several values;
- fields declared `cli=False` are Python-API only.
Values are checked by the config itself (check_options), so a bad value gives the same one-line error as in Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

from softprompt.data.records import check_unicode
from softprompt.options import base_types, flag_of, spec_of

CLI_ONLY_GROUP = "output"


def add_options(parser: argparse.ArgumentParser, config_cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per option field of `config_cls`, grouped by the field's declared group."""
    hints = typing.get_type_hints(config_cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(config_cls):
        spec = spec_of(field)
        if spec is None or not spec.cli or field.name in skip:
            continue
        group = groups.get(spec.group) or groups.setdefault(spec.group, parser.add_argument_group(spec.group))
        group.add_argument(*_names(field), **_argparse_kwargs(field, hints[field.name]))


def config_from_args(config_cls: type, args: argparse.Namespace, **extra):
    """Build `config_cls` from parsed arguments (fields the parser does not have keep their defaults)."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config_cls)
        if hasattr(args, f.name)
        and not (getattr(args, f.name) is None and f.default_factory is not dataclasses.MISSING)
    }
    return config_cls(**{**values, **extra})


def values_of(config, config_cls: type) -> dict:
    """The values of `config_cls`'s fields taken from `config` (e.g. a verb's config narrowed to a library call's
    options)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config_cls)}


def _names(field: dataclasses.Field) -> list[str]:
    return [field.name] if spec_of(field).positional else [flag_of(field)]


def _argparse_kwargs(field: dataclasses.Field, hint) -> dict:
    spec = spec_of(field)
    kwargs: dict = {"help": _help(field)}
    if not spec.positional:
        kwargs["dest"] = field.name
    allowed = base_types(hint)
    if spec.metavar or not (spec.positional or spec.choices):
        kwargs["metavar"] = spec.metavar or _metavar(allowed, field.name)
    if bool in allowed:
        kwargs["action"] = "store_false" if field.default is True else "store_true"
        kwargs.pop("metavar", None)
        return kwargs
    if spec.choices:
        kwargs["choices"] = spec.choices
    kwargs["type"] = int if allowed <= {int, type(None)} else float if allowed <= {float, int, type(None)} else str
    if spec.many == "+":
        kwargs["nargs"], kwargs["action"] = "+", "extend"
    elif spec.many:
        kwargs["action"] = "append"
    if field.default is not dataclasses.MISSING:
        kwargs["default"] = field.default
    elif field.default_factory is not dataclasses.MISSING:
        kwargs["default"] = None  # argparse would append to a shared default list; the config makes a fresh one
    if spec.positional and field.default is not dataclasses.MISSING:
        kwargs["nargs"] = "?"
    elif not spec.positional and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        kwargs["required"] = True
    return kwargs


def _metavar(allowed: set, name: str) -> str:
    if allowed <= {int, type(None)}:
        return "N"
    if allowed <= {float, int, type(None)}:
        return "X"
    return name.upper()


def _help(field: dataclasses.Field) -> str:
    text = spec_of(field).help.replace("%", "%%")
    default = field.default
    if default not in (dataclasses.MISSING, None, False, True, "", ()) and "default" not in text:
        text += f" (default: {default})"
    return text


def check_argv_text(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an argument that is not valid Unicode, naming its flag (or positional name). Python decodes argv with
    surrogateescape, so bytes that are not UTF-8 (`generate $'caf\\xff'`) arrive as surrogates, which no tokenizer
    and no UTF-8 writer can take."""
    names = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and args.verb in action.choices:
            names = {
                a.dest: a.option_strings[-1] if a.option_strings else (a.metavar or a.dest).upper()
                for a in action.choices[args.verb]._actions
            }
    for dest, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                check_unicode(text, names.get(dest, dest), raw=True)


def check_output(path: str | None, flag: str, inputs: dict[str, str | None] | None = None) -> None:
    """Refuse, before any work starts, an output file that cannot be written (its folder path runs into a file, or
    is not writable) or that is one of the command's inputs (`inputs`: flag -> path), which writing would
    overwrite."""
    if not path:
        return
    target = Path(path)
    for other_flag, other in (inputs or {}).items():
        if other and _same_file(target, Path(other)):
            raise ValueError(
                f"{flag} {path} is the {other_flag} file: writing it would overwrite the input; choose another {flag}"
            )
    if target.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, not a file")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: cannot write there: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {path}: cannot write there: permission denied")


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()
