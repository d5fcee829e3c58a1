"""Training records: load JSON / JSONL / CSV / Parquet files, `datasets.save_to_disk` folders or in-memory lists,
map field names, check every record, and turn classification labels into answer words.

Every record keeps where it came from (`file:line` for JSONL, `file: record i` elsewhere) so that any later error
(a prompt that fills max_length, say) names it. Bad records raise `DataError`, or with `skip_bad=True` are counted
and listed in `Records.skipped`: nothing is dropped silently.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

BOM = "\ufeff"  # a UTF-8 byte-order mark, which some editors (Excel, Notepad) put at the start of a file
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a surrogate gets into JSON text read as UTF-8
_LONG_INTEGER = re.compile(r"\d{4301,}")  # longer than Python's default int_max_str_digits (4300)
MAX_DEPTH = 1000  # about the nesting depth past which json.loads runs out of recursion


class DataError(ValueError):
    """A data file or record that cannot be used."""


@dataclass(frozen=True)
class Fields:
    """Which source fields hold the instruction, the (optional) input and the output."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"

    @classmethod
    def parse(cls, spec: str | dict | None) -> "Fields":
        """From 'instruction=sentence,output=label' (or a dict); unnamed roles keep their defaults."""
        if isinstance(spec, Fields):
            return spec
        if not spec:
            return cls()
        pairs = spec if isinstance(spec, dict) else dict(_split_pair(p) for p in spec.split(",") if p.strip())
        unknown = set(pairs) - {"instruction", "input", "output"}
        if unknown:
            raise DataError(f"unknown field role(s) {', '.join(sorted(unknown))}: use instruction=, input=, output=")
        return cls(**pairs)

    @classmethod
    def with_labels(
        cls, spec: str | dict | None, label_field: str | None, label_words: list[str] | None, words_flag: str
    ) -> tuple["Fields", list[str] | None]:
        """Fields plus the label mapping for load_records: with `label_field`, that field's integer label i becomes
        the output word label_words[i]. `words_flag` names the option that gives the words, for the error."""
        fields = cls.parse(spec)
        if not label_field:
            return fields, None
        if not label_words:
            raise ValueError(f"--label-field needs label words: pass {words_flag} (the word for label 0, 1, ...)")
        return cls(fields.instruction, fields.input, label_field), label_words


def _split_pair(part: str) -> tuple[str, str]:
    if "=" not in part:
        raise DataError(f"field mapping {part!r} must look like role=name, e.g. instruction=sentence")
    role, name = part.split("=", 1)
    return role.strip(), name.strip()


@dataclass
class Record:
    """One training example, already mapped to the template's roles."""

    instruction: str
    input: str
    output: str
    where: str  # "file:line" or "file: record i"
    task: int | str | None = None  # the task field's value (load_records' task_field); assign_tasks makes it an id


@dataclass
class Records:
    """Loaded records plus the ones skipped (each as 'where: why')."""

    items: list[Record]
    source: str
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def load_records(
    source,
    fields: Fields | str | dict | None = None,
    label_words: list[str] | None = None,
    skip_bad: bool = False,
    limit: int | None = None,
    task_field: str | None = None,
) -> Records:
    """Load and validate training records.

    source: a path (.json array, .jsonl, .csv, .parquet, or a `save_to_disk` folder) or a list of dicts.
    fields: the source field names of instruction / input / output (default the same names). The input field may
    be missing; instruction and output may not.
    label_words: for classification data — an integer label i in the output field becomes label_words[i], so
    {"sentence": ..., "label": 1} with fields 'instruction=sentence,output=label' and ['negative', 'positive']
    becomes instruction=sentence, output='positive'.
    limit: keep only the first `limit` good records.
    task_field: a field holding each record's task (an integer id >= 0 or a name; see assign_tasks).
    """
    fields = Fields.parse(fields)
    in_memory = isinstance(source, (list, tuple))
    if in_memory:
        name, rows = "<records>", ((f"<records>: record {i}", row) for i, row in enumerate(source))
    else:
        path = Path(source)
        name, rows = str(path), _read_rows(path)
    items, skipped = [], []
    for where, row in rows:
        try:
            record = _to_record(row, where, fields, label_words, check_text=in_memory)
            if task_field is not None:
                record.task = _task_value(row, where, task_field)
            items.append(record)
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append(str(err))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        detail = f" ({len(skipped)} skipped as bad)" if skipped else ""
        raise DataError(f"{name}: no usable records{detail}")
    return Records(items, name, skipped)


