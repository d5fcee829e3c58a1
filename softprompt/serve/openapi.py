"""The published /openapi.json: the real request and response models (protocol.py, responses.py), the error
schema on every documented 4xx, `text/event-stream` for streams, and no 422 (the server never answers it)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from softprompt.serve.protocol import REQUEST_MODELS
from softprompt.serve.responses import RESPONSE_MODELS


def schema_ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_response(name: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema_ref(name)}}}


_ERRORS = {
    400: "invalid request (`param` names the field)",
    401: "missing or wrong API key",
    403: "admin endpoints disabled, or a cross-origin request",
    404: "unknown model or adapter",
    409: "name clash",
    413: "request body too large",
    415: "request body is not JSON",
    421: "Host header not this server",
    429: "the queue is full (Retry-After)",
    503: "the worker is not running",
}


def error_responses(*codes: int) -> dict:
    return {code: json_response("ErrorResponse", _ERRORS[code]) for code in codes}


def json_body(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema_ref(name)}}}}


def generation_responses(name: str, chunk: str) -> dict:
    return {
        200: {
            "description": f"a {name}; with `stream: true`, server-sent events: `data: <{chunk}>` per chunk, "
            "then `data: [DONE]`",
            "content": {
                "application/json": {"schema": schema_ref(name)},
                "text/event-stream": {
                    "schema": {"type": "string", "description": f"data: {chunk} JSON lines"},
                    "x-event-schema": schema_ref(chunk),
                },
            },
        },
        **error_responses(400, 401, 403, 404, 413, 415, 421, 429, 503),
    }


def openapi_for(app: FastAPI, api_key: str | None):
    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema(
            [(m, "validation") for m in REQUEST_MODELS + RESPONSE_MODELS], ref_template="#/components/schemas/{model}"
        )
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
