"""`softprompt generate`: answer one instruction (streamed) or a JSONL file of records (mixed adapters, batched).

Python API: `generate(instruction, ...) -> str` and `generate_batch(records, ...) -> list[dict]`.
The prompt template is the one saved with the adapter; for the base model or an adapter without one (e.g. written
by PEFT) it is the human-assistant template ("Human: ...\\n\\nAssistant: "), or the model's chat template on request.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from softprompt.formats.adapter import Adapter, check_adapter_name, load_adapter
from softprompt.data.records import read_jsonl
from softprompt.inference.engine import Engine, GenerationRequest
from softprompt.core.models import FrozenModel, load_base
from softprompt.data.templates import CHAT, Template

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_NEW_TOKENS = 128


def sampling(greedy: bool = False, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None) -> dict:
    """Resolve sampling settings: greedy, or temperature/top-k/top-p with softprompt's defaults."""
    if greedy:
        if temperature not in (None, 0):
            raise ValueError("--greedy and --temperature cannot be combined (greedy means temperature 0)")
        return {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    return {"temperature": DEFAULT_TEMPERATURE if temperature is None else float(temperature),
            "top_k": DEFAULT_TOP_K if top_k is None else int(top_k),
            "top_p": DEFAULT_TOP_P if top_p is None else float(top_p)}


def build_engine(base: FrozenModel, chat_template: bool = False) -> Engine:
    return Engine(base, default_template=Template(CHAT if chat_template else "human-assistant"))


def add_adapter(engine: Engine, adapter: str | Path | Adapter | None) -> str | None:
    """Load --adapter into the engine; its name is its path (record names under --adapters-dir never contain a
    path separator, so the two cannot collide)."""
    if adapter is None:
        return None
    if isinstance(adapter, Adapter):
        name = str(Path(adapter.path).resolve()) if adapter.path else "/adapter"
        engine.add_adapter(name, adapter)
        return name
    name = str(Path(adapter).resolve())
    engine.add_adapter(name, load_adapter(adapter, engine.base))
    return name


def _base(base: FrozenModel | None, model: str | None, device: str | None, dtype: str | None) -> FrozenModel:
    return base if base is not None else load_base(model, device=device, dtype=dtype)


def generate(instruction: str, input: str = "", *, base: FrozenModel | None = None, model: str | None = None,
             adapter: str | Path | Adapter | None = None, chat_template: bool = False, greedy: bool = False,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stop: list[str] | tuple = (),
             truncate: bool = False, device: str | None = None, dtype: str | None = None,
             on_text=None) -> str:
    """Answer one instruction; `on_text(piece)` is called with each newly final piece of text (streaming)."""
    engine = build_engine(_base(base, model, device, dtype), chat_template)
    name = add_adapter(engine, adapter)
    request = GenerationRequest(engine.encode(instruction, input, name), adapter=name,
                                max_new_tokens=max_new_tokens, seed=seed, stop=tuple(stop), truncate=truncate,
                                **sampling(greedy, temperature, top_k, top_p))
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
        try:
            check_adapter_name(record["adapter"])
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
        folder = Path(adapters_dir) / name
        if not folder.is_dir():
            raise ValueError(f"{where}: unknown adapter {name!r}: no folder {folder}")


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
    return records


def generate_batch(records: list[dict], *, base: FrozenModel | None = None, model: str | None = None,
                   adapter: str | Path | Adapter | None = None, adapters_dir: str | Path | None = None,
                   chat_template: bool = False, greedy: bool = False, temperature: float | None = None,
                   top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stop: list[str] | tuple = (),
                   truncate: bool = False, batch_size: int = 8, progress: bool = False,
                   device: str | None = None, dtype: str | None = None) -> list[dict]:
    """Answer many records in mixed-task batches. Each record has 'instruction', optional 'input' and optional
    'adapter' (a folder name under adapters_dir; absent = `adapter`, or the base model). Returns each record plus
    'output', in input order. With a seed, record i samples with seed + i."""
    wheres = [r.get("_where") or f"record {i + 1}" for i, r in enumerate(records)]
    check_batch(records, adapters_dir, wheres)
    engine = build_engine(_base(base, model, device, dtype), chat_template)
    default = add_adapter(engine, adapter)
    settings = sampling(greedy, temperature, top_k, top_p)
    requests = []
    for i, (record, where) in enumerate(zip(records, wheres)):
        name = record.get("adapter")
        if name is None:
            name = default
        elif name not in engine.prompt_cache:
            engine.add_adapter(name, load_adapter(Path(adapters_dir) / name, engine.base))
        try:
            prompt_ids = engine.encode(record["instruction"], record.get("input") or "", name)
            request = GenerationRequest(prompt_ids, adapter=name, max_new_tokens=max_new_tokens,
                                        seed=None if seed is None else seed + i, stop=tuple(stop),
                                        truncate=truncate, id=i, **settings)
            engine.check(request)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        requests.append(request)
    results = engine.generate(requests, batch_size=batch_size, progress=progress)
    return [{**{k: v for k, v in record.items() if k != "_where"}, "output": result.text}
            for record, result in zip(records, results)]


def add_model_args(parser) -> None:
    parser.add_argument("--model", default=None, help="base model: a local folder, a .gguf file or a hub id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = CUDA if "
                        "available)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: bf16 on a "
                        "GPU that supports it, float32 on CPU)")
    parser.add_argument("--chat-template", action="store_true", help="format prompts with the model's chat "
                        "template when the adapter has no saved template (or there is no adapter); default: the "
                        "reference template")


def add_sampling_args(parser) -> None:
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (no sampling)")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"sampling temperature, 0 = greedy (default {DEFAULT_TEMPERATURE})")
    parser.add_argument("--top-k", type=int, default=None, help=f"sample among the K most likely tokens, 0 = off "
                        f"(default {DEFAULT_TOP_K})")
    parser.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass (default {DEFAULT_TOP_P})")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"most tokens to generate per answer (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when this text appears (cut before it); repeatable. EOS always stops")
    parser.add_argument("--truncate", action="store_true", help="drop the left side of prompts that do not fit "
                        "the model's context instead of failing")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate answers with a base model and an optional soft-prompt adapter",
        description="Answer one INSTRUCTION (printed as it is generated) or every record of a --batch JSONL file. "
                    "Rows of a batch may each use a different adapter; they are batched together.")
    parser.add_argument("instruction", nargs="?", help="the instruction to answer (omit with --batch)")
    add_model_args(parser)
    parser.add_argument("--adapter", default=None, help="adapter folder (PEFT format); default: the base model")
    parser.add_argument("--input", default="", help="optional input text that goes with the instruction")
    add_sampling_args(parser)
    parser.add_argument("--batch", default=None, metavar="FILE.jsonl", help="records with 'instruction', optional "
                        "'input' and 'adapter' (a folder name under --adapters-dir)")
    parser.add_argument("--out", default=None, metavar="FILE.jsonl", help="with --batch: write records plus "
                        "'output' here (default: stdout)")
    parser.add_argument("--adapters-dir", default=None, help="with --batch: folder holding the adapters that "
                        "records name")
    parser.add_argument("--batch-size", type=int, default=8, help="with --batch: rows decoded together (default 8)")
    parser.set_defaults(func=run)


def run(args) -> int:
    if (args.batch is None) == (args.instruction is None):
        raise ValueError("give either an INSTRUCTION or --batch FILE.jsonl (not both)")
    settings = sampling(args.greedy, args.temperature, args.top_k, args.top_p)
    if args.batch is None and (args.out or args.adapters_dir):
        raise ValueError("--out and --adapters-dir go with --batch")
    records = read_batch(args.batch) if args.batch else None
    if records is not None:
        check_batch(records, args.adapters_dir)
    if args.adapter is not None:
        load_adapter(args.adapter)  # fail on a missing or malformed folder before loading the model
    base = load_base(args.model, device=args.device, dtype=args.dtype)
    common = dict(base=base, adapter=args.adapter, chat_template=args.chat_template, seed=args.seed,
                  max_new_tokens=args.max_new_tokens, stop=args.stop, truncate=args.truncate, **settings)
    if records is None:
        generate(args.instruction, args.input, on_text=lambda t: print(t, end="", flush=True), **common)
        print(flush=True)
        return 0
    out = generate_batch(records, adapters_dir=args.adapters_dir, batch_size=args.batch_size,
                         progress=sys.stderr.isatty(), **common)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(lines, encoding="utf-8")
        print(f"wrote {len(out)} records to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0
