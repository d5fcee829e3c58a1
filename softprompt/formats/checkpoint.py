"""Adapter-only checkpoints that survive kill -9, and the training state needed to resume exactly: how the files are
written, verified and found. What goes in them, and reading them back for a resume, is run_folder.RunFolder's.

Layout of an output folder:
    OUT/adapter_config.json, adapter_model.safetensors, softprompt.json   the final adapter (PEFT format)
    OUT/checkpoints/step-000100/                                          a checkpoint: the adapter files, plus
        training_state.safetensors   optimiser tensors and RNG states (uint8)
        trainer_state.json           step, epoch, optimiser hyper-parameters, early-stopping counters, ...
        checksums.json               sha256 and size of every other file, written last
    OUT/best/                                                              the adapter with the best eval loss

A checkpoint is assembled in a hidden staging folder and renamed into place in one step (folders.replace_folder),
so a reader sees either the previous complete checkpoint or the new complete one. Older checkpoints are removed only
after that. No pickle: tensors go to safetensors, everything else to JSON. A process killed while writing leaves its
hidden staging folders behind; `clean_staging(OUT)`, run when training starts or resumes, removes them (and puts
back a folder that was moved aside to be replaced, if its replacement never arrived).

The checksums catch what the rename cannot: a file damaged after it was written (a full disk, a bad copy, a
truncated sync). `resolve_resume(OUT)` takes the newest checkpoint that verifies, naming on stderr each one it skips;
a named checkpoint that does not verify is refused with a `CheckpointError` naming the file. Checkpoints written
before checksums existed (no checksums.json) are still used: they are checked only by reading them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt.formats.adapter import (
    CONFIG_FILE,
    EXTRA_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterMetadata,
    load_adapter,
    save_adapter,
)
from softprompt.formats.folders import fsync_dir, replace_folder

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "trainer_state.json"
MANIFEST = "checksums.json"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST_FORMAT = 1
REQUIRED = (STATE_JSON, STATE_TENSORS, CONFIG_FILE, WEIGHTS_FILE)  # files every checkpoint has
FINAL_STAGING = ".staging-final"
# The hidden folders this module and save_adapter (tempfile.mkdtemp names: ".NAME-" + 8 of [a-z0-9_]) write while
# assembling: OUT/checkpoints/.staging-step-N and its ..staging-step-N-xxxxxxxx, OUT/.staging-final and its
# ..staging-final-xxxxxxxx, OUT/.best-xxxxxxxx.
STAGING = {
    CHECKPOINTS: re.compile(r"^\.(?:\.)?staging-step-\d+(?:-[a-z0-9_]{8})?$"),
    ".": re.compile(r"^(?:\.(?:\.)?staging-final(?:-[a-z0-9_]{8})?|\.best-[a-z0-9_]{8})$"),
}
MOVED_ASIDE = {CHECKPOINTS: re.compile(r"^\.(step-\d+)\.old$"), ".": re.compile(r"^\.(best)\.old$")}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: a file missing, unreadable, or not matching its checksum."""


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state_dict into tensors (for safetensors) and JSON-able values."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["state"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{i}"] = s
    return states


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    embeddings: torch.Tensor | dict[str, torch.Tensor],
    base,
    metadata: AdapterMetadata,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int | None = 2,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write OUT/checkpoints/step-NNNNNN atomically, with checksums, and prune all but the newest `keep` (None
    keeps all): the adapter (`embeddings` saved with `metadata`), the optimiser and RNG states, `state` (more
    trainer_state.json entries). `tensors`: more training-state tensors to keep (e.g. a prompt encoder's weights,
    which the adapter, holding only the encoder's output, does not). run_folder.RunFolder decides what goes in."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    staging = root / f".staging-step-{step:06d}"
    if staging.exists():
        shutil.rmtree(staging)
    save_adapter(staging, embeddings, base, metadata=metadata)
    extra = dict(tensors or {})
    tensors, optim_meta = optimizer_state(optimizer)
    tensors.update(rng_tensors())
    tensors.update(extra)
    save_file(tensors, str(staging / STATE_TENSORS), metadata={"format": "pt"})
    with open(staging / STATE_JSON, "w", encoding="utf-8") as handle:
        json.dump({**state, "step": step, "optimizer": optim_meta}, handle, indent=2)
    write_manifest(staging)  # last: it covers every other file
    replace_folder(staging, final)
    if keep is not None:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def clean_staging(out_dir: str | Path) -> list[Path]:
    """Remove the staging folders a killed run left in OUT and OUT/checkpoints (only the hidden names this module
    writes, only real folders, never a symlink); a folder moved aside to be replaced (".step-N.old", ".best.old")
    is put back when its replacement is missing, else removed. Returns what was removed or put back."""
    out_dir, changed = Path(out_dir), []
    for sub in (CHECKPOINTS, "."):
        folder = out_dir / sub
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink() or not entry.is_dir():
                continue
            aside = MOVED_ASIDE[sub].match(entry.name)
            if aside and not (folder / aside.group(1)).exists():
                os.replace(entry, folder / aside.group(1))  # the replacement never arrived: this one is current
            elif aside or STAGING[sub].match(entry.name):
                shutil.rmtree(entry)
            else:
                continue
            changed.append(entry)
    return changed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Write checksums.json: the sha256 and size of every other file in `folder`."""
    folder = Path(folder)
    files = {
        p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    path = folder / MANIFEST
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}, handle, indent=2)
        handle.write("\n")
    return path


def verify_checkpoint(folder: str | Path) -> bool:
    """Check a checkpoint folder against its checksums.json. True when it verifies, False when it has no manifest
    (written before checksums existed: usable, but only reading it can tell); raises CheckpointError naming every
    bad file otherwise."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        missing = [f"{name} is missing" for name in (STATE_JSON, STATE_TENSORS) if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: {'; '.join(missing)}")
        return False
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))
        files = listed["files"]
        if (
            listed.get("algorithm") != "sha256"
            or not isinstance(files, dict)
            or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values())
        ):
            raise ValueError("not a sha256 manifest")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{folder}: {MANIFEST} is unreadable ({err}), so the checkpoint cannot be verified"
        ) from err
    problems = []
    for name in REQUIRED:
        if name not in files:
            problems.append(
                f"{name} is missing" if not (folder / name).is_file() else f"{name} is not listed in {MANIFEST}"
            )
    for name, entry in files.items():
        path = folder / name
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            problems.append(f"{MANIFEST} lists an invalid file name {name!r}")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif isinstance(entry.get("bytes"), int) and path.stat().st_size != entry["bytes"]:
            problems.append(
                f"{name} does not match its checksum ({path.stat().st_size} bytes, expected {entry['bytes']})"
            )
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{name} does not match its checksum")
    if problems:
        raise CheckpointError(f"{folder}: {'; '.join(problems)}")
    return True


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first (not verified: see resolve_resume)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file()
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint folder, or an output folder whose newest checkpoint that verifies is used.

    A named checkpoint folder that does not verify raises CheckpointError. In an output folder, each newer
    checkpoint that does not verify is skipped with one line on stderr; CheckpointError when none is left.
    """
    path = Path(path)
    named = (
        (path / STATE_JSON).is_file()
        or (path / MANIFEST).is_file()
        or (path.is_dir() and STEP_DIR.match(path.name) and path.parent.name == CHECKPOINTS)
    )
    if named:
        check_checkpoint(path)
        return path
    root = path / CHECKPOINTS
    candidates = (
        sorted(
            ((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()), reverse=True
        )
        if root.is_dir()
        else []
    )
    if not candidates:
        raise FileNotFoundError(
            f"--resume {path}: no checkpoint found (expected {path}/{STATE_JSON} or {path}/{CHECKPOINTS}/step-NNNNNN/)"
        )
    skipped = []
    for _, folder in candidates:
        try:
            check_checkpoint(folder)
        except CheckpointError as err:
            print(f"softprompt: skipping checkpoint {err}", file=sys.stderr, flush=True)
            skipped.append(str(err))
            continue
        return folder
    raise CheckpointError(
        f"--resume {path}: no usable checkpoint ({len(skipped)} found, none verifies; the newest: {skipped[0]})"
    )


def check_checkpoint(folder: str | Path) -> None:
    """Raise CheckpointError naming the bad file unless `folder` is a checkpoint that can be resumed from: it
    verifies against its checksums, or (written before checksums existed) its files can be read."""
    folder = Path(folder)
    if verify_checkpoint(folder):
        return
    load_checkpoint(folder, verify=False)
    try:
        load_adapter(folder)
    except AdapterError as err:
        raise CheckpointError(str(err)) from err


def load_checkpoint(folder: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors of training_state.safetensors, trainer_state.json); CheckpointError naming the file when the
    folder does not match its checksums or a file cannot be read."""
    folder = Path(folder)
    if verify:
        verify_checkpoint(folder)
    state_json, state_tensors = folder / STATE_JSON, folder / STATE_TENSORS
    try:
        state = json.loads(state_json.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{state_json}: missing (not a checkpoint folder)") from err
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{state_json}: unreadable checkpoint state: {err}") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "optimizer" not in state:
        raise CheckpointError(f"{state_json}: not a softprompt trainer state (no step or optimizer)")
    try:
        tensors = load_file(str(state_tensors))
    except FileNotFoundError as err:
        raise CheckpointError(f"{state_tensors}: missing (not a checkpoint folder)") from err
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{state_tensors}: corrupt or truncated safetensors file: {err}") from err
    return tensors, state


def write_adapter_into(
    out_dir: str | Path, embeddings: torch.Tensor | dict[str, torch.Tensor], base, metadata: AdapterMetadata
) -> Path:
    """Write the adapter files into an existing folder (which also holds checkpoints), each file atomically."""
    out_dir = Path(out_dir)
    staging = out_dir / FINAL_STAGING
    if staging.exists():
        shutil.rmtree(staging)
    save_adapter(staging, embeddings, base, metadata=metadata)  # fsync'ed by replace_folder
    # Weights last: a folder is only an adapter once its safetensors file is there.
    for name in (EXTRA_FILE, CONFIG_FILE, WEIGHTS_FILE):
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(out_dir)
    return out_dir