def _to_record(row, where: str, fields: Fields, label_words: list[str] | None, check_text: bool = True) -> Record:
    """One row as a Record, or a DataError naming `where`. `check_text`: refuse surrogates in the fields (files are
    checked as they are read: only JSON escapes can put one there)."""
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields, got {type(row).__name__}")
    values = {}
    for role in ("instruction", "input", "output"):
        key = getattr(fields, role)
        value = row.get(key)
        if value is None:
            if role == "input":
                values[role] = ""
                continue
            if key in row:
                raise DataError(f"{where}: field {key!r} is null (the {role} must be a string)")
            present = ", ".join(map(str, row)) or "none"
            raise DataError(f"{where}: missing field {key!r} (the {role}; fields present: {present})")
        if role == "output" and label_words is not None:
            value = _label_word(value, label_words, where, key)
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__} {value!r}")
        values[role] = check_unicode(value, where, f"field {key!r}") if check_text else value
    for role in ("instruction", "output"):
        if not values[role].strip():
            only = " (only whitespace)" if values[role] else ""
            raise DataError(f"{where}: field {getattr(fields, role)!r} is empty{only}")
    return Record(values["instruction"], values["input"], values["output"], where)


def _task_value(row: dict, where: str, key: str) -> int | str:
    """A record's task field: an integer id >= 0 or a non-empty name."""
    if key not in row or row[key] is None:
        present = ", ".join(map(str, row)) or "none"
        raise DataError(f"{where}: missing field {key!r} (the task; fields present: {present})")
    value = row[key]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise DataError(
        f"{where}: field {key!r} must be a task id (an integer >= 0) or a task name (a non-empty string), "
        f"got {type(value).__name__} {value!r}"
    )


def assign_tasks(
    records: list[Record], key: str, num_tasks: int | None = None, names: list[str] | None = None, limit: str = ""
) -> tuple[int, list[str] | None]:
    """Give every record an integer task id (in place) from its task field `key` and return (number of tasks,
    task names or None). Integer values are the ids; names are numbered in order of first appearance after the
    `names` already known (with `num_tasks` given, a name not among `names` is refused). A record whose id is
    >= `num_tasks` is refused in one line naming it, the field and `limit` (what sets the number of tasks)."""
    names = list(names or [])
    named = None
    for record in records:
        value = record.task
        is_name = isinstance(value, str)
        if named is None:
            named = is_name
        if is_name != named:
            kind = "names (strings)" if named else "integer ids"
            raise DataError(
                f"{record.where}: field {key!r} is {value!r}, but earlier records give task {kind}: use one "
                "or the other throughout"
            )
        if is_name:
            if value not in names:
                if num_tasks is not None:
                    known = ", ".join(names) or "none"
                    raise DataError(f"{record.where}: field {key!r} names task {value!r}, unknown (tasks: {known})")
                names.append(value)
            value = names.index(value)
        if num_tasks is not None and value >= num_tasks:
            raise DataError(
                f"{record.where}: field {key!r} is task {value}, out of range: {limit or 'there are'} "
                f"{num_tasks} task(s), ids 0..{num_tasks - 1}"
            )
        record.task = value
    found = max(record.task for record in records) + 1 if records else 0
    return (num_tasks or max(found, len(names), 1)), (names if named else None)


def not_unicode(where: str, detail: str) -> DataError:
    """The one message for text that is not valid Unicode, naming `where` (file:line, <stdin>:line, a flag)."""
    return DataError(f"{where}: not valid Unicode: {detail}")


