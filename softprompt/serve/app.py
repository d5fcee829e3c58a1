"""The OpenAI-compatible HTTP server: many adapters on one frozen base model (FastAPI).

    app = create_app(load_base(), "adapters/")     # every adapter sub-folder, plus the base model as `base`
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /health, GET /v1/models[/{name}], POST /v1/completions, POST /v1/chat/completions (both with
`stream`, `n`, `logprobs`, penalties and logit_bias; completions also take token-id prompts, `echo` and `best_of`),
POST /tokenize and /detokenize (as vLLM names them), and the admin endpoints POST /v1/adapters, DELETE /v1/adapters/{name}, POST /v1/adapters/rescan (off
unless allow_admin=True: 403). Requests for any mix of adapters share one continuously batched DecodeBatch
(scheduler.py). Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}; a mistake in a request is
a 4xx, never a 5xx (and never FastAPI's 422). /openapi.json publishes the request and response models (schemas.py)
and is open even with an api_key (it carries no secrets).

Status codes: 400 invalid request (param names the field), 401 wrong/missing API key, 403 admin endpoints disabled
or a cross-origin request, 404 unknown model/adapter, 409 name clash, 413 body over max_request_bytes, 415 body not
JSON, 421 Host header not this server (DNS rebinding), 429 queue full (Retry-After), 503 worker stopped.

Requests are validated completely (JSON, schema, model, template, tokens, context, capacity) before any response
starts, so a streamed request either gets a 400 or a 200 stream. Parsing, templating and tokenising run in a thread
pool, never on the event loop, so a large body never stalls other clients or /health.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from softprompt.inference.engine import context_length
from softprompt.inference.prompt_cache import PromptCache, UnknownAdapterError
from softprompt.data.templates import Template, TemplateError, encode_text
from softprompt.serve.config import DEFAULT_MAX_REQUEST_BYTES
from softprompt.serve.registry import BASE_NAME, AdapterRegistry, RegistryError, validate_name
from softprompt.serve.scheduler import Job, Overloaded, Scheduler, Unavailable
from softprompt.serve.batch import ServeBatch, ServeRequest, TokenLogprobs, prompt_logprobs
from softprompt.serve.schemas import (REQUEST_MODELS, RESPONSE_MODELS, AdapterAdd, APIError, ChatRequest,
                                      CompletionRequest, DetokenizeRequest, TokenizeRequest, decode_body,
                                      validation_error)
from softprompt.serve.security import Guard, too_large_message

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
CLIENT_ERRORS = (ValueError, TypeError, UnicodeError, RecursionError)  # raised by request content: 400, never 500


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class Prepared:
    """A fully validated generation request: the body, the adapter key, the prompts' ids and token budgets, the
    adapter's number of virtual tokens, and (completions) the prompts' texts for echo."""

    def __init__(self, body, key: str | None, prompts: list[list[int]], limits: list[int], virtual: int = 0,
                 texts: list[str] | None = None):
        self.body, self.key, self.prompts, self.limits = body, key, prompts, limits
        self.virtual, self.texts = virtual, texts


class ServerState:
    """What the endpoints share: base model, adapters, worker and limits."""

    def __init__(self, base, adapters_dir, *, template: Template | None, max_batch: int, max_queue: int,
                 max_tokens_cap: int, max_model_len: int | None):
        self.base = base
        self.tokenizer = copy.deepcopy(base.tokenizer)  # the worker thread decodes with base.tokenizer
        self.cache = PromptCache(base, template or Template())
        self.scheduler = Scheduler(lambda: ServeBatch(base, self.cache), max_batch, max_queue)
        self.registry = AdapterRegistry(base, self.cache, adapters_dir, run_on_worker=self.scheduler.run)
        self.max_tokens_cap = max_tokens_cap
        model_len = context_length(base)
        self.context = min(x for x in (model_len, max_model_len) if x) if (model_len or max_model_len) else None
        self.created = int(time.time())
        self.scan = self.registry.rescan() if adapters_dir is not None else {"added": [], "skipped": {}}

    def model_card(self, name: str) -> dict:
        adapter = self.registry.adapter(name)
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "softprompt",
                "root": self.base.name, "parent": None if adapter is None else self.base.name,
                "num_virtual_tokens": 0 if adapter is None else adapter.num_virtual_tokens,
                "max_model_len": self.context}
        return card

    def adapter_key(self, model: str) -> str | None:
        """The PromptCache name of a served model (None for the base model); 404 when unknown."""
        if not self.registry.has(model):
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return None if model == BASE_NAME else model

    def lookup(self, model: str) -> tuple[str | None, int, Template]:
        """(cache key, number of virtual tokens, template) of a served model, read from one cache entry (so an
        adapter swapped meanwhile gives the old or the new values, never a mix); 404 when unknown or removed."""
        key = self.adapter_key(model)
        if key is None:
            return None, 0, self.cache.default_template
        try:
            entry = self.cache.entry(key)
        except UnknownAdapterError:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found") from None
        return key, entry.num_virtual_tokens, entry.template

    def max_tokens(self, asked: int | None, default: int | None, used: int, param: str = "max_tokens") -> int:
        """The completion budget: checked against the server cap and the context left after `used` tokens."""
        if asked is not None and asked > self.max_tokens_cap:
            raise APIError(400, f"max_tokens is too large: {asked}. This server allows at most "
                                f"{self.max_tokens_cap} completion tokens (--max-tokens-cap).",
                           param=param, code="invalid_value")
        room = self.context - used if self.context else self.max_tokens_cap
        limit = asked if asked is not None else min(default or self.max_tokens_cap, self.max_tokens_cap, room)
        if self.context and (used + limit > self.context or limit < 1):
            limit = max(limit, 1)
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {used + limit} tokens ({used} in the prompt, including the adapter's "
                                f"virtual tokens; {limit} for the completion). Please reduce the prompt or "
                                "max_tokens.", param="messages" if asked is None else param,
                           code="context_length_exceeded")
        return limit

    def check_capacity(self, count: int, choices: int = 1, param: str = "prompt") -> None:
        """A request with more completions (prompts x choices) than the server can ever hold at once is a 400 (not a
        429: retrying cannot help)."""
        sched = self.scheduler
        if count * choices > sched.capacity:
            what = f"{count} prompts" if choices == 1 else f"{count} prompt(s) x {choices} choices (n / best_of)"
            raise APIError(400, f"Invalid value for '{param}': {what} in one request can never be served: this "
                                f"server runs at most {sched.max_batch} requests at once and queues at most "
                                f"{sched.max_queue} (--max-batch, --max-queue), so ask for at most {sched.capacity} "
                                "completions per request.", param=param, code="invalid_value")

    # ---- request preparation (runs in the thread pool) -----------------------------------------------------
    def vocab_size(self) -> int:
        model = self.base.model
        return min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])

    def check_bias(self, body) -> None:
        vocab = self.vocab_size()
        for token in body.bias():
            if token >= vocab:
                raise APIError(400, f"Invalid value for 'logit_bias': token id {token} is outside the vocabulary "
                                    f"(0..{vocab - 1})", param="logit_bias", code="invalid_value")

    def prepare_completion(self, raw: bytes) -> Prepared:
        body = _validate(raw, CompletionRequest)
        key, n, _ = self.lookup(body.model)
        self.check_bias(body)
        token_prompts = body.token_prompts()
        count = len(token_prompts) if token_prompts is not None else len(body.prompts())
        if body.max_tokens != 0:  # echo only (max_tokens 0) generates nothing
            self.check_capacity(count, body.candidates(), "prompt" if body.candidates() == 1 else
                                "best_of" if body.best_of else "n")
        single = not isinstance(body.prompt, list) or (token_prompts is not None and isinstance(body.prompt[0], int))
        prompts, texts = [], []
        vocab = self.vocab_size()
        for index in range(count):
            param = "prompt" if single else f"prompt.{index}"
            if token_prompts is not None:
                ids = token_prompts[index]
                bad = next((t for t in ids if not 0 <= t < vocab), None)
                if bad is not None:
                    raise APIError(400, f"Invalid value for '{param}': token id {bad} is outside the vocabulary "
                                        f"(0..{vocab - 1})", param=param, code="invalid_value")
                text = self.tokenizer.decode(ids) if body.echo else ""
            else:
                text = body.prompts()[index]
                ids = encode_text(self.tokenizer, text)
            if not ids:
                raise APIError(400, "prompt is empty: give at least one token" + (" of text" if token_prompts is None
                                                                                   else ""), param=param)
            prompts.append(ids)
            texts.append(text)
        if body.max_tokens == 0:  # echo only: score the prompt, generate nothing
            limits = [0] * len(prompts)
            for ids in prompts:
                if self.context and n + len(ids) > self.context:
                    raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, "
                                        f"the prompt has {n + len(ids)} tokens (including the adapter's {n} virtual "
                                        "tokens). Please reduce the prompt.", param="prompt",
                                   code="context_length_exceeded")
        else:
            limits = [self.max_tokens(body.max_tokens, DEFAULT_COMPLETION_TOKENS, n + len(ids)) for ids in prompts]
        return Prepared(body, key, prompts, limits, n, texts)

    def prepare_chat(self, raw: bytes) -> Prepared:
        body = _validate(raw, ChatRequest)
        key, n, template = self.lookup(body.model)
        self.check_bias(body)
        self.check_capacity(1, body.n, "n")
        text = self.chat_text(template, body.as_dicts())
        ids = encode_text(self.tokenizer, text)
        if not ids:
            raise APIError(400, "the formatted conversation is empty", param="messages")
        limit = self.max_tokens(body.limit(), None, n + len(ids), param=body.limit_param())
        return Prepared(body, key, [ids], [limit], n)

    def prepare_tokenize(self, raw: bytes) -> dict:
        body = _validate(raw, TokenizeRequest)
        key, n, template = self.lookup(body.model)
        if body.messages is not None:
            text = self.chat_text(template, [{"role": m.role, "content": m.text()} for m in body.messages])
        else:
            text = body.prompt
        ids = self.tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"]
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids, "num_virtual_tokens": n}

    def prepare_detokenize(self, raw: bytes) -> dict:
        body = _validate(raw, DetokenizeRequest)
        self.lookup(body.model)
        vocab = self.vocab_size()
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"Invalid value for 'tokens': token id {bad} is outside the vocabulary "
                                f"(0..{vocab - 1})", param="tokens", code="invalid_value")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def chat_text(self, template: Template, messages: list[dict]) -> str:
        """A conversation formatted with a model's template (400 when it cannot be)."""
        try:
            return template.chat_prompt(messages, self.tokenizer)
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001 (TemplateError, or the model's jinja chat template refusing it)
            raise APIError(400, f"the conversation cannot be formatted: {err}" if not isinstance(err, TemplateError)
                           else str(err), param="messages") from err


def _validate(raw: bytes, model):
    data = decode_body(raw)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def _as_client_error(err: BaseException) -> APIError:
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


async def _in_thread(fn, *args):
    """Run request handling in the thread pool; its client mistakes come back as APIErrors (4xx)."""
    try:
        return await run_in_threadpool(fn, *args)
    except (APIError, RegistryError) + CLIENT_ERRORS as err:
        raise _as_client_error(err) from err


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read up to `limit` bytes (413 beyond, also for chunked bodies without a Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, too_large_message(limit), code="request_too_large", headers={"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)


# ---- OpenAPI -------------------------------------------------------------------------------------------------
def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


_ERRORS = {
    400: "invalid request (`param` names the field)", 401: "missing or wrong API key",
    403: "admin endpoints disabled, or a cross-origin request", 404: "unknown model or adapter",
    409: "name clash", 413: "request body too large", 415: "request body is not JSON",
    421: "Host header not this server", 429: "the queue is full (Retry-After)", 503: "the worker is not running",
}


def _errors(*codes: int) -> dict:
    return {code: _json("ErrorResponse", _ERRORS[code]) for code in codes}


def _body(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(name)}}}}


