"""The HTTP edge's checks before any route runs: the Host allow-list, header sanity, who the caller is (API keys
and the admin key), cross-site browser posts, the body's content type and its size.

``HttpGuard`` is a plain ASGI middleware. Its access rules use ``scope["path"]``, the path the router matches,
never a URL rebuilt from the Host header. It answers refusals itself with OpenAI-style error bodies, reads a
request's body (at most ``max_body_mb``, whether the client sent a Content-Length or chunks) before any route
parses it, and records the caller (``Caller``) and the arrival time in the request's state.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetserve.gateway.api import responses
from fleetserve.settings.gateway import GatewaySettings

PUBLIC_PATHS = {"/health", "/ready", "/", "/favicon.ico"}
"""Routes open without an API key: liveness, readiness (which tells a caller without a key only whether the
gateway is ready, for a Kubernetes probe) and the console's static page (its API calls carry the key)."""
PUBLIC_PREFIX = "/console/"
"""The console's static files are open too."""
ADMIN_PREFIX = "/admin"
PLAIN_TEXT_ROUTE = re.compile(r"^/v1/chat/[^/]+$")
"""The one route whose body is plain text (``/v1/chat/{model}``); /v1/chat/completions is JSON."""
MAX_REQUEST_ID_CHARS = 128
MAX_AUTHORIZATION_CHARS = 1024
_VISIBLE_ASCII = re.compile(rb"^[\x21-\x7e]*$")
_HEADER_ASCII = re.compile(rb"^[\x20-\x7e]*$")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: ``tag`` names its key without revealing it (``anon`` without one, ``admin`` for the
    admin key); ``admin`` says whether it holds the admin key."""

    tag: str
    admin: bool = False


ANONYMOUS = Caller("anon")


class Refusal(Exception):
    """A request the guard answers itself: status, message and OpenAI error code."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    def body(self) -> bytes:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return json.dumps(responses.error_body(str(self), kind, self.param, self.code)).encode()


def key_tag(key: str) -> str:
    """A stable name for an API key that does not reveal it."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _host_name(host: str) -> str:
    """The host name of a Host header value, lower-cased, without its port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str | None, allowed: list[str]) -> bool:
    """Whether a Host header value names an allowed host (``*.example.com`` matches its subdomains)."""
    if not allowed:
        return True
    if not host:
        return False
    name = _host_name(host)
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*" or name == entry or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


