"""A request body, from the socket to a protocol model: read it up to max_request_bytes (`read_body`, 413 beyond),
decode it into a JSON object (`decode_body`: malformed JSON, invalid UTF-8 or Unicode, nesting deeper than
MAX_JSON_DEPTH are 400s naming the field) and validate it against a protocol.py model (`validate_body`).

Every string in a body must be valid Unicode (a lone UTF-16 surrogate such as "\\ud800" is a 400 naming the field),
and bodies nest at most MAX_JSON_DEPTH levels; as in JSON Schema, a number without a fractional part (4.0) is an
integer.
"""

from __future__ import annotations

import json

from fastapi import Request
from pydantic import BaseModel, ValidationError

from softprompt.serve.errors import APIError, too_large, validation_error

MAX_JSON_DEPTH = 32  # levels of nested objects/arrays a request body may have


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read up to `limit` bytes (413 beyond, also for chunked bodies without a Content-Length)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def validate_body(raw: bytes, model: type[BaseModel]):
    """The body as an instance of `model` (a protocol.py request model), or a 400 APIError naming the field."""
    data = decode_body(raw)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_number(text: str) -> int | float:
    """A JSON number with a fraction or exponent: an int when it has no fractional part (4.0, 1e3), as JSON Schema
    counts it an integer, so /openapi.json's "integer" fields and the server agree."""
    value = float(text)
    return int(value) if value.is_integer() else value


def decode_body(raw: bytes) -> dict:
    """Parse a request body into a JSON object, or raise a 400 APIError: malformed JSON (incl. NaN/Infinity),
    invalid UTF-8, nesting deeper than MAX_JSON_DEPTH, or a string (value or key) that is not valid Unicode (a lone
    surrogate, which no tokenizer can take), naming the field."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant, parse_float=_json_number)
    except RecursionError:
        raise APIError(
            400, f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels).", code="invalid_json"
        ) from None
    except (ValueError, UnicodeError) as err:  # JSONDecodeError, UnicodeDecodeError, too many int digits, NaN
        raise APIError(400, f"We could not parse the JSON body of your request: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    check_tree(data)
    return data


def _path(node) -> str | None:
    parts = []
    while node is not None:
        node, key = node
        parts.append(key if isinstance(key, str) else str(key))
    return ".".join(reversed(parts)) or None


def _valid_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_tree(data) -> None:
    """Walk a parsed body without recursion: depth limit and valid Unicode everywhere (see decode_body)."""
    stack = [(data, None, 0)]  # (value, path as (parent_path, key) links, depth)
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if not _valid_text(value):
                param = _path(path)
                raise APIError(
                    400,
                    f"Invalid value for '{param}': the text contains a lone UTF-16 surrogate (such as "
                    "\\ud800), which is not valid Unicode",
                    param=param,
                    code="invalid_value",
                )
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_JSON_DEPTH:
            top = path
            while top is not None and top[0] is not None:
                top = top[0]
            param = _path(top)
            raise APIError(
                400,
                f"The request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
                + (f" in '{param}'." if param else "."),
                param=param,
                code="invalid_value",
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and not _valid_text(key):
                param = _path(path)
                raise APIError(
                    400,
                    "A key in the request body"
                    + (f" (in '{param}')" if param else "")
                    + " contains a lone UTF-16 surrogate, which is not valid Unicode",
                    param=param,
                    code="invalid_value",
                )
            stack.append((item, (path, key), depth + 1))
