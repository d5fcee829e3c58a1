"""The soft-prompt KV cache: each adapter's virtual-token keys/values, computed once and reused for every request.

The virtual tokens come first, at positions 0..N-1, so their keys/values never depend on the request that follows.
Generation, chat, evaluation and serving therefore compute each loaded adapter's keys/values once
(`forward.prompt_kv`: prompt-tuning and P-tuning adapters run their N virtual tokens through the model; a prefix
adapter's tensor already is the keys/values) and put them in front of every row that uses the adapter, instead of
re-running them on every call as PEFT does. Downstream of this cache every method is the same.

The cache also records the template each adapter was trained with, so every caller formats prompts identically,
and gives every entry an identity (`identity`), new each time an adapter is added, so that caches of what follows a
soft prompt (prefix_cache.py) never mix up an adapter with the one it replaced.

A composed name (`a+b`, formats/compose.py) is served from its parts' entries: its keys/values are theirs
concatenated along the sequence (the same tensors as prompt_kv of the composed adapter: a prefix's keys/values are a
reshape of its tensor), built on first use and kept for the last COMPOSED_KEPT compositions. Its identity belongs to
the parts' identities, so prefix-cache blocks and pins of `a+b` stay valid while a and b stay loaded, and end when
either is replaced or removed.

A multitask adapter (MULTITASK_PROMPT_TUNING) is served one task at a time: `NAME@TASK` is task TASK's prompt
(Adapter.for_task, an ordinary [N, hidden] prompt), its keys/values computed on first use and kept for the last
TASKS_KEPT such names; its identity belongs to the adapter's, so it ends when the adapter is replaced or removed.
The bare name of a multitask adapter is refused (there is no prompt without a task).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from softprompt.core import forward
from softprompt.core.forward import Kv
from softprompt.core.models import FrozenModel
from softprompt.data.templates import Template
from softprompt.formats.adapter import TASK_SEPARATOR, Adapter, AdapterError, check_fits_context, split_task
from softprompt.formats.compose import SEPARATOR, compose, is_composition, split_parts
from softprompt.formats.methods import base_width, misfit

_IDENTITIES = itertools.count(1)  # shared by every PromptCache, so no two entries (or base models) ever share one
COMPOSED_KEPT = 8  # compositions whose concatenated keys/values are kept (rebuilding one is a copy, no model call)
TASKS_KEPT = 64  # tasks of multitask adapters whose keys/values are kept (rebuilding one runs N virtual tokens)


@dataclass
class CachedPrompt:
    """One adapter's soft prompt in ready-to-use form."""

    kv: Kv  # per layer (keys, values) [1, kv_heads, N, head_dim], model dtype, model device
    num_virtual_tokens: int
    template: Template
    adapter: Adapter
    identity: int = field(default_factory=lambda: next(_IDENTITIES))
    parts: tuple[int, ...] = ()  # a composition's parts' identities (empty for a loaded adapter)

    @property
    def method(self) -> str:
        return self.adapter.method


class UnknownAdapterError(ValueError):
    """A request names an adapter that is not loaded."""

    @classmethod
    def named(cls, name: str, loaded: list[str]) -> UnknownAdapterError:
        """The error for adapter `name`, not among `loaded`."""
        return cls(f"no adapter named {name!r} is loaded (loaded: {', '.join(loaded) or 'none'})")

    @classmethod
    def in_request(cls, request_id, name: str, loaded: list[str]) -> UnknownAdapterError:
        """The error for a request whose adapter `name` is not among `loaded`."""
        return cls(
            f"request {request_id!r} names adapter {name!r}, which is not loaded (loaded: {', '.join(loaded) or 'none'})"
        )


