"""ASGI middleware that must run before any routing or authentication work."""
from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from urllib.parse import unquote_to_bytes

import anyio

Scope = dict
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
# Pages are server-rendered with inline styles only: no scripts, no frames, forms post to this origin.
PAGE_CSP = (b"default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
            b"frame-ancestors 'none'; base-uri 'none'")
# Swagger UI (/docs) loads its script and styles from a CDN; it still may not be framed.
DOCS_CSP = b"frame-ancestors 'none'"
# The web app (/app/) runs its own scripts and WebAssembly (ONNX Runtime Web) from this origin, nothing else.
APP_CSP = (b"default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:; img-src 'self' blob: data:; "
           b"media-src 'self' blob: mediastream:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


async def _send_json(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Counts the bytes actually received (Content-Length or chunked), bounds how long they may take, and answers
    before routing once a limit is crossed.

    The body is read here, before routing, and replayed to the app. A request without a valid token may send at
    most ``preauth_limit`` bytes within ``preauth_timeout_s``: past that, ``authenticate`` (a token lookup, off the
    event loop) must accept its token, else it is answered 413 and the connection closed; so a client without a
    token cannot make the server hold more than a few KB per connection, nor hold a connection open by stalling.
    An authenticated body may reach ``limit`` bytes within ``timeout_s``, with at most ``idle_timeout_s`` between
    two chunks (408 otherwise).
    """

    def __init__(self, app, limit: int, preauth_limit: int = 64 * 1024, preauth_timeout_s: float = 10.0,
                 timeout_s: float = 120.0, idle_timeout_s: float = 30.0,
                 authenticate: Callable[[Scope], Awaitable[bool]] | None = None):
        self.app, self.limit, self.preauth_limit = app, limit, min(preauth_limit, limit)
        self.preauth_timeout_s, self.timeout_s, self.idle_timeout_s = preauth_timeout_s, timeout_s, idle_timeout_s
        self.authenticate = authenticate

    async def _authenticated(self, scope: Scope) -> bool:
        return self.authenticate is not None and await self.authenticate(scope)

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body over {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, too_big)
        limit, started = self.preauth_limit, time.monotonic()
        deadline = started + self.preauth_timeout_s
        if length is not None and int(length) > limit:  # announced: decide before reading a byte of it
            if not await self._authenticated(scope):
                return await _send_json(send, 413, f"request body over {limit} bytes without a valid token")
            limit, deadline = self.limit, started + self.timeout_s
        messages, size = [], 0
        while True:
            wait = min(self.idle_timeout_s, deadline - time.monotonic())
            try:
                with anyio.fail_after(max(wait, 0.001)):
                    message = await receive()
            except TimeoutError:
                return await _send_json(send, 408, "the request body arrived too slowly; send it again")
            except Exception:  # noqa: BLE001 - a broken body stream is the client's error, as FastAPI answers it
                return await _send_json(send, 400, "the request body could not be read")
            if message["type"] == "http.disconnect":
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > limit:
                if limit == self.limit:
                    return await _send_json(send, 413, too_big)
                if not await self._authenticated(scope):
                    return await _send_json(send, 413, f"request body over {limit} bytes without a valid token")
                limit, deadline = self.limit, started + self.timeout_s
                if size > limit:
                    return await _send_json(send, 413, too_big)
            messages.append(message)
            if not message.get("more_body", False):
                break

        async def replay():
            if messages:
                return messages.pop(0)
            return await receive()

        await self.app(scope, replay, send)


class HardeningMiddleware:
    """Rejects request targets the database cannot hold (NUL, invalid UTF-8) and adds security headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        target = unquote_to_bytes(raw) + b"?" + unquote_to_bytes(scope.get("query_string", b"").replace(b"+", b" "))
        try:
            target.decode("utf-8")
            bad = b"\x00" in target
        except UnicodeDecodeError:
            bad = True
        if bad:
            return await _send_json(send, 422, "the request path or query holds NUL bytes or invalid UTF-8")
        path = scope["path"]
        csp = DOCS_CSP if path.startswith(("/docs", "/redoc")) else PAGE_CSP
        csp = APP_CSP if path == "/app" or path.startswith("/app/") else csp

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS,
                                                  (b"content-security-policy", csp)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