def _json_type(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _plain_type(content_type: str) -> bool:
    return content_type == "" or content_type.split(";", 1)[0].strip().lower() == "text/plain"


class HttpGuard:
    """The ASGI middleware that applies the edge's checks (module docstring) before the app sees a request."""

    def __init__(self, app: ASGIApp, settings: GatewaySettings):
        self.app = app
        self.settings = settings
        self.keys = [k.encode() for k in settings.api_key]
        self.admin_key = settings.admin_key.encode()
        self.max_body = int(settings.max_body_mb * 2**20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["arrived"] = time.monotonic()
        headers = Headers(scope=scope)
        try:
            self._check_headers(headers)
            state["caller"] = self.caller(scope["method"], scope["path"], headers)
            has_body = self._check_body_headers(scope["path"], headers)
            if has_body:
                body = await self._read_body(receive)
                if body is None:  # the client left while sending
                    return
                receive = _replay(body, receive)
        except Refusal as refusal:
            await _answer(send, refusal)
            return
        await self.app(scope, receive, send)

    def _check_headers(self, headers: Headers) -> None:
        """The Host allow-list, and the headers whose values travel on (request ids, keys) are plain ASCII."""
        if not host_allowed(headers.get("host"), self.settings.allowed_hosts):
            raise Refusal(400, "The Host header names a host this gateway does not serve.", "invalid_host")
        for name, limit, pattern in (
            (b"x-request-id", MAX_REQUEST_ID_CHARS, _VISIBLE_ASCII),
            (b"authorization", MAX_AUTHORIZATION_CHARS, _HEADER_ASCII),
        ):
            for key, value in headers.raw:
                if key == name and (len(value) > limit or not pattern.match(value)):
                    what = name.decode().title()
                    raise Refusal(
                        400,
                        f"The {what} header must be at most {limit} printable ASCII characters.",
                        "invalid_header",
                        what,
                    )

    def _bearer(self, headers: Headers) -> bytes | None:
        value = headers.get("authorization", "").encode("latin-1")
        return value[7:].strip() if value.startswith(b"Bearer ") else None

    def caller(self, method: str, path: str, headers: Headers) -> Caller:
        """Who the request comes from; a Refusal when it may not pass (401 without a right key, 403 for /admin
        when no admin key is configured but API keys are, or for launching workers, or changing deployments, without an admin key)."""
        key = self._bearer(headers)
        is_admin = bool(self.admin_key) and key is not None and hmac.compare_digest(key, self.admin_key)
        if path.startswith(ADMIN_PREFIX):
            if self.admin_key:
                if not is_admin:
                    raise Refusal(
                        401,
                        "The admin API needs the admin key: send 'Authorization: Bearer ADMIN_KEY'.",
                        "invalid_api_key",
                    )
                return Caller("admin", True)
            if self.keys:
                raise Refusal(403, "The admin API is off: start the gateway with --admin-key to use it.", "forbidden")
            if _launches(method, path):
                raise Refusal(
                    403, "Launching workers needs an admin key: start the gateway with --admin-key.", "forbidden"
                )
            return ANONYMOUS
        if is_admin:
            return Caller("admin", True)
        matched = next((k for k in self.keys if key is not None and hmac.compare_digest(key, k)), None)
        if matched is not None:
            return Caller(key_tag(matched.decode()))
        if not self.keys or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX):
            return ANONYMOUS
        raise Refusal(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.", "invalid_api_key")

    def _check_body_headers(self, path: str, headers: Headers) -> bool:
        """Whether the request carries a body; a Refusal for a cross-site browser post, a body of another type
        than the route takes (415), or a Content-Length over the limit (413)."""
        length = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        if length is not None and not length.strip().isdigit():
            raise Refusal(400, "The Content-Length header is not a number.", "invalid_header", "Content-Length")
        if not chunked and (length is None or int(length) == 0):
            return False
        if headers.get("sec-fetch-site") == "cross-site":
            raise Refusal(403, "Cross-site browser requests with a body are refused.", "forbidden")
        content_type = headers.get("content-type", "")
        plain = PLAIN_TEXT_ROUTE.match(path) is not None and path != "/v1/chat/completions"
        if not (_plain_type(content_type) if plain else _json_type(content_type)):
            wanted = "text/plain" if plain else "application/json"
            raise Refusal(415, f"The request body must be sent as Content-Type: {wanted}.", "unsupported_media_type")
        if length is not None and int(length) > self.max_body:
            raise self._too_large()
        return True

    def _too_large(self) -> Refusal:
        return Refusal(
            413, f"The request body is over the limit of {self.settings.max_body_mb:g} MiB.", "request_too_large"
        )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, refused as soon as it grows over the limit; None when the client disconnected."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _launches(method: str, path: str) -> bool:
    """Whether an admin request starts or stops worker processes: joining a local worker, or changing a
    deployment (node agents start and stop workers for it)."""
    if method == "POST" and path.rstrip("/") == ADMIN_PREFIX + "/workers":
        return True
    return method in ("PUT", "DELETE") and path.startswith(ADMIN_PREFIX + "/deployments")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives ``body`` once, then what the client sends next (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, refusal: Refusal) -> None:
    body = refusal.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if refusal.status == 413:  # the rest of the body is not read: the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def caller_of(scope: Scope) -> Caller:
    """The caller the guard recorded for this request (anonymous when it did not run)."""
    return scope.get("state", {}).get("caller", ANONYMOUS)


__all__ = ["ANONYMOUS", "PUBLIC_PATHS", "Caller", "HttpGuard", "caller_of", "host_allowed", "key_tag"]
