"""The endpoints, one router per group, each handler a few lines along a request's path: read the body
(body.py), validate it in the thread pool (validation.py: protocol.py's models, then what this server serves), run
it (replies.py) or answer from the state (state.py), always with a responses.py model.

- models: GET /health, /v1/models, /v1/models/{name};
- generation: POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize;
- admin: POST /v1/adapters, DELETE /v1/adapters/{name}, POST /v1/adapters/rescan (the app adds the admin check).

Parsing, templating and tokenising run in the thread pool, never on the event loop, so a large body never stalls
other clients or /health.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from softprompt.formats.adapter import NAME_MAX, NAME_PATTERN
from softprompt.runtime import release_openmp_threads
from softprompt.serve.body import read_body, validate_body
from softprompt.serve.errors import RegistryError, as_api_error, model_not_found
from softprompt.serve.openapi import error_responses, generation_responses, json_body, json_response
from softprompt.serve.protocol import AdapterAdd
from softprompt.serve.registry import BASE_NAME, validate_name
from softprompt.serve.replies import run_generation
from softprompt.serve.responses import AdapterDeleted, RescanReport
from softprompt.serve.state import ServerState
from softprompt.serve.validation import (
    pin_prefix,
    prepare_chat,
    prepare_completion,
    prepare_detokenize,
    prepare_tokenize,
)

REQUEST_ERRORS = error_responses(400, 401, 403, 404, 413, 415, 421)


def _releasing(fn, *args):
    """fn(*args), then this pool thread gives back any OpenMP threads it started (an adapter's keys/values are
    computed here): the scheduler's worker keeps the only team (runtime.release_openmp_threads)."""
    try:
        return fn(*args)
    finally:
        release_openmp_threads()


async def in_thread(fn, *args):
    """Run request handling in the thread pool; its client mistakes come back as APIErrors (4xx). The server's
    own failures propagate as they are (the app answers 500 and the log keeps the traceback)."""
    try:
        return await run_in_threadpool(_releasing, fn, *args)
    except Exception as err:
        answer = as_api_error(err)
        if answer.status >= 500:
            raise
        raise answer from err


def model_routes(state: ServerState) -> APIRouter:
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
        answer = state.health()
        return JSONResponse(answer.wire(), status_code=200 if answer.status == "ok" else 503)

    @router.get(
        "/v1/models", responses={200: json_response("ModelList", "the served models"), **error_responses(401, 403, 421)}
    )
    async def models():
        return state.model_list().wire()

    @router.get(
        "/v1/models/{name}",
        responses={200: json_response("ModelCard", "one served model"), **error_responses(401, 403, 404, 421)},
    )
    async def model(name: str):
        state.adapter_key(name)
        try:
            return state.model_card(name).wire()
        except RegistryError:
            raise model_not_found(name) from None

    return router


def generation_routes(state: ServerState, max_request_bytes: int) -> APIRouter:
    """POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize."""
    router = APIRouter()

    async def generate(request: Request, prepare, chat: bool):
        prepared = await in_thread(prepare, state, await read_body(request, max_request_bytes))
        return await run_generation(request, state, prepared, chat=chat)

    @router.post(
        "/v1/completions",
        openapi_extra=json_body("CompletionRequest"),
        responses=generation_responses("Completion", "CompletionChunk"),
    )
    async def completions(request: Request):
        return await generate(request, prepare_completion, chat=False)

    @router.post(
        "/v1/chat/completions",
        openapi_extra=json_body("ChatRequest"),
        responses=generation_responses("ChatCompletion", "ChatCompletionChunk"),
    )
    async def chat_completions(request: Request):
        return await generate(request, prepare_chat, chat=True)

    @router.post(
        "/tokenize",
        openapi_extra=json_body("TokenizeRequest"),
        responses={
            200: json_response("TokenizeResponse", "the token ids (the adapter's virtual tokens not included)"),
            **REQUEST_ERRORS,
        },
    )
    async def tokenize(request: Request):
        raw = await read_body(request, max_request_bytes)
        return (await in_thread(prepare_tokenize, state, raw)).wire()

    @router.post(
        "/detokenize",
        openapi_extra=json_body("DetokenizeRequest"),
        responses={200: json_response("DetokenizeResponse", "the text of the token ids"), **REQUEST_ERRORS},
    )
    async def detokenize(request: Request):
        raw = await read_body(request, max_request_bytes)
        return (await in_thread(prepare_detokenize, state, raw)).wire()

    return router


def admin_routes(state: ServerState, max_request_bytes: int) -> APIRouter:
    """POST /v1/adapters, DELETE /v1/adapters/{name}, POST /v1/adapters/rescan, POST /v1/prefixes (the caller adds
    the admin check)."""
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
        return JSONResponse(state.model_card(body.name).wire(), status_code=201)

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
        return AdapterDeleted(id=name, object="model", deleted=True).wire()

    @router.post(
        "/v1/prefixes",
        openapi_extra=json_body("PrefixPin"),
        responses={
            200: json_response("PrefixPinned", "the prompt start is pinned (or unpinned) in the prefix cache"),
            **error_responses(400, 401, 403, 404, 413, 415, 421),
        },
    )
    async def prefixes(request: Request):
        raw = await read_body(request, max_request_bytes)
        return (await in_thread(pin_prefix, state, raw)).wire()

    @router.post(
        "/v1/adapters/rescan",
        responses={
            200: json_response("RescanReport", "what changed, and the folders not served with the reason"),
            **error_responses(400, 401, 403, 415, 421),
        },
    )
    async def rescan():
        return RescanReport(**await in_thread(state.registry.rescan)).wire()

    return router


def allowed_methods(routers: list[APIRouter], path: str) -> list[str]:
    """Every method some endpoint of `routers` takes at `path` (for the Allow header of a 405)."""
    methods = set()
    for router in routers:
        for route in router.routes:
            if route.path_regex.match(path):
                methods |= set(route.methods)
    return sorted(methods)


def include(app: FastAPI, state: ServerState, max_request_bytes: int, admin_dependencies: list) -> list[APIRouter]:
    """Add every router to `app` (the admin one behind `admin_dependencies`); returns them."""
    routers = [model_routes(state), generation_routes(state, max_request_bytes), admin_routes(state, max_request_bytes)]
    app.include_router(routers[0])
    app.include_router(routers[1])
    app.include_router(routers[2], dependencies=admin_dependencies)
    return routers
