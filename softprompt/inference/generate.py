"""`softprompt generate`: answer one instruction (streamed) or a JSONL file of records (mixed adapters, batched).

Python API: `generate(options, instruction, ...) -> str` and `generate_batch(records, options) -> list[dict]`, with
a GenerationOptions / BatchOptions (the keyword forms are `softprompt.generate` and `softprompt.generate_batch`);
with `logprobs=N` each record of `generate_batch` also gets 'logprobs': per generated token its text, id,
log-probability and the N most likely tokens there (`logprobs_json`).
The prompt template is the one saved with the adapter; for the base model or an adapter without one (e.g. written
by PEFT) it is the human-assistant template ("Human: ...\\n\\nAssistant: "), or the model's chat template on request.
"""

from __future__ import annotations

from pathlib import Path

from softprompt.core.models import FrozenModel, load_base
from softprompt.data.records import read_jsonl
from softprompt.data.templates import CHAT, HUMAN_ASSISTANT, Template
from softprompt.formats.adapter import Adapter, AdapterError, check_adapter_name, load_adapter, split_task, with_task
from softprompt.formats.compose import SEPARATOR, is_composition, load_spec, split_parts
from softprompt.inference.batch import GenerationRequest
from softprompt.inference.config import BatchOptions, GenerationOptions
from softprompt.inference.engine import Engine
from softprompt.inference.scoring import TokenLogprobs


def build_engine(base: FrozenModel, chat_template: bool = False) -> Engine:
    return Engine(base, default_template=Template(CHAT if chat_template else HUMAN_ASSISTANT))


def add_adapter(engine: Engine, adapter: str | Path | Adapter | None, task: int | None = None) -> str | None:
    """Load --adapter into the engine; its name is its path (record names under --adapters-dir never contain a
    path separator, so the two cannot collide); `a+b` (folders joined with '+') composes them (formats/compose.py).
    A multitask adapter needs `task` (--task); the name returned is then `PATH@TASK`."""
    if adapter is None:
        return None
    if isinstance(adapter, Adapter):
        name, loaded = (str(Path(adapter.path).resolve()) if adapter.path else "/adapter"), adapter
    else:
        loaded = load_spec(adapter, engine.base)  # a folder, or folders joined with '+' (a composition)
        parts = loaded.extra.get("composed_of") if loaded.path is None else None
        name = SEPARATOR.join(str(Path(p).resolve()) for p in parts) if parts else str(Path(adapter).resolve())
    where = f"--adapter {adapter.path if isinstance(adapter, Adapter) else adapter}"
    if loaded.needs_task and task is None:
        raise AdapterError(f"{where}: a multitask adapter needs --task (one of its tasks, 0..{loaded.num_tasks - 1})")
    if task is not None:
        loaded.for_task(task, where=where)  # refused now, naming the flag: not multitask, or no such task
    engine.add_adapter(name, loaded)
    return with_task(name, task)


def _base(base: FrozenModel | None, options: GenerationOptions) -> FrozenModel:
    if base is not None:
        return base
    if isinstance(options.model, FrozenModel):
        return options.model
    return load_base(options.model, device=options.device, dtype=options.dtype)


def generate(
    opts: GenerationOptions, instruction: str, input: str = "", *, base: FrozenModel | None = None, on_text=None
) -> str:
    """Answer one instruction with `opts` (the adapter, the model, how tokens are chosen). `on_text(piece)` is called
    with each newly final piece of text (streaming)."""
    engine = build_engine(_base(base, opts), opts.chat_template)
    name = add_adapter(engine, opts.adapter, opts.task)
    request = GenerationRequest(
        engine.encode(instruction, input, name),
        adapter=name,
        max_new_tokens=opts.max_new_tokens,
        seed=opts.seed,
        stop=tuple(opts.stop),
        truncate=opts.truncate,
        **opts.sampling(),
    )
    pieces = []
    for event in engine.stream(request):
        if event.text:
            pieces.append(event.text)
            if on_text is not None:
                on_text(event.text)
    return "".join(pieces)


