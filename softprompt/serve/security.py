"""The server's network-facing defaults: who may reach it, from where, and with which bodies.

* `check_exposure(host, api_key, allow_insecure)`: the CLI calls it before binding. Listening on a non-loopback
  address (e.g. --host 0.0.0.0) without an API key is refused with a one-line ValueError, unless allow_insecure
  (then it only warns).
* `Guard`, an ASGI middleware in front of every endpoint but /health:
  - Host check (DNS rebinding): the Host header must name a loopback address (localhost, 127.0.0.0/8, ::1), the
    address the connection arrived on, or one of `allowed_hosts` ("*" allows any); otherwise 421.
  - Origin check (CSRF): a request with an Origin header is refused (403) unless that origin is in
    `allow_origins` or is the server's own (same host and port as Host).
  - POST bodies must be JSON (Content-Type application/json or */*+json); anything else is 415, so an HTML form
    or a `text/plain` fetch from a web page never reaches an endpoint. A POST without a body and without a
    Content-Type (e.g. `curl -X POST .../rescan`) is allowed.
  - A Content-Length above `max_request_bytes` is 413 before the body is read (body.read_body also counts streamed
    bytes, for chunked bodies).
* `api_key_check(api_key)`, `admin_check(allow_admin, api_key)`: the app's dependencies for the bearer key (on
  everything but /health) and for the adapter-admin endpoints (403 unless allowed).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import warnings

from fastapi import Request

from softprompt.serve.errors import APIError, too_large_message

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine only."""
    host = host.strip().lower().strip("[]")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, allow_insecure: bool = False) -> str | None:
    """Refuse (ValueError, one line) to listen on a non-loopback address without an API key, unless
    `allow_insecure`, in which case warn (warnings.warn, and the warning text is returned for the CLI to print).
    Returns None when there is nothing to say."""
    if is_loopback(host) or api_key:
        return None
    message = (
        f"--host {host} makes the server reachable from other machines, and without --api-key anyone who "
        "can reach it may use it"
    )
    if not allow_insecure:
        raise ValueError(f"{message}: set --api-key (or $SOFTPROMPT_API_KEY), or pass --allow-insecure to do it anyway")
    warning = f"WARNING: {message} (--allow-insecure)"
    warnings.warn(warning, stacklevel=2)
    return warning


def split_host(value: str) -> str:
    """The host part of a Host header value ("[::1]:8000" -> "::1", "Example.COM:80" -> "example.com")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value  # a bare IPv6 address, or no port


def _error(status: int, message: str, code: str, type: str = "invalid_request_error") -> tuple[int, bytes]:
    return status, json.dumps(APIError(status, message, type=type, code=code).body()).encode()


# ---- the app's dependencies (FastAPI) --------------------------------------------------------------------------
def api_key_check(api_key: str | None):
    """A dependency requiring `Authorization: Bearer <api_key>` (compared in constant time) on every path but
    /health; none when `api_key` is None."""

    async def authorise(request: Request):
        if api_key is None or request.url.path == "/health":
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided.", type="authentication_error", code="invalid_api_key")

    return authorise


def admin_check(allow_admin: bool, api_key: str | None):
    """A dependency refusing (403) the adapter-admin endpoints unless `allow_admin`."""

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

    return require_admin


class Guard:
    """See the module docstring. `allowed_hosts`: extra Host names/addresses (None: loopback and the address the
    connection arrived on; ["*"]: any). `allow_origins`: origins allowed to call (CORS itself is added by the app
    when asked)."""

    def __init__(
        self,
        app,
        *,
        allowed_hosts=None,
        allow_origins=None,
        max_request_bytes: int | None = None,
        open_paths=("/health",),
    ):
        self.app = app
        self.any_host = allowed_hosts is not None and "*" in allowed_hosts
        self.hosts = {split_host(h) for h in (allowed_hosts or ()) if h != "*"}
        self.origins = {o.rstrip("/").lower() for o in (allow_origins or ())}
        self.any_origin = "*" in self.origins
        self.max_request_bytes = max_request_bytes
        self.open_paths = set(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, body = refusal
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def host_allowed(self, host: str, scope) -> bool:
        if self.any_host or is_loopback(host) or host in self.hosts:
            return True
        server = scope.get("server")
        return bool(server) and host == str(server[0]).lower().strip("[]")

    def check(self, scope) -> tuple[int, bytes] | None:
        headers = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        host_header = headers.get("host")
        if host_header is not None and not self.host_allowed(split_host(host_header), scope):
            return _error(
                421,
                f"Host {host_header!r} is not served here: this server answers only to its own "
                "address and loopback names (DNS-rebinding protection); start it with allowed_hosts "
                "(the hosts this server may be called as) to allow others.",
                "invalid_host",
            )
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host_header):
            return _error(
                403,
                f"Cross-origin requests from {origin!r} are not allowed; start the server with "
                "allow_origins to allow a web page's origin.",
                "origin_not_allowed",
            )
        method = scope.get("method", "GET")
        length = headers.get("content-length")
        if self.max_request_bytes is not None and length is not None:
            try:
                too_big = int(length) > self.max_request_bytes
            except ValueError:
                too_big = False  # the HTTP server refuses a malformed Content-Length itself
            if too_big:
                return request_too_large(self.max_request_bytes)
        if method in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type")
            has_body = (length not in (None, "0")) or "transfer-encoding" in headers
            if media is None and has_body or media is not None and not is_json(media):
                return _error(
                    415,
                    f"Unsupported Content-Type {media!r}: request bodies must be JSON "
                    "(Content-Type: application/json).",
                    "unsupported_media_type",
                )
        return None

    def origin_allowed(self, origin: str, host_header: str | None) -> bool:
        origin = origin.rstrip("/").lower()
        if self.any_origin or origin in self.origins:
            return True
        if host_header is None or "://" not in origin:
            return False
        return origin.split("://", 1)[1] == host_header.strip().lower()  # the server's own origin


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def request_too_large(limit: int) -> tuple[int, bytes]:
    return _error(413, too_large_message(limit), "request_too_large")
