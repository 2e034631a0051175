"""ASGI middleware that must run before any routing or authentication work."""
from __future__ import annotations

import json
from urllib.parse import unquote_to_bytes

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


async def _send_json(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Counts the bytes actually received (Content-Length or chunked) and answers 413 once ``limit`` is crossed.

    The body is read here, before routing and before the token is looked up, and replayed to the app: a client
    without a valid token can make the server hold at most ``limit`` bytes, whatever it claims or streams.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"request body over {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_json(send, 413, too_big)
        messages, size = [], 0
        while True:
            try:
                message = await receive()
            except Exception:  # noqa: BLE001 - a broken body stream is the client's error, as FastAPI answers it
                return await _send_json(send, 400, "the request body could not be read")
            if message["type"] == "http.disconnect":
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
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

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS,
                                                  (b"content-security-policy", csp)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
