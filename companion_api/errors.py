"""Errors the server answers with: typed, without echoing the input, and never a 500 for bad data."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError

log = logging.getLogger("companion_api")
RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected


class RetryableDatabaseError(RuntimeError):
    """A transaction lost a serialization race or a deadlock; the client should retry the same request."""


def _safe(value) -> str | int:
    # Locations can hold dict keys from the request (any text, lone surrogates included).
    if isinstance(value, int):
        return value
    return str(value)[:80].encode("utf-8", "backslashreplace").decode("utf-8")


def sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, RetryableDatabaseError) or (isinstance(exc, DBAPIError) and sqlstate(exc) in RETRYABLE_SQLSTATES)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each input back: a NaN or a lone surrogate then cannot be encoded (500), and
        # a 60 MB field would be sent back. Location, message and type say what to fix.
        errors = [{"loc": [_safe(p) for p in e.get("loc", ())], "msg": _safe(e.get("msg", "")), "type": e.get("type")}
                  for e in exc.errors()[:20]]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if is_retryable(exc):
            return JSONResponse({"detail": "database busy (concurrent update); retry the request"}, status_code=503,
                                headers={"Retry-After": "1"})
        if isinstance(exc, DataError):
            return JSONResponse({"detail": "a value is out of range for the database"}, status_code=422)
        # The engine hides bound parameters, so this log line carries no payloads or tokens.
        log.error("database error %s (sqlstate %s) on %s %s", type(exc.orig).__name__, sqlstate(exc),
                  request.method, request.url.path)
        status = 503 if isinstance(exc, OperationalError) else 500
        return JSONResponse({"detail": "database unavailable; retry later" if status == 503 else "internal error"},
                            status_code=status, headers={"Retry-After": "5"} if status == 503 else None)

    @app.exception_handler(RetryableDatabaseError)
    async def retryable(request: Request, exc: RetryableDatabaseError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})
