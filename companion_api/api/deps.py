"""Dependencies: database session, authenticated principal, role checks, per-token rate limit, audit."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.requests import HTTPConnection

from ..core.security import hash_token
from ..models import AuditEvent, Principal

COOKIE = "retinaedge_token"


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


@dataclass(frozen=True)
class Caller:
    name: str
    role: str


def _client_key(request: Request) -> str:
    # The peer address; behind a reverse proxy listed in TRUSTED_PROXIES, the client it forwarded for
    # (uvicorn's ProxyHeadersMiddleware rewrites the peer from X-Forwarded-For, see create_app).
    return f"auth-failures:{request.client.host if request.client else 'unknown'}"


def bearer_token(connection: HTTPConnection) -> str | None:
    """The token of a request: ``Authorization: Bearer`` or the review page's cookie."""
    header = connection.headers.get("Authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else connection.cookies.get(COOKIE)


def find_principal(session: Session, token: str) -> Principal | None:
    """The live principal a token belongs to; None for unknown, wrong or revoked tokens."""
    principal = session.scalar(select(Principal).where(Principal.token_hash == hash_token(token)))
    return None if principal is None or principal.revoked else principal


async def has_valid_token(app, scope) -> bool:
    """Whether a request carries a live token (the body-limit middleware asks before reading a large body)."""
    token = bearer_token(HTTPConnection(scope))
    if not token:
        return False

    def lookup() -> bool:
        with app.state.sessionmaker() as session:
            return find_principal(session, token) is not None

    return await anyio.to_thread.run_sync(lookup)


def current_caller(request: Request, session: SessionDep) -> Caller:
    token = bearer_token(request)
    principal = find_principal(session, token) if token else None
    if principal is not None:
        # A valid token is never refused for its address's failures: a clinic NAT shares one address, and 35
        # random tokens from it must not lock out every device and reviewer behind it.
        limiter = request.app.state.limiter
        if not limiter.hit(principal.name):
            raise HTTPException(429, "rate limit exceeded",
                                headers={"Retry-After": str(limiter.retry_after(principal.name))})
        return Caller(principal.name, principal.role)
    # Guessing is throttled per client address: unknown and wrong tokens take the same path.
    failures, client = request.app.state.auth_failures, _client_key(request)
    if not failures.test(client):
        raise HTTPException(429, "too many failed sign-ins from this address; wait and retry",
                            headers={"Retry-After": str(failures.retry_after(client))})
    if not token:
        raise HTTPException(401, "missing token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    failures.hit(client)
    raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})


CallerDep = Annotated[Caller, Depends(current_caller)]


def require_reviewer(caller: CallerDep) -> Caller:
    if caller.role != "reviewer":
        raise HTTPException(403, "reviewer token required")
    return caller


def require_device(caller: CallerDep) -> Caller:
    if caller.role != "device":
        raise HTTPException(403, "device token required")
    return caller


def require_publisher(caller: CallerDep) -> Caller:
    if caller.role != "publisher":
        raise HTTPException(403, "publisher token required: only publishers upload models (devices install them)")
    return caller


ReviewerDep = Annotated[Caller, Depends(require_reviewer)]
PublisherDep = Annotated[Caller, Depends(require_publisher)]
DeviceDep = Annotated[Caller, Depends(require_device)]


def audit(session: Session, caller: Caller, action: str, target: str | None = None, detail: str | None = None) -> None:
    session.add(AuditEvent(principal=caller.name, action=action, target=target, detail=(detail or "")[:500] or None))
