"""Adapter folders in PEFT's prompt-learning formats, readable by `peft.PeftModel.from_pretrained` and vice versa.

A folder holds:
- `adapter_config.json` — the keys PEFT writes (peft_type PROMPT_TUNING, PREFIX_TUNING, P_TUNING or CARTRIDGE, task_type
  CAUSAL_LM, ...; see methods.py for each method's fields);
- `adapter_model.safetensors` — one fp32 tensor `prompt_embeddings`: [num_virtual_tokens, hidden] input embeddings
  (prompt tuning, P-tuning) or [num_virtual_tokens, num_layers * 2 * token_dim] keys/values (prefix tuning,
  cartridges); a multitask adapter (MULTITASK_PROMPT_TUNING) adds its task factors `prefix_task_cols` [num_tasks,
  N, num_ranks] and `prefix_task_rows` [num_tasks, num_ranks, hidden], and is used one task at a time
  (`NAME@TASK`, `Adapter.for_task`);
- `softprompt.json` (optional, softprompt's own) — template, label words, training summary.
Only safetensors are read: never pickle.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt.core import KV_METHODS
from softprompt.core.forward import Virtual
from softprompt.core.prompt import Cartridge, MultitaskPrompt, PrefixEncoder, SoftPrompt, check_factors, task_prompt
from softprompt.data.templates import Template, TemplateError
from softprompt.formats.folders import replace_folder
from softprompt.formats.methods import METHOD_OF, base_width, config_fields, expected_width, method_of, misfit

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "softprompt.json"
TENSOR_KEY = "prompt_embeddings"
FACTOR_KEYS = ("prefix_task_cols", "prefix_task_rows")  # a multitask adapter's task factors (PEFT's keys)
TASK_SEPARATOR = "@"  # NAME@TASK: task TASK of the multitask adapter NAME (adapter names never hold '@')
PEFT_VERSION = "0.21.2"

# The largest |value| a loaded soft prompt may hold. A prompt lives in the base model's input-embedding space, where
# values are O(1): token embeddings are initialised with std ~0.02 and trained rows stay well under 1; prompts
# initialised from vocabulary rows and trained at the usual learning rates (0.01-0.3) stay within a few units. (Models
# that scale embeddings, e.g. Gemma by sqrt(hidden) ~ 50-60, do so inside the forward pass, after the prompt is fed
# in.) 1e4 is three to four orders of magnitude above any real prompt, so nothing trained is refused, and still well
# inside float16's range (max 65504), so a prompt that passes stays finite when cast to a half-precision base model.
# A prefix adapter (keys/values inside the layers) is held to the same bound: real keys and values are activations
# of a normalised residual stream, at most tens or a few hundreds in magnitude.
# Anything larger is a corrupt or hand-made file, which would only produce garbage (or inf after the first norm).
MAX_ABS_VALUE = 1e4

# A letter or digit, then letters, digits, '.', '_', '-' with no '..'; written without look-arounds so that the
# server's published JSON Schema (serve/protocol.py) states the same rule.
NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"
NAME_MAX = 64
SIZE_FIELDS = ("num_layers", "token_dim")  # sizes in adapter_config.json that shape the tensor (two negatives
# would multiply to a plausible prefix width)
NAME_RE = re.compile(NAME_PATTERN)


def check_adapter_name(name: object) -> str:
    """Return `name` if it can name an adapter (a folder under an adapters directory, a served model name), else
    raise ValueError. One rule for batch files and the server."""
    if not isinstance(name, str) or len(name) > NAME_MAX or not NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no '/', no '..', not an absolute path)"
        )
    return name


class AdapterError(ValueError):
    """An adapter folder that cannot be used."""


def split_task(name: str) -> tuple[str, int | None]:
    """(adapter name, task id) of `NAME@TASK`; (name, None) for a name without '@'. The task must be a
    non-negative integer written in decimal digits."""
    if not isinstance(name, str) or TASK_SEPARATOR not in name:
        return name, None
    adapter, _, task = name.rpartition(TASK_SEPARATOR)
    if not adapter or not task.isascii() or not task.isdigit():
        raise AdapterError(
            f"{name!r}: the task after '{TASK_SEPARATOR}' must be an integer task id, e.g. "
            f"'{adapter or 'NAME'}{TASK_SEPARATOR}0'"
        )
    return adapter, int(task)


def with_task(name: str | None, task: int | None) -> str | None:
    """`name@task` (the name of one task of a multitask adapter), or `name` when task is None."""
    return name if task is None or name is None else f"{name}{TASK_SEPARATOR}{task}"


@dataclass
class Adapter:
    """A loaded soft prompt (of any method) and what was saved with it."""

    embeddings: torch.Tensor  # fp32 PEFT prompt_embeddings: [N, hidden], or [N, layers * 2 * token_dim] for a prefix
    config: dict
    template: Template = field(default_factory=Template)
    label_words: list[str] | None = None
    extra: dict = field(default_factory=dict)
    path: str | None = None
    factors: dict[str, torch.Tensor] | None = None  # a multitask adapter's FACTOR_KEYS tensors
    task: int | None = None  # for_task's: which task's prompt `embeddings` is

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def method(self) -> str:
        """prompt, prefix, ptuning, cartridge or multitask (from the config's peft_type)."""
        return method_of(self.config) or "prompt"

    @property
    def num_tasks(self) -> int | None:
        """A multitask adapter's number of tasks (None for other methods)."""
        return None if self.factors is None else self.factors[FACTOR_KEYS[0]].shape[0]

    @property
    def needs_task(self) -> bool:
        """True for a multitask adapter not yet narrowed to one task (for_task)."""
        return self.method == "multitask" and self.task is None

    def for_task(self, task: int, where: object = None) -> Adapter:
        """Task `task`'s prompt of a multitask adapter, as an adapter of [N, hidden] input embeddings (computed once,
        fp32); one line naming `where` (or the folder) when this is not a multitask adapter or the task is unknown."""
        where = where or self.path or "adapter"
        if self.method != "multitask" or self.factors is None:
            raise AdapterError(
                f"{where}: a task ('{TASK_SEPARATOR}{task}') is only for multitask adapters; this one is "
                f"--method {self.method}"
            )
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise AdapterError(f"{where}: task {task!r} is out of range: the adapter has tasks 0..{self.num_tasks - 1}")
        with torch.no_grad():
            prompt = task_prompt(self.embeddings, *(self.factors[k] for k in FACTOR_KEYS), task)
        return replace(self, embeddings=prompt, task=task)

    def saved(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """What the adapter's safetensors file holds: the tensor, or a multitask adapter's three tensors."""
        if self.factors is None:
            return self.embeddings
        return {TENSOR_KEY: self.embeddings, **self.factors}

    def virtual(self, device=None) -> Virtual:
        """What core.forward puts in front of the text for this adapter."""
        if self.needs_task:
            raise AdapterError(self.task_missing())
        return Virtual(self.embeddings if device is None else self.embeddings.to(device), self.method)

    def task_missing(self, name: object = None) -> str:
        """The message for a multitask adapter named without a task."""
        name = name or self.path or "adapter"
        return (
            f"adapter {str(name)!r} is a multitask adapter: name one of its tasks, e.g. "
            f"'{name}{TASK_SEPARATOR}0' (tasks 0..{self.num_tasks - 1})"
        )

    def soft_prompt(self) -> torch.nn.Module:
        """A trainable copy of this adapter's prompt, e.g. to continue training it or transfer it to a new task: a
        core.prompt.SoftPrompt (a P-tuning adapter's embeddings become a plain prompt: its encoder is not saved), or
        a PrefixEncoder holding the prefix itself, or a Cartridge with the same frozen tokens)."""
        if self.method == "multitask" and self.task is None:
            cols, rows = (self.factors[k] for k in FACTOR_KEYS)
            return MultitaskPrompt(self.embeddings, cols, rows, init=f"adapter:{self.path}")
        if self.method == "cartridge":
            frozen = self.config.get("num_frozen_tokens", 1)
            return Cartridge(self.embeddings, self.embeddings.shape[1], frozen, init=f"adapter:{self.path}")
        if self.method == "prefix":
            return PrefixEncoder(self.embeddings, self.embeddings.shape[1], init=f"adapter:{self.path}")
        return SoftPrompt(self.embeddings, init=f"adapter:{self.path}")

    def template_or(self, default: Template) -> Template:
        """The template this adapter was saved with; `default` when it has none (e.g. a folder written by PEFT)."""
        return self.template if "template" in (self.extra or {}) else default


@dataclass(frozen=True)
class AdapterMetadata:
    """What an adapter folder records beside its tensor: the method and its encoder fields (adapter_config.json),
    and the exact init, the template, the label words and any further entries (softprompt.json)."""

    method: str = "prompt"
    peft_fields: dict = field(default_factory=dict)  # e.g. prefix_projection, encoder_hidden_size
    init: str = "random"
    init_text: str | None = None
    template: Template = field(default_factory=Template)
    label_words: list[str] | None = None
    extra: dict = field(default_factory=dict)  # more softprompt.json entries (a training summary, a step)

    @classmethod
    def of(cls, module: torch.nn.Module, **fields) -> AdapterMetadata:
        """The metadata of a core.prompt module (its method, encoder fields, init and init text); `fields` override."""
        own = {
            "method": module.method,
            "peft_fields": module.peft_fields(),
            "init": module.init,
            "init_text": module.init_text,
        }
        return cls(**{**own, **fields})

    def with_extra(self, **entries) -> AdapterMetadata:
        """A copy with more softprompt.json entries."""
        return replace(self, extra={**self.extra, **entries})

    def softprompt_json(self) -> dict:
        # PEFT's config only knows TEXT / SAMPLE_VOCAB / RANDOM; the exact method (e.g. "labels") is kept here.
        return {"template": self.template.to_json(), "label_words": self.label_words, "init": self.init, **self.extra}


def peft_config(
    num_virtual_tokens: int,
    token_dim: int,
    base_name: str,
    num_layers: int | None,
    num_heads: int | None,
    init: str = "RANDOM",
    init_text: str | None = None,
    *,
    method: str = "prompt",
    model_config=None,
    peft_fields: dict | None = None,
) -> dict:
    """The adapter_config.json PEFT 0.21 writes for a causal-LM adapter of `method` (prompt tuning by default;
    prefix and ptuning take their shape fields from `model_config` and their encoder fields from `peft_fields`)."""
    if method not in ("prompt", "multitask"):
        common = {
            "auto_mapping": None,
            "base_model_name_or_path": base_name,
            "inference_mode": True,
            "modules_to_save": None,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": num_virtual_tokens,
            "peft_version": PEFT_VERSION,
            "revision": None,
            "task_type": "CAUSAL_LM",
        }
        fields = config_fields(method, model_config, peft_fields)
        if model_config is None:  # unknown base: what the tensor itself says
            fields["token_dim"] = token_dim if method == "ptuning" else None
        return dict(sorted({**common, **fields}.items()))
    peft_init = {"text": "TEXT", "vocab": "SAMPLE_VOCAB"}.get(init, "RANDOM")
    if method == "multitask" and peft_init == "SAMPLE_VOCAB":
        peft_init = "RANDOM"  # PEFT's multitask inits have no SAMPLE_VOCAB (softprompt.json keeps the exact init)
    if peft_init == "TEXT" and not init_text:
        raise ValueError("init 'text' needs its init text to be recorded (PEFT refuses TEXT without it)")
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_name,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": num_heads,
        "num_layers": num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": num_virtual_tokens,
        "peft_type": "PROMPT_TUNING",
        "peft_version": PEFT_VERSION,
        "prompt_tuning_init": peft_init,
        "prompt_tuning_init_text": init_text if peft_init == "TEXT" else None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": token_dim,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": base_name if peft_init == "TEXT" else None,
    }
    if method == "multitask":
        config.update(config_fields(method, model_config, peft_fields))
        config.update(num_layers=num_layers, num_attention_heads=num_heads, token_dim=token_dim)
        config = dict(sorted(config.items()))
    return config


def save_adapter(
    out_dir: str | Path,
    embeddings,
    base,
    *,
    init: str | None = None,
    init_text: str | None = None,
    template: Template | None = None,
    label_words: list[str] | None = None,
    extra: dict | None = None,
    method: str | None = None,
    peft_fields: dict | None = None,
    metadata: AdapterMetadata | None = None,
) -> Path:
    """Write a PEFT-format adapter folder atomically (a temp folder renamed into place).

    `embeddings` is a core.prompt module of any method (its output is saved; its method, encoder fields, init
    method and text are recorded) or the tensor to save, of `method` (default prompt) with `peft_fields` (e.g.
    prefix_projection, encoder_hidden_size); `base` is a models.FrozenModel (for the base name and shape fields) or
    None. `metadata` gives all of init ... peft_fields at once, instead of those keywords.
    """
    given = dict(
        init=init,
        init_text=init_text,
        template=template,
        label_words=label_words,
        extra=extra,
        method=method,
        peft_fields=peft_fields,
    )
    module = embeddings if isinstance(embeddings, torch.nn.Module) else None
    if metadata is None:
        metadata = _keyword_metadata(module, **given)
    elif any(value is not None for value in given.values()):
        raise TypeError("save_adapter: pass metadata or its fields (init, template, ...), not both")
    if module is not None:
        with torch.no_grad():
            embeddings = module()
    return _write_adapter(Path(out_dir), cpu_fp32(embeddings), base, metadata)


def cpu_fp32(saved: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """A saved tensor (or a multitask adapter's dict of them) detached, fp32, on the CPU."""
    if isinstance(saved, dict):
        return {k: cpu_fp32(v) for k, v in saved.items()}
    return saved.detach().to(device="cpu", dtype=torch.float32)


def _write_adapter(out_dir: Path, saved: torch.Tensor | dict, base, metadata: AdapterMetadata) -> Path:
    """save_adapter's writer: the fp32 CPU tensor (or a multitask adapter's tensors) and `metadata`, checked to fit
    `base` (or None)."""
    tensor = (saved[TENSOR_KEY] if isinstance(saved, dict) else saved).contiguous()
    if metadata.method == "multitask":
        if not isinstance(saved, dict) or set(saved) != {TENSOR_KEY, *FACTOR_KEYS}:
            raise ValueError(f"a multitask adapter saves {TENSOR_KEY} and {', '.join(FACTOR_KEYS)}")
        check_factors(tensor.shape, *(saved[k].shape for k in FACTOR_KEYS))
        cols = saved[FACTOR_KEYS[0]]
        metadata = replace(metadata, peft_fields={"num_tasks": cols.shape[0], "num_ranks": cols.shape[2]})
    elif isinstance(saved, dict):
        raise ValueError(f"only a multitask adapter saves several tensors (this one is {metadata.method})")
    cfg = getattr(base.model, "config", None) if base is not None else None
    if base is not None and tensor.shape[1] != base_width(metadata.method, base):
        raise ValueError(misfit(metadata.method, tensor.shape[1], base))
    config = peft_config(
        tensor.shape[0],
        tensor.shape[1],
        base.name if base is not None else None,
        getattr(cfg, "num_hidden_layers", None),
        getattr(cfg, "num_attention_heads", None),
        metadata.init,
        metadata.init_text,
        method=metadata.method,
        model_config=cfg,
        peft_fields=metadata.peft_fields,
    )
    return write_folder(out_dir, saved, config, metadata.softprompt_json())


def write_folder(out_dir: Path, tensor: torch.Tensor | dict, config: dict, meta: dict) -> Path:
    """Write an adapter folder's three files (the fp32 CPU `tensor`, or a dict of named tensors, `config` as
    adapter_config.json, `meta` as softprompt.json) into a temporary folder renamed into place, so a reader never sees
    a half-written adapter."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tensors = tensor if isinstance(tensor, dict) else {TENSOR_KEY: tensor}
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / EXTRA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        replace_folder(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _keyword_metadata(module: torch.nn.Module | None, **given) -> AdapterMetadata:
    """save_adapter's keywords as AdapterMetadata: where one is not given, the module's own (method, encoder fields,
    init and init text) or the default."""
    own = AdapterMetadata.of(module) if module is not None else AdapterMetadata()
    return AdapterMetadata(
        method=given["method"] or own.method,
        peft_fields=given["peft_fields"] or own.peft_fields,
        init=given["init"] or own.init or "random",
        init_text=given["init_text"] or own.init_text,
        template=given["template"] or Template(),
        label_words=given["label_words"],
        extra=dict(given["extra"] or {}),
    )


def check_fits_context(num_virtual_tokens: int, context: int | None, where: object) -> None:
    """Refuse a soft prompt that leaves no room in the model's context for one prompt token and one generated
    token (every request to it would fail, after its keys/values were computed for nothing)."""
    if context is not None and num_virtual_tokens > context - 2:
        raise AdapterError(
            f"{where}: {num_virtual_tokens} virtual tokens do not fit the base model's context of "
            f"{context} tokens (at most {max(context - 2, 0)}: a prompt token and a generated one "
            "need room too)"
        )


def load_adapter(path: str | Path, base=None) -> Adapter:
    """Read a softprompt- or PEFT-written prompt-tuning, prefix-tuning or P-tuning adapter folder; check it fits
    `base` when given."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter folder not found: {path}")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: missing (not an adapter folder)")
    config = _read_json_object(config_path)
    peft_type = config.get("peft_type")
    if peft_type not in METHOD_OF:
        raise AdapterError(
            f"{config_path}: peft_type is {peft_type!r}; softprompt loads only {', '.join(METHOD_OF)} adapters"
        )
    if config.get("num_transformer_submodules") not in (None, 1):
        raise AdapterError(
            f"{config_path}: num_transformer_submodules is {config.get('num_transformer_submodules')!r}"
            "; a causal LM adapter has 1"
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{config_path}: task_type is {config.get('task_type')!r}; expected CAUSAL_LM")
    for key in SIZE_FIELDS:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise AdapterError(
                f"{config_path}: field {key!r} must be a positive integer (or null), got {_short(value)}"
            )
    if not weights_path.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(f"{path}: only adapter_model.bin (pickle) found; softprompt reads safetensors only")
        raise AdapterError(f"{weights_path}: missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"{weights_path}: corrupt or unreadable safetensors file: {err}") from err
    if TENSOR_KEY not in tensors:
        raise AdapterError(f"{weights_path}: no tensor {TENSOR_KEY!r} (found: {', '.join(tensors) or 'none'})")
    emb = tensors[TENSOR_KEY]
    _check_embeddings(emb, weights_path, config, config_path)
    method = METHOD_OF[peft_type]
    if base is not None and emb.shape[1] != base_width(method, base):
        raise AdapterError(f"{path}: {misfit(method, emb.shape[1], base, config)}")
    if base is not None:
        check_fits_context(emb.shape[0], getattr(base.model.config, "max_position_embeddings", None), path)
    extra_path = path / EXTRA_FILE
    extra = _read_json_object(extra_path) if extra_path.is_file() else {}
    template, label_words = _check_extra(extra, extra_path)
    factors = _read_factors(tensors, emb, config, weights_path, config_path) if method == "multitask" else None
    return Adapter(
        embeddings=emb.to(torch.float32),
        config=config,
        template=template,
        label_words=label_words,
        extra=extra,
        path=str(path),
        factors=factors,
    )


def _read_factors(tensors: dict, emb: torch.Tensor, config: dict, weights_path: Path, config_path: Path) -> dict:
    """A multitask adapter's task factors, checked against its shared prompt and its config's num_tasks/num_ranks."""
    missing = [k for k in FACTOR_KEYS if k not in tensors]
    if missing:
        raise AdapterError(
            f"{weights_path}: a multitask adapter needs tensor(s) {', '.join(missing)} (found: {', '.join(tensors)})"
        )
    cols, rows = (tensors[k] for k in FACTOR_KEYS)
    for key in ("num_tasks", "num_ranks"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AdapterError(f"{config_path}: field {key!r} must be a positive integer, got {_short(value)}")
    tasks, ranks, (n, hidden) = config["num_tasks"], config["num_ranks"], emb.shape
    for key, value, shape in (
        (FACTOR_KEYS[0], cols, (tasks, n, ranks)),
        (FACTOR_KEYS[1], rows, (tasks, ranks, hidden)),
    ):
        if tuple(value.shape) != shape:
            raise AdapterError(
                f"{weights_path}: {key} has shape {tuple(value.shape)}, expected {list(shape)} "
                f"(num_tasks={tasks}, num_virtual_tokens={n}, num_ranks={ranks}, hidden={hidden})"
            )
        if not value.is_floating_point() or not torch.isfinite(value.float()).all():
            raise AdapterError(f"{weights_path}: {key} must be finite floating-point values")
    return {FACTOR_KEYS[0]: cols.to(torch.float32), FACTOR_KEYS[1]: rows.to(torch.float32)}


def _check_embeddings(emb: torch.Tensor, weights_path: Path, config: dict, config_path: Path) -> None:
    """Refuse a prompt tensor that cannot be a soft prompt: wrong rank or size, not floating point, inf / NaN, or
    values far outside any embedding space (see MAX_ABS_VALUE)."""
    n = config.get("num_virtual_tokens")
    if emb.ndim != 2 or (n is not None and emb.shape[0] != n):
        columns = "layers x 2 x kv_heads x head_dim" if method_of(config) in KV_METHODS else "hidden"
        raise AdapterError(
            f"{weights_path}: {TENSOR_KEY} has shape {tuple(emb.shape)}, expected [num_virtual_tokens={n}, {columns}]"
        )
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise AdapterError(
            f"{weights_path}: {TENSOR_KEY} has shape {tuple(emb.shape)}: a soft prompt needs at "
            "least one virtual token of at least one dimension"
        )
    method = method_of(config) or "prompt"
    width = expected_width(method, config)
    frozen = config.get("num_frozen_tokens", 1) if method == "cartridge" else 0
    if not isinstance(frozen, int) or isinstance(frozen, bool) or not 0 <= frozen <= emb.shape[0]:
        raise AdapterError(
            f"{config_path}: field 'num_frozen_tokens' must be an integer in 0..{emb.shape[0]} (the virtual tokens), "
            f"got {_short(frozen)}"
        )
    if width is not None and width != emb.shape[1]:
        if method in KV_METHODS:
            raise AdapterError(
                f"{weights_path}: {TENSOR_KEY} has width {emb.shape[1]} but {config_path.name} "
                f"fields num_layers x 2 x token_dim say {width}"
            )
        raise AdapterError(
            f"{weights_path}: {TENSOR_KEY} has hidden size {emb.shape[1]} but {config_path.name} "
            f"field 'token_dim' says {width}"
        )
    if not emb.is_floating_point():
        raise AdapterError(
            f"{weights_path}: {TENSOR_KEY} has dtype {str(emb.dtype).replace('torch.', '')}; "
            "a soft prompt must be a floating-point tensor"
        )
    values = emb.to(torch.float32)
    if not torch.isfinite(values).all():
        raise AdapterError(f"{weights_path}: {TENSOR_KEY} contains NaN or inf")
    largest = values.abs().max().item()
    if largest > MAX_ABS_VALUE:
        raise AdapterError(
            f"{weights_path}: {TENSOR_KEY} holds a value of magnitude {largest:.3g}, above the "
            f"{MAX_ABS_VALUE:g} any embedding could have (a corrupt or hand-made file?)"
        )


def _check_extra(extra: dict, extra_path: Path) -> tuple[Template, list[str] | None]:
    """The template and label words of softprompt.json, checked now rather than at the first request."""
    spec = extra.get("template")
    if spec is not None and not isinstance(spec, str):
        raise AdapterError(f"{extra_path}: field 'template' must be a string, got {type(spec).__name__} {_short(spec)}")
    try:
        template = Template.from_json(spec)
    except TemplateError as err:
        raise AdapterError(f"{extra_path}: field 'template': {err}") from err
    words = extra.get("label_words")
    if words is not None:
        if not isinstance(words, list):
            raise AdapterError(
                f"{extra_path}: field 'label_words' must be a list of strings or null, got "
                f"{type(words).__name__} {_short(words)}"
            )
        bad = [w for w in words if not isinstance(w, str) or not w]
        if bad:
            raise AdapterError(f"{extra_path}: field 'label_words' must hold non-empty strings, got {_short(bad[0])}")
    return template, words


def _short(value: object, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for one-line error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path}: not valid JSON: {err}") from err
    except OSError as err:
        raise AdapterError(f"{path}: cannot read: {err.strerror or err}") from err
    if not isinstance(value, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return value
