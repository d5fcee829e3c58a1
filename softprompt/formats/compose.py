"""Composition: several key/value adapters (prefix, cartridge) used as one, their keys/values concatenated along the
sequence, as the Cartridges paper composes cartridges and PEFT 0.21's `compose_cartridge_adapters` writes them.

A composition is named by its parts joined with `+` (`a+b`: a's virtual tokens, then b's); adapter names never
contain `+` (adapter.NAME_PATTERN), so the name is unambiguous. What the composed adapter is:
- its tensor is the parts' `prompt_embeddings` concatenated in order, [N_a + N_b + ..., layers * 2 * token_dim];
- each part keeps its keys exactly as saved, so their rotary positions stay those it was trained at (0..N_i - 1:
  b's keys are not re-rotated to N_a..), and the text after the composition starts at position N_a + N_b + ...;
  this is what PEFT does with a composed folder (the keys are stored already rotated);
- the order of the parts changes nothing the model computes (attention does not see the order of the keys in
  front, and each carries its own rotation), only which part's frozen tokens and template the composition keeps;
- its frozen tokens (`num_frozen_tokens`, the attention sink) are the first part's only, as PEFT records them: later
  parts' own first tokens stay in the tensor as ordinary tokens (a prefix part has none frozen);
- template and label words are the first part's.

Prompt-tuning and P-tuning parts are refused: their virtual tokens are input embeddings that the model runs, so
"composing" them would mean either running [a ; b] together (b's tokens then attend to a's, unlike how either was
trained) or concatenating keys/values each computed alone; neither is what the parts were trained for, and PEFT
composes only cartridges. A composed folder is always written as a CARTRIDGE (a prefix's saved tensor is its
keys/values, so it is one).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from softprompt.core import KV_METHODS, PEFT_TYPES
from softprompt.formats.adapter import (
    Adapter,
    AdapterError,
    check_fits_context,
    load_adapter,
    write_folder,
)

SEPARATOR = "+"
SHAPE_FIELDS = ("num_layers", "token_dim", "num_attention_heads")  # adapter_config.json fields of the model's shape
PREFIX_ONLY = ("prefix_projection", "encoder_hidden_size", "init_weights")  # PREFIX_TUNING fields a cartridge lacks


def is_composition(name: object) -> bool:
    """True for a composed name such as `a+b` (also a malformed one such as `a+`, which split_parts refuses)."""
    return isinstance(name, str) and SEPARATOR in name


def split_parts(name: str) -> list[str]:
    """The part names of a composed name, in order; refuses an empty part (`a+`, `+a`, `a++b`)."""
    parts = name.split(SEPARATOR)
    if not all(parts):
        raise AdapterError(
            f"composition {name!r} has an empty part: join two or more adapter names with '{SEPARATOR}', e.g. 'a+b'"
        )
    return parts


def check_part(name: str, part: str, method: str) -> None:
    """Refuse a part that cannot be composed (not keys/values)."""
    if method not in KV_METHODS:
        raise AdapterError(
            f"composition {name!r}: part {part!r} is a {method} adapter; only key/value adapters "
            f"({', '.join(KV_METHODS)}) compose, by concatenating their keys/values"
        )


def check_same_shape(name: str, first: tuple[str, Adapter], other: tuple[str, Adapter]) -> None:
    """Refuse a part whose keys/values are for a model of another shape than the first part's: another width, or
    (the same width can factor differently) other recorded shape fields."""
    (first_name, a), (other_name, b) = first, other
    found = [("keys/values of width", a.embeddings.shape[1], b.embeddings.shape[1])]
    found += [(f"{key}", a.config.get(key), b.config.get(key)) for key in SHAPE_FIELDS]
    for what, mine, theirs in found:
        if mine is not None and theirs is not None and mine != theirs:
            raise AdapterError(
                f"composition {name!r}: part {other_name!r} has {what} {theirs} but part {first_name!r} has {mine}: "
                "they are for models of different shapes"
            )


def compose(parts: Sequence[Adapter], names: Sequence[str], name: str | None = None) -> Adapter:
    """One adapter whose keys/values are the parts' concatenated in order (see the module docstring); `names` name
    the parts in error messages and in the composed adapter's softprompt.json."""
    name = name or SEPARATOR.join(names)
    if len(parts) < 2:
        raise AdapterError(f"composition {name!r}: compose two or more adapters (joined with '{SEPARATOR}')")
    for part, part_name in zip(parts, names):
        check_part(name, part_name, part.method)
    first = parts[0]
    for part, part_name in zip(parts[1:], names[1:]):
        check_same_shape(name, (names[0], first), (part_name, part))
    tensor = torch.cat([part.embeddings.to(torch.float32) for part in parts])
    frozen = first.config.get("num_frozen_tokens", 1) if first.method == "cartridge" else 0
    config = {k: v for k, v in first.config.items() if k not in PREFIX_ONLY}
    config.update(peft_type=PEFT_TYPES["cartridge"], num_virtual_tokens=tensor.shape[0], num_frozen_tokens=frozen)
    kept = {k: first.extra[k] for k in ("template", "label_words") if k in (first.extra or {})}
    return Adapter(
        embeddings=tensor,
        config=config,
        template=first.template,
        label_words=first.label_words,
        extra={**kept, "composed_of": list(names)},
    )


def load_spec(spec: str | Path, base=None) -> Adapter:
    """The adapter an `--adapter` value names: a folder, or folders joined with `+` (a composition). An existing
    folder whose own name holds a `+` is that folder."""
    if Path(spec).is_dir() or not is_composition(str(spec)):
        return load_adapter(spec, base)
    names = split_parts(str(spec))
    adapter = compose([load_adapter(part, base) for part in names], names, str(spec))
    if base is not None:
        check_fits_context(
            adapter.num_virtual_tokens, getattr(base.model.config, "max_position_embeddings", None), spec
        )
    return adapter


def write_composition(parts: Sequence[str | Path], out: str | Path, base=None) -> Path:
    """Compose the adapter folders `parts` (see `compose`) and write the result as one CARTRIDGE folder that PEFT
    0.21 loads (its tensor equals what PEFT's compose_cartridge_adapters writes for cartridge parts)."""
    names = [str(part) for part in parts]
    adapter = compose([load_adapter(part, base) for part in parts], names)
    return write_folder(Path(out), adapter.embeddings.contiguous(), adapter.config, adapter.extra)
