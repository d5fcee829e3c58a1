"""Adapter-only checkpoints that survive kill -9, and the training state needed to resume exactly.

Layout of an output folder:
    OUT/adapter_config.json, adapter_model.safetensors, softprompt.json   the final adapter (PEFT format)
    OUT/checkpoints/step-000100/                                          a checkpoint: the adapter files, plus
        training_state.safetensors   optimiser tensors and RNG states (uint8)
        trainer_state.json           step, epoch, optimiser hyper-parameters, early-stopping counters, ...
    OUT/best/                                                              the adapter with the best eval loss

A checkpoint is assembled in a hidden staging folder and renamed into place in one step (folders.replace_folder),
so a reader sees either the previous complete checkpoint or the new complete one. Older checkpoints are removed only
after that. No pickle: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from softprompt.formats.adapter import CONFIG_FILE, EXTRA_FILE, WEIGHTS_FILE, save_adapter
from softprompt.formats.folders import fsync_dir, replace_folder

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "trainer_state.json"
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")


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


def save_checkpoint(out_dir: str | Path, step: int, embeddings: torch.Tensor, base, adapter_kwargs: dict,
                    optimizer: torch.optim.Optimizer, state: dict, keep: int | None = 2) -> Path:
    """Write OUT/checkpoints/step-NNNNNN atomically and prune all but the newest `keep` (None keeps all)."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    staging = root / f".staging-step-{step:06d}"
    if staging.exists():
        shutil.rmtree(staging)
    save_adapter(staging, embeddings, base, **adapter_kwargs)
    tensors, optim_meta = optimizer_state(optimizer)
    tensors.update(rng_tensors())
    save_file(tensors, str(staging / STATE_TENSORS), metadata={"format": "pt"})
    with open(staging / STATE_JSON, "w", encoding="utf-8") as handle:
        json.dump({**state, "step": step, "optimizer": optim_meta}, handle, indent=2)
    replace_folder(staging, final)  # fsyncs the files, swaps out an earlier save of this step (after a resume)
    if keep is not None:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and
             (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint folder, or an output folder whose newest complete checkpoint is used."""
    path = Path(path)
    if (path / STATE_JSON).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"--resume {path}: no checkpoint found (expected {path}/{STATE_JSON} or "
                                f"{path}/{CHECKPOINTS}/step-NNNNNN/)")
    return found[-1]


def load_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors of training_state.safetensors, trainer_state.json)."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS))
    except (OSError, json.JSONDecodeError) as err:
        raise RuntimeError(f"{folder}: unreadable checkpoint: {err}") from err
    return tensors, state


def write_adapter_into(out_dir: str | Path, embeddings: torch.Tensor, base, adapter_kwargs: dict) -> Path:
    """Write the adapter files into an existing folder (which also holds checkpoints), each file atomically."""
    out_dir = Path(out_dir)
    staging = out_dir / ".staging-final"
    if staging.exists():
        shutil.rmtree(staging)
    save_adapter(staging, embeddings, base, **adapter_kwargs)  # fsync'ed by replace_folder
    # Weights last: a folder is only an adapter once its safetensors file is there.
    for name in (EXTRA_FILE, CONFIG_FILE, WEIGHTS_FILE):
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(out_dir)
    return out_dir
