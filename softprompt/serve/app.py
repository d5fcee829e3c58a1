"""The OpenAI-compatible HTTP server: many adapters on one frozen base model (FastAPI).

    app = create_app(load_base(), "adapters/")     # every adapter sub-folder, plus the base model as `base`
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /health, GET /v1/models[/{name}], POST /v1/completions, POST /v1/chat/completions (both with
`stream`, `n`, `logprobs`, penalties and logit_bias; completions also take token-id prompts, `echo` and `best_of`),
POST /tokenize and /detokenize (as vLLM names them), and the admin endpoints POST /v1/adapters,
DELETE /v1/adapters/{name}, POST /v1/adapters/rescan (off unless allow_admin=True: 403). Requests for any mix of
adapters share one continuously batched DecodeBatch (scheduler.py). Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}}; a mistake in a request is a 4xx, never a 5xx (and never FastAPI's
422). /openapi.json (openapi.py) publishes the request and response models (schemas.py) and is open even with an
api_key (it carries no secrets). Request validation lives in state.py, running a request and its replies in
replies.py.

Status codes: 400 invalid request (param names the field), 401 wrong/missing API key, 403 admin endpoints disabled
or a cross-origin request, 404 unknown model/adapter, 409 name clash, 413 body over max_request_bytes, 415 body not
JSON, 421 Host header not this server (DNS rebinding), 429 queue full (Retry-After), 503 worker stopped.

Requests are validated completely (JSON, schema, model, template, tokens, context, capacity) before any response
starts, so a streamed request either gets a 400 or a 200 stream. Parsing, templating and tokenising run in a thread
pool, never on the event loop, so a large body never stalls other clients or /health.
"""

from __future__ import annotations

import contextlib
import hmac
import json

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from softprompt.data.templates import CHAT, HUMAN_ASSISTANT, Template
from softprompt.formats.adapter import NAME_MAX, NAME_PATTERN
from softprompt.serve.config import ServeConfig
from softprompt.serve.openapi import error_responses, generation_responses, json_body, json_response, openapi_for
from softprompt.serve.registry import BASE_NAME, RegistryError, validate_name
from softprompt.serve.replies import run_generation
from softprompt.serve.schemas import AdapterAdd, APIError
from softprompt.serve.security import Guard
from softprompt.serve.state import CLIENT_ERRORS, ServerState, as_client_error, in_thread, read_body, validate_body