def check_record(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'instruction', got {type(record).__name__}")
    if not isinstance(record.get("instruction"), str):
        raise ValueError(f"{where}: missing 'instruction' (a string)")
    if "input" in record and record["input"] is not None and not isinstance(record["input"], str):
        raise ValueError(f"{where}: 'input' must be a string")
    if record.get("adapter") is not None:
        try:  # a name, names joined with '+' (a composition of those adapters), or NAME@TASK
            parts = split_parts(record["adapter"]) if is_composition(record["adapter"]) else [record["adapter"]]
            names = [split_task(part)[0] for part in parts]
        except AdapterError as err:
            raise ValueError(f"{where}: field 'adapter': {err}") from None
        try:
            for name in names:
                check_adapter_name(name)
        except ValueError as err:
            raise ValueError(f"{where}: {err}; it names a folder under --adapters-dir") from None
    return record


def check_batch(records: list[dict], adapters_dir: str | Path | None, wheres: list[str] | None = None) -> None:
    """Check every record and that each adapter it names is a folder under adapters_dir (before any model loads)."""
    wheres = wheres or [r.get("_where") or f"record {i + 1}" for i, r in enumerate(records)]
    for record, where in zip(records, wheres):
        check_record(record, where)
        name = record.get("adapter")
        if name is None:
            continue
        if adapters_dir is None:
            raise ValueError(f"{where}: names adapter {name!r} but no --adapters-dir was given")
        for part in split_parts(name):
            folder = Path(adapters_dir) / split_task(part)[0]
            if not folder.is_dir():
                raise ValueError(f"{where}: unknown adapter {part!r}: no folder {folder}")


def read_batch(path: str | Path) -> list[dict]:
    """Read a JSONL batch file; every line must be a JSON object with 'instruction' (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batch file not found: {path}")
    records = []
    for where, record in read_jsonl(path):
        if isinstance(record, Exception):
            raise record
        check_record(record, where)
        record["_where"] = where
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records (the file is empty or holds only blank lines)")
    return records


def generate_batch(records: list[dict], opts: BatchOptions, *, base: FrozenModel | None = None) -> list[dict]:
    """Answer many records in mixed-task batches. Each record has 'instruction', optional 'input' and optional
    'adapter' (a folder name under `opts.adapters_dir`; absent = `opts.adapter`, or the base model). Returns each
    record plus 'output' (and 'logprobs' when asked), in input order. With a seed, record i samples with seed + i."""
    wheres = [r.get("_where") or f"record {i + 1}" for i, r in enumerate(records)]
    check_batch(records, opts.adapters_dir, wheres)
    engine = build_engine(_base(base, opts), opts.chat_template)
    default = add_adapter(engine, opts.adapter, opts.task)
    requests = []
    for i, (record, where) in enumerate(zip(records, wheres)):
        name = record.get("adapter")
        if name is None:
            name = default
        else:  # each part of a composition `a+b` is loaded under its name; the engine composes them
            for part in split_parts(name):
                folder = split_task(part)[0]  # NAME@TASK: the folder NAME, loaded once for all its tasks
                if folder not in engine.prompt_cache:
                    engine.add_adapter(folder, load_adapter(Path(opts.adapters_dir) / folder, engine.base))
        try:
            prompt_ids = engine.encode(record["instruction"], record.get("input") or "", name)
            request = GenerationRequest(
                prompt_ids,
                adapter=name,
                max_new_tokens=opts.max_new_tokens,
                seed=None if opts.seed is None else opts.seed + i,
                stop=tuple(opts.stop),
                truncate=opts.truncate,
                id=i,
                logprobs=opts.logprobs,
                **opts.sampling(),
            )
            engine.check(request)
        except AdapterError as err:  # the adapter the record names cannot serve it (a multitask one: which task)
            field = " field 'adapter':" if record.get("adapter") is not None else ""
            raise ValueError(f"{where}:{field} {err}") from err
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        requests.append(request)
    results = engine.generate(requests, batch_size=opts.batch_size, progress=opts.progress)
    out = []
    for record, result in zip(records, results):
        answer = {**{k: v for k, v in record.items() if k != "_where"}, "output": result.text}
        if result.logprobs is not None:
            answer["logprobs"] = logprobs_json(result.logprobs, engine.base.tokenizer)
        out.append(answer)
    return out


def logprobs_json(entries: list[TokenLogprobs], tokenizer) -> list[dict]:
    """Per generated token: its text, id, log-probability (of the model's raw distribution) and the most likely
    tokens at its place, most likely first."""

    def token(token_id: int, logprob: float | None) -> dict:
        return {"token": tokenizer.decode([token_id]), "id": token_id, "logprob": logprob}

    return [{**token(e.token_id, e.logprob), "top_logprobs": [token(i, lp) for i, lp in e.top or []]} for e in entries]
