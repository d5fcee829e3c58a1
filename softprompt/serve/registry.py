"""The adapters a server offers: every adapter sub-folder of one directory, under its folder name.

Names are validated (1-64 of letters, digits, '.', '_', '-', starting with a letter or digit; no '..'), paths are
resolved inside the adapters directory only (no absolute paths, no traversal, no symlink escape: neither a folder
nor a file inside it may be a symbolic link leading outside the adapters folder), and only safetensors are read
(adapter.load_adapter). `base` is reserved for the base model itself.

A folder that cannot be served (whatever load_adapter or the prompt cache raise for it) never blocks the others: a
scan skips it with the reason, and `add` answers a RegistryError (400) with the reason. Messages never show the
adapters folder's absolute path (it is written `<adapters>`).

The soft-prompt KV of each adapter lives in the engine's PromptCache, which the scheduler's worker thread reads
between decode steps. The registry computes a new entry's KV in the calling thread (PromptCache.prepare: the
worker keeps decoding meanwhile) and changes the cache only through `run_on_worker` (Scheduler.run), never directly
from a request thread. Replacing an adapter is atomic: PromptCache.put swaps the entry in one assignment, and a
request pins the entry it was validated against (validation.Prepared.entry), so it is served entirely by the old or
entirely by the new soft prompt; a request admitted before a removal finishes on the removed entry.
Changes (add, remove, rescan) are serialised by one lock.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from softprompt.formats.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Adapter,
    AdapterError,
    check_adapter_name,
    load_adapter,
)
from softprompt.serve.errors import RegistryError, model_missing

BASE_NAME = "base"


def validate_name(name: object) -> str:
    """Return `name` if it is a usable adapter name, else raise RegistryError."""
    try:
        check_adapter_name(name)
    except ValueError as err:
        raise RegistryError(str(err)) from None
    if name == BASE_NAME:
        raise RegistryError(f"the name {BASE_NAME!r} is reserved for the base model", status=409)
    return name


@dataclass
class Entry:
    adapter: Adapter
    path: Path
    stamp: tuple  # (mtime_ns, size) of the weights file, to notice a re-saved adapter on rescan


class AdapterRegistry:
    """Name -> adapter folder, kept in step with the engine's PromptCache."""

    def __init__(
        self,
        base,
        prompt_cache,
        root: str | Path | None = None,
        run_on_worker: Callable[[Callable], object] | None = None,
    ):
        self.base = base
        self.cache = prompt_cache
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise RegistryError(f"adapters folder not found: {root}")
        self.run = run_on_worker or (lambda fn: fn())
        self.entries: dict[str, Entry] = {}
        self.lock = threading.RLock()  # guards `entries` (short holds, lookups)
        self.changes = threading.RLock()  # one change (add / remove / rescan) at a time
        self._roots = sorted(
            {str(self.root), str(Path(root).absolute()), str(root)} if root is not None else (), key=len, reverse=True
        )

    def clean(self, message: str) -> str:
        """A message with the adapters folder's absolute path replaced by `<adapters>`."""
        for root in self._roots:
            if root and root not in (".", "/"):
                message = message.replace(root, "<adapters>")
        return message

    # ---- lookups -------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.entries)

    def has(self, name: str) -> bool:
        return name == BASE_NAME or name in self.entries

    def adapter(self, name: str) -> Adapter | None:
        """The adapter served as `name` (None for the base model); RegistryError(404) when unknown."""
        if name == BASE_NAME:
            return None
        with self.lock:
            entry = self.entries.get(name)
        if entry is None:
            raise RegistryError(model_missing(name), status=404)
        return entry.adapter

    # ---- paths ---------------------------------------------------------------------------------------------
    def resolve(self, name: str, path: str | None = None) -> Path:
        """The folder for `name`: `path` (relative to the adapters folder) or the folder called `name`."""
        if self.root is None:
            raise RegistryError("this server was started without an adapters folder (--adapters)")
        rel = name if path is None else path
        if (
            not isinstance(rel, str)
            or not rel
            or os.path.isabs(rel)
            or rel.startswith(("~", "\\"))
            or "\\" in rel
            or ":" in rel
            or any(part in ("..", ".") for part in rel.split("/"))
            or "\x00" in rel
        ):
            raise RegistryError(
                f"invalid adapter path {rel!r}: give a folder inside the adapters folder, relative "
                "to it (no absolute paths, no '..')"
            )
        full = (self.root / rel).resolve()
        if full != self.root and self.root not in full.parents:
            raise RegistryError(f"invalid adapter path {rel!r}: it leads outside the adapters folder")
        return full

    def check_files(self, folder: Path) -> None:
        """Refuse a folder with a file (or sub-folder) that is a symbolic link leading outside the adapters folder."""
        for entry in os.scandir(folder):
            if not entry.is_symlink():
                continue
            target = Path(os.path.realpath(entry.path))
            if target != self.root and self.root not in target.parents:
                raise RegistryError(
                    f"invalid adapter folder {folder.name!r}: {entry.name} is a symbolic link leading "
                    "outside the adapters folder"
                )

    # ---- changes -------------------------------------------------------------------------------------------
    def add(self, name: str, path: str | None = None, replace: bool = False) -> Adapter:
        """Load the adapter folder and serve it as `name` (its soft-prompt KV is computed once, here). Anything
        wrong with the folder is a RegistryError with the reason (400; 404 when missing, 409 on a name clash)."""
        validate_name(name)
        folder = self.resolve(name, path)
        with self.changes:
            with self.lock:
                if name in self.entries and not replace:
                    raise RegistryError(f"an adapter named {name!r} is already served (pass replace to swap it)", 409)
            if not folder.is_dir():
                raise RegistryError(f"adapter folder not found: {folder.name} (in the adapters folder)", status=404)
            try:
                self.check_files(folder)
                adapter = load_adapter(folder, self.base)
                self._install(name, adapter, folder)
            except RegistryError:
                raise
            except Exception as err:  # noqa: BLE001 (AdapterError, OSError, torch's RuntimeError, ...: a bad folder)
                reason = str(err) if isinstance(err, AdapterError) else f"{type(err).__name__}: {err}"
                raise RegistryError(self.clean(f"cannot serve {folder.name!r}: {reason}")) from err
            return adapter

    def _install(self, name: str, adapter: Adapter, folder: Path) -> None:
        # The KV is computed here, in the caller's thread (never on the worker: a long soft prompt would stall every
        # stream), then the ready entry replaces any entry of that name in one assignment on the worker: there is
        # never a moment when `name` is missing (removing first would fail the requests arriving meanwhile).
        entry = self.cache.prepare(name, adapter)
        self.run(lambda: self.cache.put(name, entry))
        with self.lock:
            self.entries[name] = Entry(adapter, folder, _stamp(folder))

    def remove(self, name: str) -> None:
        """Stop serving `name`. Requests already running keep their copy of its KV and finish normally."""
        if name == BASE_NAME:
            raise RegistryError("the base model cannot be removed", status=409)
        with self.changes:
            with self.lock:
                if name not in self.entries:
                    raise RegistryError(model_missing(name), status=404)
                del self.entries[name]
            self.run(lambda: self.cache.remove(name) if name in self.cache else None)

    def rescan(self) -> dict:
        """Make the served set equal the adapter folders on disk: add new ones, reload re-saved ones, remove
        vanished ones. Folders that cannot be served are listed under `skipped` with the reason (never dropped
        silently); hidden folders (save_adapter's temporary ones start with '.') are ignored. A served adapter whose
        folder cannot be read now (caught mid-write: a missing or corrupt file, or the moment of save_adapter's
        rename) keeps its version loaded before and is listed under `skipped` with the reason."""
        if self.root is None:
            raise RegistryError("this server was started without an adapters folder (--adapters)")
        with self.changes:
            return self._rescan()

    def _serves(self, name: str, folder: Path) -> bool:
        """Whether `name` is served from `folder` now."""
        with self.lock:
            entry = self.entries.get(name)
        try:
            return entry is not None and entry.path == folder.resolve()
        except OSError:
            return False

    def _rescan(self) -> dict:
        added, reloaded, removed, skipped = [], [], [], {}
        found = set()
        try:
            children = sorted(self.root.iterdir())
        except OSError as err:
            raise RegistryError(self.clean(f"cannot read the adapters folder: {err}")) from err
        for child in children:
            name = child.name
            try:
                if name.startswith(".") or not child.is_dir():
                    continue
                if not (child / CONFIG_FILE).is_file():
                    skipped[name] = f"no {CONFIG_FILE} (not an adapter folder)"
                    if self._serves(name, child):  # its folder mid-write: the version loaded before goes on
                        found.add(name)
                        skipped[name] += KEPT
                    continue
                validate_name(name)
                self.resolve(name)
                with self.lock:
                    entry = self.entries.get(name)
                if entry is not None and entry.path == child.resolve() and entry.stamp == _stamp(child):
                    found.add(name)
                    continue
                self.add(name, replace=True)
            except Exception as err:  # noqa: BLE001 (one bad folder never blocks the others)
                skipped[name] = self.clean(
                    str(err) if isinstance(err, (RegistryError, AdapterError)) else f"{type(err).__name__}: {err}"
                )
                if self._serves(name, child):  # re-saved but unreadable (mid-write?): the version loaded before goes on
                    found.add(name)
                    skipped[name] += KEPT
                continue
            found.add(name)
            (reloaded if entry is not None else added).append(name)
        for name in self.names():
            with self.lock:
                entry = self.entries.get(name)
            if entry is None:
                continue
            own_folder = entry.path == self.root / name  # served under its folder name, so rescan manages it
            try:
                vanished = not (entry.path / CONFIG_FILE).is_file()
            except OSError:
                vanished = True
            if (name not in found) if own_folder else vanished:
                if _being_replaced(entry.path):
                    skipped[name] = f"{entry.path.name}: being replaced (save_adapter's rename is under way)" + KEPT
                    continue
                self.remove(name)
                removed.append(name)
        return {"added": added, "reloaded": reloaded, "removed": removed, "skipped": skipped}


KEPT = "; still serving the version loaded before"


def _being_replaced(folder: Path) -> bool:
    """Whether `folder` is missing only for the moment of an atomic replacement (formats/folders.replace_folder
    moves the old folder to `.NAME.old`, then the new one into place)."""
    try:
        return not folder.exists() and folder.with_name(f".{folder.name}.old").is_dir()
    except OSError:
        return False


def _stamp(folder: Path) -> tuple:
    try:
        st = (folder / WEIGHTS_FILE).stat()
        return (st.st_mtime_ns, st.st_size)
    except OSError:
        return (None, None)