def _lifespan(state: ServerState):
    """The app's lifespan: the worker thread starts with the app and stops with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.scheduler.stop)

    return lifespan


def create_app(base, config: ServeConfig | None = None, template: Template | None = None) -> FastAPI:
    """Build the server for `base` (a models.FrozenModel) as `config` says (ServeConfig: the adapters folder, limits,
    access control; `config.model`, host and port are run_server's). `template`: the default template for `base`
    and adapters saved without one (default: the chat template with `config.chat_template`, else human-assistant).
    The worker thread starts and stops with the app's lifespan. The keyword form is
    `softprompt.create_app(base, adapters_dir, **options)`.
    """
    config = config if config is not None else ServeConfig()
    if template is None:
        template = Template(CHAT if config.chat_template else HUMAN_ASSISTANT)
    state = ServerState(base, config, template)
    api_key, allow_admin = config.api_key, config.allow_admin

    async def authorise(request: Request):
        if api_key is None or request.url.path == "/health":
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided.", type="authentication_error", code="invalid_api_key")

    async def require_admin():
        if not allow_admin:
            raise APIError(
                403,
                "Adapter administration is disabled on this server: start it with --allow-admin "
                "(create_app(..., allow_admin=True)) to add, remove or rescan adapters over HTTP"
                + (" (and set --api-key when others can reach it)." if api_key is None else "."),
                type="permission_error",
                code="admin_disabled",
            )

    app = FastAPI(
        title="softprompt",
        version="1",
        lifespan=_lifespan(state),
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(authorise)],
        description="OpenAI-compatible server for soft-prompt adapters on one frozen base model.",
    )
    app.state.softprompt = state
    app.openapi = openapi_for(app, api_key)
    _install_error_handlers(app)
    app.add_middleware(
        Guard,
        allowed_hosts=config.allowed_hosts,
        allow_origins=config.allow_origins,
        max_request_bytes=config.max_request_bytes,
    )
    if config.allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allow_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    routers = [
        _model_routes(state),
        _generation_routes(state, config.max_request_bytes),
        _admin_routes(state, config.max_request_bytes),
    ]
    app.include_router(routers[0])
    app.include_router(routers[1])
    app.include_router(routers[2], dependencies=[Depends(require_admin)])
    app.state.routers = routers  # for the Allow header of a 405 (allowed_methods)
    return app


def _model_routes(state: ServerState) -> APIRouter:
    """GET /health, /v1/models, /v1/models/{name}."""
    router = APIRouter()

    @router.get(
        "/health",
        responses={
            200: json_response("Health", "the worker is running"),
            503: json_response("Health", "the worker is not running"),
        },
    )
    async def health():
        stats = state.scheduler.snapshot()
        prefix = state.prefix_cache.stats().as_dict() if state.prefix_cache is not None else None
        body = {
            "status": "ok" if stats["alive"] else "unavailable",
            "model": state.base.name,
            "adapters": len(state.registry.names()),
            "scheduler": stats,
            "prefix_cache": prefix,
        }
        return JSONResponse(body, status_code=200 if stats["alive"] else 503)

    @router.get(
        "/v1/models", responses={200: json_response("ModelList", "the served models"), **error_responses(401, 403, 421)}
    )
    async def models():
        names = [BASE_NAME] + state.registry.names()
        cards = []
        for name in names:
            with contextlib.suppress(RegistryError):  # removed meanwhile
                cards.append(state.model_card(name))
        return {"object": "list", "data": cards}

    @router.get(
        "/v1/models/{name}",
        responses={200: json_response("ModelCard", "one served model"), **error_responses(401, 403, 404, 421)},
    )
    async def model(name: str):
        state.adapter_key(name)
        try:
            return state.model_card(name)
        except RegistryError as err:
            raise APIError(404, str(err), param="model", code="model_not_found") from None

    return router


def _generation_routes(state: ServerState, max_request_bytes: int) -> APIRouter:
    """POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize."""
    router = APIRouter()

    @router.post(
        "/v1/completions",
        openapi_extra=json_body("CompletionRequest"),
        responses=generation_responses("Completion", "CompletionChunk"),
    )
    async def completions(request: Request):
        raw = await read_body(request, max_request_bytes)
        prepared = await in_thread(state.prepare_completion, raw)
        return await run_generation(request, state, prepared, chat=False)

    @router.post(
        "/v1/chat/completions",
        openapi_extra=json_body("ChatRequest"),
        responses=generation_responses("ChatCompletion", "ChatCompletionChunk"),
    )
    async def chat_completions(request: Request):
        raw = await read_body(request, max_request_bytes)
        prepared = await in_thread(state.prepare_chat, raw)
        return await run_generation(request, state, prepared, chat=True)

    @router.post(
        "/tokenize",
        openapi_extra=json_body("TokenizeRequest"),
        responses={
            200: json_response("TokenizeResponse", "the token ids (the adapter's virtual tokens not included)"),
            **error_responses(400, 401, 403, 404, 413, 415, 421),
        },
    )
    async def tokenize(request: Request):
        raw = await read_body(request, max_request_bytes)
        return await in_thread(state.prepare_tokenize, raw)

    @router.post(
        "/detokenize",
        openapi_extra=json_body("DetokenizeRequest"),
        responses={
            200: json_response("DetokenizeResponse", "the text of the token ids"),
            **error_responses(400, 401, 403, 404, 413, 415, 421),
        },
    )
    async def detokenize(request: Request):
        raw = await read_body(request, max_request_bytes)
        return await in_thread(state.prepare_detokenize, raw)

    return router


def _admin_routes(state: ServerState, max_request_bytes: int) -> APIRouter:
    """POST /v1/adapters, DELETE /v1/adapters/{name}, POST /v1/adapters/rescan (the caller adds the admin check)."""
    router = APIRouter()

    @router.post(
        "/v1/adapters",
        status_code=201,
        openapi_extra=json_body("AdapterAdd"),
        responses={
            201: json_response("ModelCard", "the adapter is served"),
            **error_responses(400, 401, 403, 404, 409, 413, 415, 421),
        },
    )
    async def add_adapter(request: Request):
        raw = await read_body(request, max_request_bytes)
        body = await in_thread(validate_body, raw, AdapterAdd)
        await in_thread(state.registry.add, body.name, body.path, body.replace)
        return JSONResponse(state.model_card(body.name), status_code=201)

    @router.delete(
        "/v1/adapters/{name}",
        responses={
            200: json_response("AdapterDeleted", "the adapter is no longer served"),
            **error_responses(400, 401, 403, 404, 409, 421),
        },
    )
    async def remove_adapter(name: str = Path(json_schema_extra={"pattern": NAME_PATTERN, "maxLength": NAME_MAX})):
        if name != BASE_NAME:
            validate_name(name)
        await in_thread(state.registry.remove, name)
        return {"id": name, "object": "model", "deleted": True}

    @router.post(
        "/v1/adapters/rescan",
        responses={
            200: json_response("RescanReport", "what changed, and the folders not served with the reason"),
            **error_responses(400, 401, 403, 415, 421),
        },
    )
    async def rescan():
        return await in_thread(state.registry.rescan)

    return router


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some endpoint of `app` takes at `path` (for the Allow header of a 405)."""
    methods = set()
    for router in app.state.routers:
        for route in router.routes:
            if route.path_regex.match(path):
                methods |= set(route.methods)
    return sorted(methods)


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
        return _error_response(as_client_error(err))

    @app.exception_handler(RequestValidationError)
    async def request_validation(request, err: RequestValidationError):
        return _error_response(APIError(400, str(err)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        headers = getattr(err, "headers", None)
        if err.status_code == 405:  # Starlette names only the first route of the path; list every method it takes
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request.url.path))}
        return _error_response(APIError(err.status_code, str(err.detail), headers=headers))

    @app.exception_handler(ClientDisconnect)
    async def client_left(request, err: ClientDisconnect):
        # the client closed the connection before sending its whole body: nobody is left to answer, and it is
        # not the server's failure (no traceback in the log)
        return _error_response(
            APIError(400, "The client closed the connection before sending the whole body.", code="client_disconnected")
        )

    @app.exception_handler(Exception)
    async def internal(request, err: Exception):
        if isinstance(err, CLIENT_ERRORS):  # raised by what the request contained: the client's mistake
            return _error_response(as_client_error(err))
        return _error_response(APIError(500, f"internal error: {err!r}", type="server_error", code="internal_error"))