def _generation_responses(name: str, chunk: str) -> dict:
    return {200: {"description": f"a {name}; with `stream: true`, server-sent events: `data: <{chunk}>` per chunk, "
                                 "then `data: [DONE]`",
                  "content": {"application/json": {"schema": _ref(name)},
                              "text/event-stream": {"schema": {"type": "string",
                                                               "description": f"data: {chunk} JSON lines"},
                                                    "x-event-schema": _ref(chunk)}}},
            **_errors(400, 401, 403, 404, 413, 415, 421, 429, 503)}


def _openapi(app: FastAPI, api_key: str | None):
    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS + RESPONSE_MODELS],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        schemas.update(defs.get("$defs", {}))
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
                if api_key is not None and operation.get("operationId", "").startswith("health"):
                    continue
                if api_key is not None:
                    operation["security"] = [{"bearer": []}]
        if api_key is not None:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        if not schemas:
            components.pop("schemas")
        app.openapi_schema = schema
        return schema

    return openapi


def create_app(base, adapters_dir=None, *, template: Template | None = None, max_batch: int = 16,
               max_queue: int = 64, max_tokens_cap: int = 2048, max_model_len: int | None = None,
               api_key: str | None = None, allow_admin: bool = False,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, allowed_hosts: list[str] | None = None,
               allow_origins: list[str] | None = None) -> FastAPI:
    """Build the server for `base` (a models.FrozenModel) and the adapter folders under `adapters_dir`.

    `template`: the default template (for `base` and adapters saved without one). `api_key`: when set, every
    endpoint but /health (and /openapi.json, which carries no secrets) needs `Authorization: Bearer <api_key>`.
    `allow_admin`: enable POST /v1/adapters, DELETE /v1/adapters/{name} and POST /v1/adapters/rescan (otherwise
    403; with an api_key they need it too). `max_request_bytes`: the largest request body (413 beyond).
    `allowed_hosts`: Host names the server may be called as besides loopback names and the address a connection
    arrives on (["*"]: any; others get 421, against DNS rebinding). `allow_origins`: web origins allowed to call it
    (adds CORS; default none: a request carrying another Origin gets 403). The worker thread starts and stops with
    the app's lifespan.
    """
    if max_request_bytes < 1:
        raise ValueError("max_request_bytes must be >= 1")
    state = ServerState(base, adapters_dir, template=template, max_batch=max_batch, max_queue=max_queue,
                        max_tokens_cap=max_tokens_cap, max_model_len=max_model_len)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.scheduler.stop)

    async def authorise(request: Request):
        if api_key is None or request.url.path == "/health":
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided.", type="authentication_error", code="invalid_api_key")

    async def require_admin():
        if not allow_admin:
            raise APIError(403, "Adapter administration is disabled on this server: start it with --allow-admin "
                                "(create_app(..., allow_admin=True)) to add, remove or rescan adapters over HTTP"
                                + (" (and set --api-key when others can reach it)." if api_key is None else "."),
                           type="permission_error", code="admin_disabled")

    app = FastAPI(title="softprompt", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  dependencies=[Depends(authorise)],
                  description="OpenAI-compatible server for soft-prompt adapters on one frozen base model.")
    app.state.softprompt = state
    app.openapi = _openapi(app, api_key)
    _install_error_handlers(app)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts, allow_origins=allow_origins,
                       max_request_bytes=max_request_bytes)
    if allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.get("/health", responses={200: _json("Health", "the worker is running"),
                                   503: _json("Health", "the worker is not running")})
    async def health():
        stats = state.scheduler.snapshot()
        body = {"status": "ok" if stats["alive"] else "unavailable", "model": base.name,
                "adapters": len(state.registry.names()), "scheduler": stats}
        return JSONResponse(body, status_code=200 if stats["alive"] else 503)

    @app.get("/v1/models", responses={200: _json("ModelList", "the served models"), **_errors(401, 403, 421)})
    async def models():
        names = [BASE_NAME] + state.registry.names()
        cards = []
        for name in names:
            with contextlib.suppress(RegistryError):  # removed meanwhile
                cards.append(state.model_card(name))
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name}", responses={200: _json("ModelCard", "one served model"),
                                              **_errors(401, 403, 404, 421)})
    async def model(name: str):
        state.adapter_key(name)
        try:
            return state.model_card(name)
        except RegistryError as err:
            raise APIError(404, str(err), param="model", code="model_not_found") from None

    @app.post("/v1/completions", openapi_extra=_body("CompletionRequest"),
              responses=_generation_responses("Completion", "CompletionChunk"))
    async def completions(request: Request):
        raw = await _read_body(request, max_request_bytes)
        prepared = await _in_thread(state.prepare_completion, raw)
        return await _run(request, state, prepared, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_body("ChatRequest"),
              responses=_generation_responses("ChatCompletion", "ChatCompletionChunk"))
    async def chat_completions(request: Request):
        raw = await _read_body(request, max_request_bytes)
        prepared = await _in_thread(state.prepare_chat, raw)
        return await _run(request, state, prepared, chat=True)

    @app.post("/tokenize", openapi_extra=_body("TokenizeRequest"),
              responses={200: _json("TokenizeResponse", "the token ids (the adapter's virtual tokens not included)"),
                         **_errors(400, 401, 403, 404, 413, 415, 421)})
    async def tokenize(request: Request):
        raw = await _read_body(request, max_request_bytes)
        return await _in_thread(state.prepare_tokenize, raw)

    @app.post("/detokenize", openapi_extra=_body("DetokenizeRequest"),
              responses={200: _json("DetokenizeResponse", "the text of the token ids"),
                         **_errors(400, 401, 403, 404, 413, 415, 421)})
    async def detokenize(request: Request):
        raw = await _read_body(request, max_request_bytes)
        return await _in_thread(state.prepare_detokenize, raw)

    admin = [Depends(require_admin)]

    @app.post("/v1/adapters", status_code=201, dependencies=admin, openapi_extra=_body("AdapterAdd"),
              responses={201: _json("ModelCard", "the adapter is served"),
                         **_errors(400, 401, 403, 404, 409, 413, 415, 421)})
    async def add_adapter(request: Request):
        raw = await _read_body(request, max_request_bytes)
        body = await _in_thread(_validate, raw, AdapterAdd)
        await _in_thread(state.registry.add, body.name, body.path, body.replace)
        return JSONResponse(state.model_card(body.name), status_code=201)

    @app.delete("/v1/adapters/{name}", dependencies=admin,
                responses={200: _json("AdapterDeleted", "the adapter is no longer served"),
                           **_errors(400, 401, 403, 404, 409, 421)})
    async def remove_adapter(name: str):
        if name != BASE_NAME:
            validate_name(name)
        await _in_thread(state.registry.remove, name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/adapters/rescan", dependencies=admin,
              responses={200: _json("RescanReport", "what changed, and the folders not served with the reason"),
                         **_errors(400, 401, 403, 415, 421)})
    async def rescan():
        return await _in_thread(state.registry.rescan)

    return app


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of a prompt's choice `index` (n > 1 or best_of): choice 0 keeps the request's seed (so n=1 is
    unchanged), the others get distinct seeds derived from it; None stays None (fresh entropy per choice)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _asked_logprobs(body, chat: bool) -> int | None:
    """How many alternatives per token the client asked for (None: no logprobs at all)."""
    if chat:
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


