"""Replacing a folder in one step, for adapter folders and checkpoints alike.

A folder is assembled under a hidden staging name next to its final place, its files and the folder itself are
fsync'ed, and then `replace_folder` renames it into place. A reader sees either the previous complete folder or the
new complete one, never a half-written mix. When the final folder already exists it is first renamed to a hidden
`.NAME.old` sibling (POSIX cannot rename a folder over a non-empty one), then removed once the new one is in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (new or renamed names) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush one file's contents to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def replace_folder(staging: str | Path, final: str | Path) -> Path:
    """Move the complete folder `staging` to `final`, replacing any folder there; return `final`.

    `staging` must be on the same file system as `final` (a sibling). Its files and the folder itself are fsync'ed
    first, and the parent folder after the rename, so after a crash `final` is the old or the new folder, whole.
    """
    staging, final = Path(staging), Path(final)
    for entry in staging.iterdir():
        if entry.is_file() and not entry.is_symlink():
            fsync_file(entry)
    fsync_dir(staging)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(staging, final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_dir(final.parent)
    return final
