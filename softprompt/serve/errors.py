"""The server's errors: `APIError` (an answer in OpenAI's error shape, `responses.ErrorResponse`), `RegistryError`
(a bad, unknown or clashing adapter), the one table that turns any exception into the status it stands for
(`as_api_error`), the handlers that answer them, and each client-facing message that more than one place gives,
written once here.

The table, by exception (`during` is REQUEST while a request is read and validated, GENERATION for what the worker
delivers):

| exception | status, code |
|---|---|
| APIError | its own |
| pydantic ValidationError (a body against protocol.py's models) | 400 naming the field (`param`) |
| RegistryError | its status: 400 invalid_value, 404 model_not_found, 409 conflict |
| inference UnknownAdapterError | 404 model_not_found |
| scheduler Overloaded / Unavailable | 429 rate_limit_error / 503, with Retry-After |
| FastAPI RequestValidationError, Starlette HTTPException (404, 405 with Allow) | 400 / its status |
| ClientDisconnect (the body was not sent whole) | 400 client_disconnected |
| RecursionError, UnicodeError, ValueError, TypeError (REQUEST: raised by what the request contained) | 400 |
| ValueError (GENERATION) | 400 |
| anything else | 500 internal_error |
"""

from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from softprompt.inference.prompt_cache import UnknownAdapterError
from softprompt.inference.scheduler import Overloaded, Unavailable
from softprompt.serve.responses import ErrorBody, ErrorResponse

REQUEST, GENERATION = "request", "generation"
CLIENT_ERRORS = (ValueError, TypeError, UnicodeError, RecursionError)  # raised by request content: 400, never 500


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        error = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=error).wire()


class RegistryError(ValueError):
    """A bad adapter name or path (status 400), an unknown one (404) or a name clash (409)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---- messages given in more than one place -------------------------------------------------------------------
def model_missing(name: str) -> str:
    return f"The model `{name}` does not exist."


def model_not_found(name: str) -> APIError:
    """404 for a model (adapter) that is not served."""
    return APIError(404, model_missing(name), param="model", code="model_not_found")


def outside_vocabulary(param: str, token: int, vocab: int) -> APIError:
    """400 for a token id the model does not have."""
    return APIError(
        400,
        f"Invalid value for '{param}': token id {token} is outside the vocabulary (0..{vocab - 1})",
        param=param,
        code="invalid_value",
    )


def too_large_message(limit: int) -> str:
    return f"The request body is too large: this server accepts at most {limit} bytes (max_request_bytes)."


def too_large(limit: int) -> APIError:
    """413 for a body over max_request_bytes (the connection is closed: the rest of the body is not read)."""
    return APIError(413, too_large_message(limit), code="request_too_large", headers={"Connection": "close"})


# ---- the table -----------------------------------------------------------------------------------------------
def as_api_error(err: BaseException, during: str = REQUEST) -> APIError:
    """The APIError `err` stands for (see the module docstring's table)."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, ValidationError):
        return validation_error(err)
    if isinstance(err, RegistryError):
        code = {404: "model_not_found", 409: "conflict"}.get(err.status, "invalid_value")
        return APIError(err.status, str(err), code=code)
    if isinstance(err, UnknownAdapterError):
        message = str(err) if during == REQUEST else f"the model was removed while the request waited: {err}"
        return APIError(404, message, param="model", code="model_not_found")
    if isinstance(err, (Overloaded, Unavailable)):
        status, kind, code = (
            (429, "rate_limit_error", "server_overloaded")
            if isinstance(err, Overloaded)
            else (503, "server_error", "unavailable")
        )
        return APIError(status, str(err), type=kind, code=code, headers={"Retry-After": "1"})
    if isinstance(err, RequestValidationError):
        return APIError(400, str(err))
    if isinstance(err, StarletteHTTPException):
        return APIError(err.status_code, str(err.detail), headers=getattr(err, "headers", None))
    if isinstance(err, ClientDisconnect):
        # nobody is left to answer, and it is not the server's failure (no traceback in the log)
        return APIError(
            400, "The client closed the connection before sending the whole body.", code="client_disconnected"
        )
    if during == GENERATION:
        if isinstance(err, ValueError):
            return APIError(400, str(err))
        return APIError(500, f"generation failed: {err}", type="server_error", code="internal_error")
    if isinstance(err, RecursionError):
        return APIError(400, "The request is nested too deeply.", code="invalid_value")
    if isinstance(err, UnicodeError):
        return APIError(400, f"The request contains text that is not valid Unicode: {err}", code="invalid_value")
    if isinstance(err, CLIENT_ERRORS):
        return APIError(400, f"Invalid request: {err}", code="invalid_value")
    return APIError(500, f"internal error: {err!r}", type="server_error", code="internal_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "any"}


def _field_part(part) -> bool:
    """Whether a pydantic error-location element names a field or an index (not a union member's type tag such
    as 'str', 'list[str]' or 'function-after[...]')."""
    if isinstance(part, int):
        return True
    text = str(part)
    return not (
        "[" in text
        or text.startswith(("function-", "union", "lax-or-strict", "json-or-python"))
        or text in _TYPE_TAGS
        or text.startswith("constrained-")
    )


def validation_error(err: ValidationError) -> APIError:
    """The first pydantic error as an OpenAI-style 400 naming the field."""
    first = err.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if _field_part(x)]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    message = first.get("msg", "invalid value")
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
        if not loc and ": " in message:  # a model-level check names its field as "field: what is wrong"
            param, message = message.split(": ", 1)
    return APIError(
        400, f"Invalid value for '{param}': {message}" if param else message, param=param, code="invalid_value"
    )


# ---- answering -----------------------------------------------------------------------------------------------
class ErrorJSON(JSONResponse):
    """Errors are rendered ASCII-only, so an echoed piece of a request (a model name, a key) can never fail to
    encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(err: APIError) -> Response:
    return ErrorJSON(err.body(), status_code=err.status, headers=err.headers)


def install_error_handlers(app: FastAPI, allowed_methods) -> None:
    """Answer every exception through `as_api_error`. `allowed_methods(path)`: every method the app takes at a path
    (Starlette's 405 names only the first route of the path; the Allow header lists them all)."""

    async def known(request, err: Exception):
        return error_response(as_api_error(err))

    for kind in (APIError, RegistryError, RequestValidationError, ClientDisconnect):
        app.add_exception_handler(kind, known)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        answer = as_api_error(err)
        if err.status_code == 405:
            answer.headers = {**(answer.headers or {}), "Allow": ", ".join(allowed_methods(request.url.path))}
        return error_response(answer)

    @app.exception_handler(Exception)
    async def anything(request, err: Exception):  # client mistakes raised deep inside are 400s, the rest 500s
        return error_response(as_api_error(err))
