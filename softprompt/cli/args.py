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
import typing

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
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)
              and not (getattr(args, f.name) is None and f.default_factory is not dataclasses.MISSING)}
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
    elif not spec.positional and field.default is dataclasses.MISSING \
            and field.default_factory is dataclasses.MISSING:
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
