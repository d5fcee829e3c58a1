"""A self-study corpus (`softprompt train --method cartridge --corpus FILE`): one plain-text or Markdown file, read
and checked, then cut into chunks of tokens that each fit the model's context with a conversation after them.

Nothing here runs a model: training/selfstudy.py writes the conversations about each chunk.
"""

from __future__ import annotations

from pathlib import Path

from softprompt.data.records import DataError, not_utf8

CORPUS_FLAG = "--corpus"


def read_corpus(path: str | Path, flag: str = CORPUS_FLAG) -> str:
    """The text of a corpus file, or a DataError in one line naming the file: missing or unreadable, binary (it
    holds NUL bytes), not UTF-8 (the line and column of the first bad byte), or empty (nothing but whitespace)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{flag} {path}: cannot read: {err.strerror or err}") from err
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(
            f"{flag} {path}: a binary file, not text (a NUL byte at byte {nul}); give a plain-text or Markdown file"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from err
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"{flag} {path}: the file is empty")
    return text


def chunk_ids(ids: list[int], size: int) -> list[list[int]]:
    """The corpus's token ids cut into consecutive chunks of at most `size` tokens (only the last may be shorter)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [ids[i : i + size] for i in range(0, len(ids), size)]