async def _run(request: Request, state: ServerState, prepared: Prepared, chat: bool):
    """Submit one job per prompt and choice, then answer as JSON or as server-sent events."""
    body, key, prompts = prepared.body, prepared.key, prepared.prompts
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    candidates = body.n if chat else body.candidates()
    asked = _asked_logprobs(body, chat)
    # best_of ranks candidates by their summed log-probability, so it needs the chosen tokens' log-probabilities
    track = asked if asked is not None else (0 if candidates > body.n else None)
    temperature, top_k, top_p = body.sampling()
    bias = body.bias() or None
    jobs, slots = [], []  # slots[i] = (prompt index, candidate index) of jobs[i]
    for p, (ids, limit) in enumerate(zip(prompts, prepared.limits)):
        if limit == 0:
            continue
        for c in range(candidates):
            gen = ServeRequest(prompt_ids=ids, adapter=key, max_new_tokens=limit, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=choice_seed(body.seed, c), stop=body.stop_list(),
                               id=(p, c), presence_penalty=body.presence_penalty,
                               frequency_penalty=body.frequency_penalty, logit_bias=bias, logprobs=track)
            jobs.append(Job(gen, lambda item, i=len(jobs): events.put_nowait((i, item)), loop))
            slots.append((p, c))
    try:
        if jobs:
            state.scheduler.submit_many(jobs)
        elif not state.scheduler.alive:
            raise Unavailable("the generation worker is not running")
    except (Overloaded, Unavailable) as err:
        status, kind = (429, "rate_limit_error") if isinstance(err, Overloaded) else (503, "server_error")
        raise APIError(status, str(err), type=kind, code="server_overloaded" if status == 429 else "unavailable",
                       headers={"Retry-After": "1"})

    def cancel_all():
        for job in jobs:
            state.scheduler.cancel(job)

    reply = _Reply(state, prepared, jobs, slots, chat, candidates, asked)
    if not chat and body.echo and asked is not None:
        def score():
            return [prompt_logprobs(state.base, state.cache, key, ids, asked) for ids in prompts]

        try:
            reply.prompt_scores = await run_in_threadpool(state.scheduler.run, score)
        except BaseException as err:
            cancel_all()
            raise _as_api_error(err) from err

    if body.stream:
        return _EventStream(reply.stream(events), events, on_close=cancel_all, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_watch_disconnect(request, events))
    try:
        return JSONResponse(await reply.collect(events))
    except ClientGone:
        return Response(status_code=499)
    finally:
        watcher.cancel()
        cancel_all()


