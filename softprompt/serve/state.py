"""What the endpoints share (`ServerState`): the base model, the engine with its prompt and prefix caches and its
scheduler (its worker thread runs for the app's lifespan), the adapter registry and the limits; and what it
answers without the engine: model lookups, model cards, health."""

from __future__ import annotations

import contextlib
import copy
import time

from starlette.concurrency import run_in_threadpool

from softprompt.data.templates import Template
from softprompt.formats.adapter import TASK_SEPARATOR, AdapterError, split_task, with_task
from softprompt.formats.compose import is_composition, split_parts
from softprompt.inference.batch import context_length
from softprompt.inference.engine import Engine
from softprompt.inference.prefix_cache import PrefixCache
from softprompt.inference.prompt_cache import CachedPrompt, UnknownAdapterError
from softprompt.serve.config import ServeConfig
from softprompt.serve.errors import APIError, model_not_found
from softprompt.serve.registry import BASE_NAME, AdapterRegistry, RegistryError
from softprompt.serve.responses import Health, ModelCard, ModelList


class ServerState:
    """What the endpoints share: base model, adapters, worker and limits."""

    def __init__(self, base, config: ServeConfig, template: Template):
        self.base = base
        self.tokenizer = copy.deepcopy(base.tokenizer)  # the worker thread decodes with base.tokenizer
        prefix_cache = PrefixCache(config.prefix_cache_mb << 20) if config.prefix_cache_mb else None
        self.engine = Engine(base, default_template=template, prefix_cache=prefix_cache)
        self.cache, self.prefix_cache = self.engine.prompt_cache, prefix_cache
        self.scheduler = self.engine.scheduler(config.max_batch, config.max_queue)  # the app starts its worker
        self.registry = AdapterRegistry(base, self.cache, config.adapters, run_on_worker=self.scheduler.run)
        self.max_tokens_cap = config.max_tokens_cap
        self.config = config  # its repetition defaults apply to requests that do not set their own
        limits = [x for x in (context_length(base), config.max_model_len) if x]
        self.context = min(limits) if limits else None
        self.created = int(time.time())
        self.scan = self.registry.rescan() if config.adapters is not None else {"added": [], "skipped": {}}

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """The app's lifespan: the worker thread starts with the app and stops with it."""
        self.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(self.scheduler.stop)

    def model_card(self, name: str) -> ModelCard:
        """The card of a served model (or composition); RegistryError(404) when unknown."""
        if is_composition(name) or self._is_task(name):
            _, n, _, _ = self.lookup(name)
            return ModelCard(id=name, object="model", created=self.created, owned_by="softprompt",
                             root=self.base.name, parent=self.base.name, num_virtual_tokens=n,
                             max_model_len=self.context)  # fmt: skip
        adapter = self.registry.adapter(name)
        return ModelCard(
            id=name,
            object="model",
            created=self.created,
            owned_by="softprompt",
            root=self.base.name,
            parent=None if adapter is None else self.base.name,
            num_virtual_tokens=0 if adapter is None else adapter.num_virtual_tokens,
            max_model_len=self.context,
        )

    def model_list(self) -> ModelList:
        cards = []
        for name in [BASE_NAME] + self.registry.names():
            with contextlib.suppress(RegistryError, APIError):  # removed meanwhile
                adapter = self.registry.adapter(name)
                if adapter is not None and adapter.needs_task:  # a multitask adapter: a model per task
                    cards += [self.model_card(with_task(name, task)) for task in range(adapter.num_tasks)]
                else:
                    cards.append(self.model_card(name))
        return ModelList(object="list", data=cards)

    def health(self) -> Health:
        stats = self.scheduler.snapshot()
        return Health(
            status="ok" if stats["alive"] else "unavailable",
            model=self.base.name,
            adapters=len(self.registry.names()),
            scheduler=stats,
            prefix_cache=self.prefix_cache.stats().as_dict() if self.prefix_cache is not None else None,
        )

    def adapter_key(self, model: str) -> str | None:
        """The PromptCache name of a served model (None for the base model); 404 when unknown. A composed name
        (`a+b`, formats/compose.py) is served when each part is."""
        if is_composition(model):
            return self._composition_key(model)
        if self._is_task(model):
            return self._task_key(model)
        if not self.registry.has(model):
            raise model_not_found(model)
        return None if model == BASE_NAME else model

    def lookup(self, model: str) -> tuple[str | None, int, Template, CachedPrompt | None]:
        """(cache key, number of virtual tokens, template, cache entry) of a served model, read from one cache entry
        (so an adapter swapped meanwhile gives the old or the new values, never a mix); 404 when unknown or
        removed. The entry is None for the base model."""
        key = self.adapter_key(model)
        if key is None:
            return None, 0, self.cache.default_template, None
        try:
            entry = self.cache.entry(key)
        except UnknownAdapterError:
            raise model_not_found(model) from None
        except AdapterError as err:  # a composition that cannot be built: a part not keys/values, too long
            raise APIError(400, str(err), param="model", code="invalid_value") from None
        return key, entry.num_virtual_tokens, entry.template, entry

    def _composition_key(self, model: str) -> str:
        """A composed model name, checked: no empty part, no base model, every part served (404 naming it)."""
        try:
            parts = split_parts(model)
        except AdapterError as err:
            raise APIError(400, str(err), param="model", code="invalid_value") from None
        for part in parts:
            if part == BASE_NAME:
                raise APIError(400, f"composition {model!r}: part {BASE_NAME!r} is the base model, which has no "
                               "keys/values to compose", param="model", code="invalid_value")  # fmt: skip
            if not self.registry.has(part):
                raise APIError(404, f"The model `{model}` does not exist: its part `{part}` is not served.",
                               param="model", code="model_not_found")  # fmt: skip
        return model

    def _is_task(self, model: str) -> bool:
        """True for a model name `NAME@TASK` (a task of a multitask adapter), unless an adapter has that very name."""
        return isinstance(model, str) and TASK_SEPARATOR in model and not self.registry.has(model)

    def _task_key(self, model: str) -> str:
        """A task's model name, checked: an integer task (400), of a served adapter (404 naming it); whether that
        adapter is a multitask one with this task is the cache entry's check (400)."""
        try:
            name, _ = split_task(model)
        except AdapterError as err:
            raise APIError(400, str(err), param="model", code="invalid_value") from None
        if name == BASE_NAME:
            raise APIError(400, f"{model!r}: the base model has no tasks (only multitask adapters do)",
                           param="model", code="invalid_value")  # fmt: skip
        if not self.registry.has(name):
            raise APIError(404, f"The model `{model}` does not exist: its adapter `{name}` is not served.",
                           param="model", code="model_not_found")  # fmt: skip
        return model

    def vocab_size(self) -> int:
        """Token ids a request may use: those both the input and the output embeddings have."""
        model = self.base.model
        return min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
