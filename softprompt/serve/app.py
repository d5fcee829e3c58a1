"""The OpenAI-compatible HTTP server: many adapters on one frozen base model (FastAPI).

    app = create_app(load_base(), "adapters/")     # every adapter sub-folder, plus the base model as `base`
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /health, GET /v1/models[/{name}], POST /v1/completions, POST /v1/chat/completions (both with
`stream`), POST /v1/adapters, DELETE /v1/adapters/{name}, POST /v1/adapters/rescan. Requests for any mix of
adapters share one continuously batched DecodeBatch (scheduler.py). Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.inference.engine import DecodeBatch, GenerationRequest, context_length
from softprompt.inference.prompt_cache import PromptCache, UnknownAdapterError
from softprompt.data.templates import Template, TemplateError, encode_text
from softprompt.serve.registry import BASE_NAME, AdapterRegistry, RegistryError, validate_name
from softprompt.serve.scheduler import Job, Overloaded, Scheduler, Unavailable
from softprompt.serve.schemas import AdapterAdd, APIError, ChatRequest, CompletionRequest, validation_error

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


class ServerState:
    """What the endpoints share: base model, adapters, worker and limits."""

    def __init__(self, base, adapters_dir, *, template: Template | None, max_batch: int, max_queue: int,
                 max_tokens_cap: int, max_model_len: int | None):
        self.base = base
        self.tokenizer = copy.deepcopy(base.tokenizer)  # the worker thread decodes with base.tokenizer
        self.cache = PromptCache(base, template or Template())
        self.scheduler = Scheduler(lambda: DecodeBatch(base, self.cache), max_batch, max_queue)
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

    def max_tokens(self, asked: int | None, default: int | None, used: int) -> int:
        """The completion budget: checked against the server cap and the context left after `used` tokens."""
        if asked is not None and asked > self.max_tokens_cap:
            raise APIError(400, f"max_tokens is too large: {asked}. This server allows at most "
                                f"{self.max_tokens_cap} completion tokens (--max-tokens-cap).",
                           param="max_tokens", code="invalid_value")
        room = self.context - used if self.context else self.max_tokens_cap
        limit = asked if asked is not None else min(default or self.max_tokens_cap, self.max_tokens_cap, room)
        if self.context and (used + limit > self.context or limit < 1):
            limit = max(limit, 1)
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {used + limit} tokens ({used} in the prompt, including the adapter's "
                                f"virtual tokens; {limit} for the completion). Please reduce the prompt or "
                                "max_tokens.", param="messages" if asked is None else "max_tokens",
                           code="context_length_exceeded")
        return limit


def create_app(base, adapters_dir=None, *, template: Template | None = None, max_batch: int = 16,
               max_queue: int = 64, max_tokens_cap: int = 2048, max_model_len: int | None = None,
               api_key: str | None = None) -> FastAPI:
    """Build the server for `base` (a models.FrozenModel) and the adapter folders under `adapters_dir`.

    `template`: the default template (for `base` and adapters saved without one). `api_key`: when set, every
    endpoint but /health needs `Authorization: Bearer <api_key>`. The worker thread starts and stops with the app's
    lifespan.
    """
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
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided.", type="authentication_error", code="invalid_api_key")

    app = FastAPI(title="softprompt", lifespan=lifespan, docs_url=None, redoc_url=None,
                  dependencies=[Depends(authorise)])
    app.state.softprompt = state
    _install_error_handlers(app)

    @app.get("/health")
    async def health():
        stats = state.scheduler.snapshot()
        body = {"status": "ok" if stats["alive"] else "unavailable", "model": base.name,
                "adapters": len(state.registry.names()), "scheduler": stats}
        return JSONResponse(body, status_code=200 if stats["alive"] else 503)

    @app.get("/v1/models")
    async def models():
        names = [BASE_NAME] + state.registry.names()
        return {"object": "list", "data": [state.model_card(n) for n in names if state.registry.has(n)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        state.adapter_key(name)
        return state.model_card(name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        key = state.adapter_key(body.model)
        n = state.cache.num_virtual_tokens(key)
        prompts = [encode_text(state.tokenizer, p) for p in body.prompts()]
        if any(not ids for ids in prompts):
            raise APIError(400, "prompt is empty: give at least one token of text", param="prompt")
        limits = [state.max_tokens(body.max_tokens, DEFAULT_COMPLETION_TOKENS, n + len(ids)) for ids in prompts]
        return await _run(request, state, body, key, prompts, limits, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatRequest)
        key = state.adapter_key(body.model)
        try:
            text = state.cache.template(key).chat_prompt(body.as_dicts(), state.tokenizer)
        except UnknownAdapterError:
            raise APIError(404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found")
        except TemplateError as err:
            raise APIError(400, str(err), param="messages") from err
        ids = encode_text(state.tokenizer, text)
        if not ids:
            raise APIError(400, "the formatted conversation is empty", param="messages")
        limit = state.max_tokens(body.limit(), None, state.cache.num_virtual_tokens(key) + len(ids))
        return await _run(request, state, body, key, [ids], [limit], chat=True)

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(request: Request):
        body = await _parse(request, AdapterAdd)
        await run_in_threadpool(state.registry.add, body.name, body.path, body.replace)
        return JSONResponse(state.model_card(body.name), status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str):
        if name != BASE_NAME:
            validate_name(name)
        await run_in_threadpool(state.registry.remove, name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/adapters/rescan")
    async def rescan():
        return await run_in_threadpool(state.registry.rescan)

    return app


async def _parse(request: Request, model):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"We could not parse the JSON body of your request: {err}", code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


async def _run(request: Request, state: ServerState, body, key: str | None, prompts: list[list[int]],
               limits: list[int], chat: bool):
    """Submit one job per prompt, then answer as JSON or as server-sent events."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    jobs = []
    for index, (ids, limit) in enumerate(zip(prompts, limits)):
        greedy = body.temperature == 0
        gen = GenerationRequest(prompt_ids=ids, adapter=key, max_new_tokens=limit, temperature=body.temperature,
                                top_k=0 if greedy else body.top_k, top_p=1.0 if greedy else body.top_p,
                                seed=body.seed, stop=body.stop_list(), id=index)
        jobs.append(Job(gen, lambda item, i=index: events.put_nowait((i, item)), loop))
    try:
        for job in jobs:
            state.scheduler.submit(job)
    except (Overloaded, Unavailable) as err:
        for job in jobs:
            state.scheduler.cancel(job)
        status, kind = (429, "rate_limit_error") if isinstance(err, Overloaded) else (503, "server_error")
        raise APIError(status, str(err), type=kind, code="server_overloaded" if status == 429 else "unavailable",
                       headers={"Retry-After": "1"})
    reply = _Reply(state, body, jobs, prompts, chat)

    def cancel_all():
        for job in jobs:
            state.scheduler.cancel(job)

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
    """Turns the TokenEvents of a request's jobs into OpenAI response objects."""

    def __init__(self, state: ServerState, body, jobs: list[Job], prompts: list[list[int]], chat: bool):
        self.state, self.body, self.jobs, self.prompts, self.chat = state, body, jobs, prompts, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(job.tokens for job in self.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.body.model,
                "system_fingerprint": None, "choices": choices}

    async def collect(self, events: asyncio.Queue) -> dict:
        texts, reasons = [""] * len(self.jobs), [None] * len(self.jobs)
        remaining = len(self.jobs)
        while remaining:
            index, item = await events.get()
            if isinstance(item, BaseException):
                raise item if isinstance(item, ClientGone) else _as_api_error(item)
            texts[index] += item.text
            if item.finish_reason is not None:
                reasons[index] = item.finish_reason
                remaining -= 1
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**self._envelope(self.object, choices), "usage": self.usage()}

    def _chunk(self, index: int, text: str | None, reason: str | None, role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            data = self._envelope("chat.completion.chunk", [choice])
        else:
            data = self._envelope("text_completion", [{"index": index, "text": text or "", "logprobs": None,
                                                       "finish_reason": reason}])
        return _sse(data)

    async def stream(self, events: asyncio.Queue):
        if self.chat:
            for i in range(len(self.jobs)):
                yield self._chunk(i, None, None, role=True)
        remaining = len(self.jobs)
        while remaining:
            index, item = await events.get()
            if isinstance(item, ClientGone):
                return
            if isinstance(item, BaseException):
                yield _sse(_as_api_error(item).body())
                break
            if item.text or item.finish_reason is not None:
                yield self._chunk(index, item.text, item.finish_reason)
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


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RegistryError)
    async def registry_error(request, err: RegistryError):
        code = {404: "model_not_found", 409: "conflict"}.get(err.status, "invalid_value")
        return JSONResponse(APIError(err.status, str(err), code=code).body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request, err: RequestValidationError):
        return JSONResponse(APIError(400, str(err)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request, err: Exception):
        return JSONResponse(APIError(500, f"internal error: {err!r}", type="server_error",
                                     code="internal_error").body(), status_code=500)