def _bad_character(what: str, text: str, index: int, raw: bool) -> str:
    """What is wrong with the character of `text` at `index`. `raw`: the text was decoded with surrogateescape
    (argv, stdin), so U+DC80..U+DCFF stand for bytes that are not UTF-8; elsewhere (a JSON \\ud800 escape) a
    surrogate is a lone UTF-16 surrogate."""
    code = ord(text[index])
    if raw and 0xDC80 <= code <= 0xDCFF:
        detail = f"byte 0x{code - 0xDC00:02x} at character {index + 1} is not UTF-8"
    else:
        detail = f"\\u{code:04x} at character {index + 1} is a lone UTF-16 surrogate"
    return f"{what}: {detail}" if what else detail


def check_unicode(text: str, where: str, what: str = "", raw: bool = False) -> str:
    """`text` unchanged, or the `not_unicode` DataError when it holds a surrogate code point (no tokenizer, and no
    UTF-8 encoder, can take one)."""
    bad = _SURROGATE.search(text) if not text.isascii() else None
    if bad is not None:
        raise not_unicode(where, _bad_character(what, text, bad.start(), raw))
    return text


def check_tree(value, where: str) -> None:
    """`check_unicode` on every string (and key) of a parsed JSON value, naming the field by its path."""
    stack = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            check_unicode(item, where, f"field {path!r}" if path else "")
        elif isinstance(item, (dict, list)):
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                name = f"{path}.{key}" if path else str(key)
                if isinstance(key, str):
                    check_unicode(key, where, f"the name of field {name!r}")
                stack.append((child, name))


def parse_words(words, flag: str, minimum: int = 1) -> list[str] | None:
    """A comma-separated string (or a list) of answer words, stripped; each non-empty, no duplicates."""
    if words is None:
        return None
    if isinstance(words, str):
        words = words.split(",")
    words = [w.strip() for w in words]
    if len(words) < minimum or not all(words):
        plural = "s" if minimum > 1 else ""
        raise ValueError(f"{flag} needs at least {minimum} non-empty comma-separated word{plural}, got {words}")
    if len(set(words)) != len(words):
        raise ValueError(f"{flag} has duplicates: {words}")
    return words


def _label_word(value, label_words: list[str], where: str, key: str) -> str:
    if isinstance(value, str):
        if value.strip().lstrip("-").isdigit():
            value = int(value)
        elif value in label_words:
            return value
        else:
            raise DataError(
                f"{where}: label {value!r} in field {key!r} is neither an index nor one of the "
                f"label words {label_words}"
            )
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: label in field {key!r} must be an integer index, got {type(value).__name__}")
    if not 0 <= value < len(label_words):
        raise DataError(
            f"{where}: label {value} in field {key!r} is out of range for {len(label_words)} label words {label_words}"
        )
    return label_words[value]


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "disk"
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("json", "jsonl", "csv", "parquet"):
        return suffix
    if suffix == "ndjson":
        return "jsonl"
    raise DataError(
        f"{path}: unknown data format {path.suffix!r}: use .json, .jsonl, .csv, .parquet or a "
        "datasets save_to_disk folder"
    )


def _read_rows(path: Path) -> Iterator[tuple[str, object]]:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    fmt = detect_format(path)
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt == "json":
        return _read_json(path)
    if fmt == "csv":
        return _read_csv(path)
    if fmt == "parquet":
        return _read_table(path, _parquet_rows(path))
    return _read_table(path, _disk_rows(path))


def read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    """("file:line", parsed object) per non-blank line; a malformed line yields a DataError in place of the object
    (the caller raises it, or counts it as skipped). A UTF-8 byte-order mark is ignored, at the start of the file
    and of any line (files joined with `cat`)."""
    with open(path, encoding="utf-8-sig") as handle:
        try:
            for number, line in enumerate(handle, 1):
                if line.startswith(BOM):
                    line = line[1:]
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = parse_json(line.rstrip("\r\n"), where)
                    if "\\u" in line and _SURROGATE_ESCAPE.search(line):
                        check_tree(row, where)
                except DataError as err:
                    row = err
                yield where, row
        except UnicodeDecodeError as err:
            raise not_utf8(path, err) from err