class PromptCache:
    """Per-adapter keys/values of the virtual tokens (forward.prompt_kv), computed once when an adapter is added and
    reused for every request and batch. The name None always means the base model (no soft prompt)."""

    def __init__(self, base: FrozenModel, default_template: Template | None = None):
        self.base = base
        self.default_template = default_template or Template()
        self._entries: dict[str, CachedPrompt] = {}
        self._base_identity = next(_IDENTITIES)
        # composed name -> its entry, most recent last; parts' identities -> the composition's identity
        self._composed: OrderedDict[str, CachedPrompt] = OrderedDict()
        self._composed_ids: dict[tuple[int, ...], int] = {}
        self._composing = threading.Lock()  # request threads and the worker compose at once
        # NAME@TASK -> its entry, most recent last; (adapter's identity, task) -> the task entry's identity
        self._tasks: OrderedDict[str, CachedPrompt] = OrderedDict()
        self._task_ids: dict[tuple[int, int], int] = {}

    def add(self, name: str, adapter: Adapter) -> None:
        """Compute and store the adapter's virtual-token KV (replaces an entry of the same name)."""
        self.put(name, self.prepare(name, adapter))

    def prepare(self, name: str, adapter: Adapter) -> CachedPrompt:
        """The entry `add` would store, computed without touching the cache (so a server computes it off its
        worker thread and swaps it in with `put`). Refuses an adapter whose soft prompt leaves no room in the
        model's context."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter needs a non-empty string name, got {name!r}")
        emb, method = adapter.embeddings, adapter.method
        where = adapter.path or name
        width = base_width(method, self.base)
        if emb.ndim != 2 or emb.shape[0] < 1:
            raise AdapterError(f"{where}: soft prompt has shape {tuple(emb.shape)}, expected [N >= 1, {width}]")
        if emb.shape[1] != width:
            raise AdapterError(f"{where}: {misfit(method, emb.shape[1], self.base, adapter.config)}")
        check_fits_context(emb.shape[0], getattr(self.base.model.config, "max_position_embeddings", None), where)
        if adapter.needs_task:  # served per task (NAME@TASK): nothing to run until a task is named
            return CachedPrompt([], emb.shape[0], adapter.template_or(self.default_template), adapter)
        with torch.no_grad():
            kv, _ = forward.prompt_kv(self.base.model, forward.Virtual(emb.to(self.base.device), method))
        kv = [(k.detach(), v.detach()) for k, v in kv]
        return CachedPrompt(kv, emb.shape[0], adapter.template_or(self.default_template), adapter)

    def put(self, name: str, entry: CachedPrompt) -> None:
        """Serve `entry` (from `prepare`) as `name`, replacing any entry of that name in one assignment."""
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        if name not in self._entries:
            raise UnknownAdapterError.named(name, self.names())
        del self._entries[name]

    def get(self, name: str | None) -> tuple[Kv | None, int]:
        """(per-layer KV [1, kv_heads, N, head_dim], N) of an adapter; (None, 0) for the base model."""
        if name is None:
            return None, 0
        entry = self.entry(name)
        return entry.kv, entry.num_virtual_tokens

    def entry(self, name: str) -> CachedPrompt:
        """The entry served as `name`, a loaded adapter, a composition of loaded key/value adapters (`a+b`) or a task of
        a loaded multitask adapter (`NAME@TASK`); a multitask adapter's bare name is refused (AdapterError)."""
        entry = self._entries.get(name)
        if entry is not None:  # a loaded name wins (a CLI adapter's path may hold a '+')
            if entry.adapter.needs_task:
                raise AdapterError(entry.adapter.task_missing(name))
            return entry
        if is_composition(name):
            return self._composition(name)
        if isinstance(name, str) and TASK_SEPARATOR in name:
            return self._task(name)
        raise UnknownAdapterError.named(name, self.names())

    def request_entry(self, request_id, name: str | None) -> CachedPrompt | None:
        """The entry a request's adapter names (None: the base model); an unknown name is refused naming the request
        (a composition's error names the part at fault)."""
        if name is None:
            return None
        if name not in self._entries and not is_composition(name) and TASK_SEPARATOR not in name:
            raise UnknownAdapterError.in_request(request_id, name, self.names())
        return self.entry(name)

    def _task(self, name: str) -> CachedPrompt:
        """The entry of `NAME@TASK`: task TASK's prompt of the loaded multitask adapter NAME, built on first use."""
        adapter_name, task = split_task(name)
        parent = self._entries.get(adapter_name)  # one read: the worker may remove it meanwhile
        if parent is None:
            raise UnknownAdapterError.named(adapter_name, self.names())
        key = (parent.identity, task)
        with self._composing:
            kept = self._tasks.get(name)
            if kept is not None and kept.parts == key[:1]:
                self._tasks.move_to_end(name)
                return kept
        entry = self.prepare(name, parent.adapter.for_task(task, where=repr(name)))
        with self._composing:
            entry.identity = self._task_ids.setdefault(key, entry.identity)
            entry.parts = key[:1]
            self._tasks[name] = entry
            while len(self._tasks) > TASKS_KEPT:
                self._tasks.popitem(last=False)
        return entry

    def _composition(self, name: str) -> CachedPrompt:
        """The entry of a composed name: built from its parts' current entries, or the one kept for them."""
        names = split_parts(name)
        parts = []
        for part in names:
            entry = self._entries.get(part)  # one read: the worker may remove it meanwhile
            if entry is None:
                raise UnknownAdapterError(
                    f"composition {name!r}: part {part!r} is not loaded (loaded: {', '.join(self.names()) or 'none'})"
                )
            parts.append(entry)
        key = tuple(part.identity for part in parts)
        with self._composing:
            kept = self._composed.get(name)
            if kept is not None and kept.parts == key:
                self._composed.move_to_end(name)
                return kept
        adapter = compose([part.adapter for part in parts], names, name)
        check_fits_context(
            adapter.num_virtual_tokens, getattr(self.base.model.config, "max_position_embeddings", None), name
        )
        kv = [
            (
                torch.cat([part.kv[layer][0] for part in parts], dim=2),
                torch.cat([part.kv[layer][1] for part in parts], dim=2),
            )
            for layer in range(len(parts[0].kv))
        ]
        with self._composing:
            identity = self._composed_ids.setdefault(key, next(_IDENTITIES))
            entry = CachedPrompt(kv, adapter.num_virtual_tokens, parts[0].template, adapter, identity, key)
            self._composed[name] = entry
            while len(self._composed) > COMPOSED_KEPT:
                self._composed.popitem(last=False)
        return entry

    def template(self, name: str | None) -> Template:
        """The template to format prompts for this adapter (the default one for the base model)."""
        return self.default_template if name is None else self._loaded_or_entry(name).template

    def num_virtual_tokens(self, name: str | None) -> int:
        return 0 if name is None else self._loaded_or_entry(name).num_virtual_tokens

    def _loaded_or_entry(self, name: str) -> CachedPrompt:
        """The loaded entry of `name` (also a multitask adapter's, whose template and length all its tasks share),
        else `entry(name)`."""
        return self._entries.get(name) or self.entry(name)

    def identity(self, name: str | None) -> int:
        """A number naming this entry (or this cache's base model) for as long as it is loaded; an adapter added
        again under the same name gets a new one."""
        return self._base_identity if name is None else self.entry(name).identity

    def identities(self) -> set[int]:
        """The identities of the base model, of every loaded adapter and of every composition of loaded adapters
        used so far (those of compositions with a part removed or replaced are forgotten)."""
        live = {entry.identity for entry in self._entries.values()}
        with self._composing:
            for key in [key for key in self._composed_ids if not live.issuperset(key)]:
                del self._composed_ids[key]
            composed = set(self._composed_ids.values())
            for key in [key for key in self._task_ids if key[0] not in live]:
                del self._task_ids[key]
            composed |= set(self._task_ids.values())
        return {self._base_identity} | live | composed

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        """True for the base model (None), a loaded adapter, a composition whose parts are all loaded and a task
        `NAME@TASK` of a loaded adapter NAME (whether it has that task is checked when it is used)."""
        if is_composition(name) and name not in self._entries:
            parts = name.split(SEPARATOR)
            return all(parts) and all(part in self._entries for part in parts)
        if isinstance(name, str) and TASK_SEPARATOR in name and name not in self._entries:
            return name.rpartition(TASK_SEPARATOR)[0] in self._entries
        return name is None or name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
