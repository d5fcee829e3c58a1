"""What the endpoints share (`ServerState`: base model, prompt cache, scheduler, registry, limits) and the
validation of a request into a `Prepared` one: JSON, schema, model, template, tokens, context and capacity, all
checked before any response starts, in the thread pool (never on the event loop)."""

from __future__ import annotations

import copy
import time

from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from softprompt.data.templates import Template, TemplateError, encode_text
from softprompt.inference.batch import context_length
from softprompt.inference.engine import Engine
from softprompt.inference.prefix_cache import PrefixCache
from softprompt.inference.prompt_cache import CachedPrompt, PromptCache, UnknownAdapterError
from softprompt.serve.config import ServeConfig
from softprompt.serve.registry import BASE_NAME, AdapterRegistry, RegistryError
from softprompt.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    decode_body,
    validation_error,
)
from softprompt.serve.security import too_large_message

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


CLIENT_ERRORS = (ValueError, TypeError, UnicodeError, RecursionError)  # raised by request content: 400, never 500


class Prepared:
    """A fully validated generation request: the body, the adapter key, the prompts' ids and token budgets, the
    adapter's number of virtual tokens, (completions) the prompts' texts for echo, and the adapter's PromptCache
    entry it was validated against: every job of the request runs on that entry (pinned), so the request is served
    entirely by one version of the adapter even if it is replaced or removed meanwhile."""

    def __init__(
        self,
        body,
        key: str | None,
        prompts: list[list[int]],
        limits: list[int],
        virtual: int = 0,
        texts: list[str] | None = None,
        entry: CachedPrompt | None = None,
    ):
        self.body, self.key, self.prompts, self.limits = body, key, prompts, limits
        self.virtual, self.texts, self.entry = virtual, texts, entry


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
        limits = [x for x in (context_length(base), config.max_model_len) if x]
        self.context = min(limits) if limits else None
        self.created = int(time.time())
        self.scan = self.registry.rescan() if config.adapters is not None else {"added": [], "skipped": {}}

    def model_card(self, name: str) -> dict:
        adapter = self.registry.adapter(name)
        card = {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "softprompt",
            "root": self.base.name,
            "parent": None if adapter is None else self.base.name,
            "num_virtual_tokens": 0 if adapter is None else adapter.num_virtual_tokens,
            "max_model_len": self.context,
        }
        return card

    def adapter_key(self, model: str) -> str | None:
        """The PromptCache name of a served model (None for the base model); 404 when unknown."""
        if not self.registry.has(model):
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
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
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found") from None
        return key, entry.num_virtual_tokens, entry.template, entry

    def max_tokens(self, asked: int | None, default: int | None, used: int, param: str = "max_tokens") -> int:
        """The completion budget: checked against the server cap and the context left after `used` tokens."""
        if asked is not None and asked > self.max_tokens_cap:
            raise APIError(
                400,
                f"max_tokens is too large: {asked}. This server allows at most "
                f"{self.max_tokens_cap} completion tokens (--max-tokens-cap).",
                param=param,
                code="invalid_value",
            )
        room = self.context - used if self.context else self.max_tokens_cap
        limit = asked if asked is not None else min(default or self.max_tokens_cap, self.max_tokens_cap, room)
        if self.context and (used + limit > self.context or limit < 1):
            limit = max(limit, 1)
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens. However, you "
                f"requested {used + limit} tokens ({used} in the prompt, including the adapter's "
                f"virtual tokens; {limit} for the completion). Please reduce the prompt or "
                "max_tokens.",
                param="messages" if asked is None else param,
                code="context_length_exceeded",
            )
        return limit

    def check_capacity(self, count: int, choices: int = 1, param: str = "prompt", scored: int = 0) -> None:
        """A request with more jobs (prompts x choices completions, plus `scored` prompts to score for echo with
        logprobs) than the server can ever hold at once is a 400 (not a 429: retrying cannot help)."""
        sched = self.scheduler
        if count * choices + scored > sched.capacity:
            what = f"{count} prompts" if choices == 1 else f"{count} prompt(s) x {choices} choices (n / best_of)"
            if scored:
                what = (
                    f"{scored} prompts to score (echo with logprobs)"
                    if not count
                    else f"{what} plus {scored} prompts to score (echo with logprobs)"
                )
            raise APIError(
                400,
                f"Invalid value for '{param}': {what} in one request can never be served: this "
                f"server runs at most {sched.max_batch} requests at once and queues at most "
                f"{sched.max_queue} (--max-batch, --max-queue), so ask for at most {sched.capacity} "
                "completions per request.",
                param=param,
                code="invalid_value",
            )

    # ---- request preparation (runs in the thread pool) -----------------------------------------------------
    def vocab_size(self) -> int:
        model = self.base.model
        return min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])

    def check_bias(self, body) -> None:
        vocab = self.vocab_size()
        for token in body.bias():
            if token >= vocab:
                raise APIError(
                    400,
                    f"Invalid value for 'logit_bias': token id {token} is outside the vocabulary (0..{vocab - 1})",
                    param="logit_bias",
                    code="invalid_value",
                )

    def prepare_completion(self, raw: bytes) -> Prepared:
        body = validate_body(raw, CompletionRequest)
        key, n, _, entry = self.lookup(body.model)
        self.check_bias(body)
        token_prompts = body.token_prompts()
        count = len(token_prompts) if token_prompts is not None else len(body.prompts())
        generated = count if body.max_tokens != 0 else 0  # echo only (max_tokens 0) generates nothing
        scored = count if body.echo and body.logprobs is not None else 0  # each scored prompt is a job too
        self.check_capacity(
            generated,
            body.candidates(),
            "prompt" if body.candidates() == 1 or not generated else "best_of" if body.best_of else "n",
            scored=scored,
        )
        single = not isinstance(body.prompt, list) or (token_prompts is not None and isinstance(body.prompt[0], int))
        prompts, texts = [], []
        vocab = self.vocab_size()
        for index in range(count):
            param = "prompt" if single else f"prompt.{index}"
            if token_prompts is not None:
                ids = token_prompts[index]
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    raise APIError(
                        400,
                        f"Invalid value for '{param}': token id {bad} is outside the vocabulary (0..{vocab - 1})",
                        param=param,
                        code="invalid_value",
                    )
                text = self.tokenizer.decode(ids) if body.echo else ""
            else:
                text = body.prompts()[index]
                ids = encode_text(self.tokenizer, text)
            if not ids:
                raise APIError(
                    400,
                    "prompt is empty: give at least one token" + (" of text" if token_prompts is None else ""),
                    param=param,
                )
            prompts.append(ids)
            texts.append(text)
        if body.max_tokens == 0:  # echo only: score the prompt, generate nothing
            limits = [0] * len(prompts)
            for ids in prompts:
                if self.context and n + len(ids) > self.context:
                    raise APIError(
                        400,
                        f"This model's maximum context length is {self.context} tokens. However, "
                        f"the prompt has {n + len(ids)} tokens (including the adapter's {n} virtual "
                        "tokens). Please reduce the prompt.",
                        param="prompt",
                        code="context_length_exceeded",
                    )
        else:
            limits = [self.max_tokens(body.max_tokens, DEFAULT_COMPLETION_TOKENS, n + len(ids)) for ids in prompts]
        return Prepared(body, key, prompts, limits, n, texts, entry)

    def prepare_chat(self, raw: bytes) -> Prepared:
        body = validate_body(raw, ChatRequest)
        key, n, template, entry = self.lookup(body.model)
        self.check_bias(body)
        self.check_capacity(1, body.n, "n")
        text = self.chat_text(template, body.as_dicts())
        ids = encode_text(self.tokenizer, text)
        if not ids:
            raise APIError(400, "the formatted conversation is empty", param="messages")
        limit = self.max_tokens(body.limit(), None, n + len(ids), param=body.limit_param())
        return Prepared(body, key, [ids], [limit], n, entry=entry)

    def prepare_tokenize(self, raw: bytes) -> dict:
        body = validate_body(raw, TokenizeRequest)
        key, n, template, _ = self.lookup(body.model)
        if body.messages is not None:
            text = self.chat_text(template, [{"role": m.role, "content": m.text()} for m in body.messages])
        else:
            text = body.prompt
        ids = self.tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids, "num_virtual_tokens": n}

    def prepare_detokenize(self, raw: bytes) -> dict:
        body = validate_body(raw, DetokenizeRequest)
        self.lookup(body.model)
        vocab = self.vocab_size()
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"Invalid value for 'tokens': token id {bad} is outside the vocabulary (0..{vocab - 1})",
                param="tokens",
                code="invalid_value",
            )
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def chat_text(self, template: Template, messages: list[dict]) -> str:
        """A conversation formatted with a model's template (400 when it cannot be)."""
        try:
            return template.chat_prompt(messages, self.tokenizer)
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001 (TemplateError, or the model's jinja chat template refusing it)
            raise APIError(
                400,
                f"the conversation cannot be formatted: {err}" if not isinstance(err, TemplateError) else str(err),
                param="messages",
            ) from err


def validate_body(raw: bytes, model):
    data = decode_body(raw)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def as_client_error(err: BaseException) -> APIError:
    """An exception raised while handling a request's content, as the 4xx it stands for."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, RegistryError):
        code = {404: "model_not_found", 409: "conflict"}.get(err.status, "invalid_value")
        return APIError(err.status, str(err), code=code)
    if isinstance(err, UnknownAdapterError):
        return APIError(404, str(err), param="model", code="model_not_found")
    if isinstance(err, RecursionError):
        return APIError(400, "The request is nested too deeply.", code="invalid_value")
    if isinstance(err, UnicodeError):
        return APIError(400, f"The request contains text that is not valid Unicode: {err}", code="invalid_value")
    return APIError(400, f"Invalid request: {err}", code="invalid_value")


async def in_thread(fn, *args):
    """Run request handling in the thread pool; its client mistakes come back as APIErrors (4xx)."""
    try:
        return await run_in_threadpool(fn, *args)
    except (APIError, RegistryError) + CLIENT_ERRORS as err:
        raise as_client_error(err) from err


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read up to `limit` bytes (413 beyond, also for chunked bodies without a Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, too_large_message(limit), code="request_too_large", headers={"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)