def _read_json(path: Path) -> Iterator[tuple[str, object]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from err
    data = parse_json(text, str(path), whole_file=True)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records (use .jsonl for one record per line)")
    return _checked_rows(path, data, bool(_SURROGATE_ESCAPE.search(text)))


def _checked_rows(path: Path, data: list, check: bool) -> Iterator[tuple[str, object]]:
    for i, row in enumerate(data):
        where = f"{path}: record {i}"
        try:
            if check:
                check_tree(row, where)
        except DataError as err:
            row = err
        yield where, row


def parse_json(text: str, where: str, whole_file: bool = False):
    """json.loads, with every failure a one-line DataError naming `where` (`file:line`) — malformed JSON, an
    integer too long for Python to convert, nesting too deep for the parser. `whole_file`: `where` is a file name
    and the line is found in `text`."""

    def at(line: int) -> str:
        return f"{where}:{line}" if whole_file else where

    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{at(err.lineno)}: malformed JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise DataError(
            f"{at(_deep_line(text))}: JSON nested too deeply for the parser (at most about {MAX_DEPTH} levels)"
        ) from None
    except ValueError:  # an integer literal past int_max_str_digits
        long = _LONG_INTEGER.search(text)
        line = text.count("\n", 0, long.start()) + 1 if long else 1
        digits = len(long.group()) if long else "too many"
        raise DataError(f"{at(line)}: a number with {digits} digits is too long (at most 4300)") from None


def _deep_line(text: str) -> int:
    """The line where the nesting is deepest (strings skipped)."""
    depth, deepest, line, where = 0, 0, 1, 1
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}\n]', text):
        char = token.group()
        if char == "\n":
            line += 1
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, line
        elif char in "]}":
            depth -= 1
    return where


def _read_csv(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                # line_num is the physical line where the row ends; the header is line 1
                where = f"{path}:{reader.line_num}"
                if None in row:
                    yield where, DataError(f"{where}: more values than the header has columns")
                    continue
                yield where, {k: v for k, v in row.items() if v is not None}
        except UnicodeDecodeError as err:
            raise not_utf8(path, err) from err
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: cannot read CSV: {err}") from err


def not_utf8(path: Path, err: UnicodeDecodeError) -> DataError:
    """The DataError for a file that is not UTF-8, naming the line (and column) of its first bad byte.

    The decoder's own offset is into whatever chunk it was decoding, so the file is scanned again, line by line
    (a newline byte never occurs inside a UTF-8 character, so lines can be decoded one at a time)."""
    try:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as bad:
                    column = len(raw[: bad.start].decode("utf-8")) + 1
                    hint = " (it looks like UTF-16)" if number == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
                    return not_unicode(
                        f"{path}:{number}",
                        f"byte 0x{raw[bad.start]:02x} at column {column} is not UTF-8{hint}; save the file as UTF-8",
                    )
    except OSError:
        pass
    return not_unicode(str(path), f"{err}; save the file as UTF-8")


def _parquet_rows(path: Path) -> Iterable[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises many types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet: {err}") from err


def _disk_rows(path: Path) -> Iterable[dict]:
    from datasets import load_from_disk

    try:
        data = load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError / ValueError variants
        raise DataError(f"{path}: not a datasets save_to_disk folder: {err}") from err
    if hasattr(data, "keys") and not hasattr(data, "column_names"):  # DatasetDict
        if "train" not in data:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(data)})")
        data = data["train"]
    return data


def _read_table(path: Path, rows: Iterable[dict]) -> Iterator[tuple[str, object]]:
    return ((f"{path}: record {i}", row) for i, row in enumerate(rows))


def split_holdout(records: Records, fraction: float, seed: int) -> tuple[Records, Records]:
    """Hold out a random `fraction` of the records (at least one) as an evaluation split."""
    if not 0 < fraction < 1:
        raise DataError(f"eval fraction must be between 0 and 1, got {fraction}")
    n_eval = max(1, round(len(records.items) * fraction))
    if n_eval >= len(records.items):
        raise DataError(
            f"{records.source}: {len(records.items)} records are too few to hold out {fraction:.0%} for evaluation"
        )
    order = list(range(len(records.items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records.items) if i not in held]
    evals = [r for i, r in enumerate(records.items) if i in held]
    return Records(train, records.source, records.skipped), Records(evals, f"{records.source} (held out)")