async def _watch_disconnect(request: Request, events: asyncio.Queue) -> None:
    """Wait for the client to go away (the body is already read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            events.put_nowait((-1, ClientGone()))
            return


class _EventStream(StreamingResponse):
    """A streaming response that notices a disconnect even while no token is being sent (e.g. the request still
    waits for a batch slot), and runs `on_close` however it ends (finished, client gone, error)."""

    def __init__(self, content, events: asyncio.Queue, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send):
        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_close()
            self.events.put_nowait((-1, ClientGone()))  # ends the event generator

        watcher = asyncio.create_task(watch())
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            self.on_close()


class _Reply:
    """Turns the TokenEvents of a request's jobs into OpenAI response objects.

    Choice i * n + j is prompt i's j-th choice. With best_of > n, each prompt's n candidates with the highest summed
    token log-probability are returned (in the order they were sampled)."""

    def __init__(self, state: ServerState, prepared: Prepared, jobs: list[Job], slots: list[tuple[int, int]],
                 chat: bool, candidates: int, asked: int | None):
        self.state, self.prepared, self.body, self.jobs, self.slots = state, prepared, prepared.body, jobs, slots
        self.chat, self.candidates, self.asked = chat, candidates, asked
        self.n = self.body.n
        self.echo = not chat and self.body.echo
        self.prompt_scores: list[list[TokenLogprobs]] | None = None
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._strings: dict[int, str] = {}

    def usage(self) -> dict:
        prompt = sum(self.prepared.virtual + len(p) for p in self.prepared.prompts)
        completion = sum(job.tokens for job in self.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                "system_fingerprint": None, "choices": choices}

    # ---- log-probabilities -----------------------------------------------------------------------------------
    def token_string(self, token: int) -> str:
        text = self._strings.get(token)
        if text is None:
            text = self._strings[token] = self.state.tokenizer.decode([token])
        return text

    def legacy_logprobs(self, entries: list[TokenLogprobs], offset: int = 0) -> dict:
        """OpenAI's completions logprobs object for `entries`, text offsets counted from `offset`."""
        tokens, values, tops, offsets = [], [], [], []
        for entry in entries:
            text = self.token_string(entry.token_id)
            tokens.append(text)
            values.append(entry.logprob)
            if entry.logprob is None:
                tops.append(None)
            else:
                top = {self.token_string(t): v for t, v in reversed(entry.top or [])}  # most likely wins a clash
                top.setdefault(text, entry.logprob)
                tops.append(dict(sorted(top.items(), key=lambda kv: -kv[1])))
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprobs]) -> dict:
        def item(token: int, value: float) -> dict:
            text = self.token_string(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(e.token_id, e.logprob),
                             "top_logprobs": [item(t, v) for t, v in (e.top or [])]} for e in entries]}

    def echo_part(self, prompt: int) -> tuple[str, list[TokenLogprobs]]:
        """(echoed text, its token log-probabilities) of a prompt ('' and [] without echo)."""
        if not self.echo:
            return "", []
        return self.prepared.texts[prompt], (self.prompt_scores[prompt] if self.prompt_scores is not None else [])

    # ---- whole answers -----------------------------------------------------------------------------------------
    async def collect(self, events: asyncio.Queue) -> dict:
        count = len(self.jobs)
        texts, reasons = [""] * count, [None] * count
        scores: list[list[TokenLogprobs]] = [[] for _ in range(count)]
        remaining = count
        while remaining:
            index, item = await events.get()
            if isinstance(item, BaseException):
                raise item if isinstance(item, ClientGone) else _as_api_error(item)
            texts[index] += item.text
            if getattr(item, "logprobs", None) is not None:
                scores[index].append(item.logprobs)
            if item.finish_reason is not None:
                reasons[index] = item.finish_reason
                remaining -= 1
        by_prompt: dict[int, list[int]] = {}
        for index, (p, _) in enumerate(self.slots):
            by_prompt.setdefault(p, []).append(index)
        choices = []
        for p in range(len(self.prepared.prompts)):
            picked = by_prompt.get(p)
            if picked is not None and len(picked) > self.n:  # best_of: the n most likely candidates
                best = sorted(picked, key=lambda i: -sum(e.logprob for e in scores[i]))[:self.n]
                picked = sorted(best)
            echo_text, echo_scores = self.echo_part(p)
            for j in range(self.n):
                index = len(choices)
                if picked is None:  # max_tokens 0: the echoed prompt only
                    text, entries, reason = echo_text, echo_scores, "length"
                else:
                    i = picked[j]
                    text, entries, reason = echo_text + texts[i], echo_scores + scores[i], reasons[i]
                if self.chat:
                    choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                    "logprobs": self.chat_logprobs(entries) if self.asked is not None else None,
                                    "finish_reason": reason})
                else:
                    choices.append({"index": index, "text": text,
                                    "logprobs": self.legacy_logprobs(entries) if self.asked is not None else None,
                                    "finish_reason": reason})
        return {**self._envelope(self.object, choices), "usage": self.usage()}

    # ---- streams -----------------------------------------------------------------------------------------------
    def _chunk(self, index: int, text: str | None, reason: str | None, role: bool = False,
               logprobs: dict | None = None) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            data = self._envelope("chat.completion.chunk", [choice])
        else:
            data = self._envelope("text_completion", [{"index": index, "text": text or "", "logprobs": logprobs,
                                                       "finish_reason": reason}])
        return _sse(data)

    async def stream(self, events: asyncio.Queue):
        prompts = len(self.prepared.prompts)
        offsets = [0] * (prompts * self.n)  # per choice: characters sent so far (text_offset)
        if self.chat:
            for i in range(self.n):
                yield self._chunk(i, None, None, role=True)
        for p in range(prompts):  # echo: the prompt first; max_tokens 0: nothing else follows
            echo_text, echo_scores = self.echo_part(p)
            if not self.echo:
                continue
            only = self.prepared.limits[p] == 0
            for j in range(self.n):
                index = p * self.n + j
                logprobs = self.legacy_logprobs(echo_scores) if self.asked is not None else None
                yield self._chunk(index, echo_text, "length" if only else None, logprobs=logprobs)
                offsets[index] = len(echo_text)
        remaining = len(self.jobs)
        while remaining:
            index, item = await events.get()
            if isinstance(item, ClientGone):
                return
            if isinstance(item, BaseException):
                yield _sse(_as_api_error(item).body())
                break
            p, c = self.slots[index]
            choice = p * self.n + c
            entry = getattr(item, "logprobs", None)
            logprobs = None
            if self.asked is not None and entry is not None:
                if self.chat:
                    logprobs = self.chat_logprobs([entry])
                else:
                    logprobs = self.legacy_logprobs([entry], offsets[choice])
                    offsets[choice] += len(self.token_string(entry.token_id))
            if item.text or item.finish_reason is not None or logprobs is not None:
                yield self._chunk(choice, item.text, item.finish_reason, logprobs=logprobs)
            if item.finish_reason is not None:
                remaining -= 1
        options = self.body.stream_options
        if remaining == 0 and options is not None and options.include_usage:
            yield _sse({**self._envelope("chat.completion.chunk" if self.chat else "text_completion", []),
                        "usage": self.usage()})
        yield "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _as_api_error(err: BaseException) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, UnknownAdapterError):
        return APIError(404, f"the model was removed while the request waited: {err}", param="model",
                        code="model_not_found")
    if isinstance(err, Unavailable):
        return APIError(503, str(err), type="server_error", code="unavailable")
    if isinstance(err, ValueError):
        return APIError(400, str(err))
    return APIError(500, f"generation failed: {err}", type="server_error", code="internal_error")


class ErrorJSON(JSONResponse):
    """Errors are rendered ASCII-only, so an echoed piece of a request (a model name, a key) can never fail to
    encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error_response(err: APIError) -> Response:
    return ErrorJSON(err.body(), status_code=err.status, headers=err.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return _error_response(err)

    @app.exception_handler(RegistryError)
    async def registry_error(request, err: RegistryError):
        return _error_response(_as_client_error(err))

    @app.exception_handler(RequestValidationError)
    async def request_validation(request, err: RequestValidationError):
        return _error_response(APIError(400, str(err)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return _error_response(APIError(err.status_code, str(err.detail), headers=getattr(err, "headers", None)))

    @app.exception_handler(Exception)
    async def internal(request, err: Exception):
        if isinstance(err, CLIENT_ERRORS):  # raised by what the request contained: the client's mistake
            return _error_response(_as_client_error(err))
        return _error_response(APIError(500, f"internal error: {err!r}", type="server_error", code="internal_error"))
