"""Dependencies: database session, authenticated principal, role checks, per-token rate limit, audit."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

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
    return f"auth-failures:{request.client.host if request.client else 'unknown'}"


def current_caller(request: Request, session: SessionDep) -> Caller:
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE)
    failures = request.app.state.auth_failures
    client = _client_key(request)
    # Token guessing is throttled per client address; checked before the lookup so the answer (and its timing)
    # is the same for unknown and wrong tokens.
    if not failures.test(client):
        raise HTTPException(429, "too many failed sign-ins from this address; wait and retry",
                            headers={"Retry-After": str(failures.retry_after(client))})
    if not token:
        raise HTTPException(401, "missing token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    principal = session.scalar(select(Principal).where(Principal.token_hash == hash_token(token)))
    if principal is None or principal.revoked:
        failures.hit(client)
        raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    limiter = request.app.state.limiter
    if not limiter.hit(principal.name):
        raise HTTPException(429, "rate limit exceeded", headers={"Retry-After": str(limiter.retry_after(principal.name))})
    return Caller(principal.name, principal.role)


CallerDep = Annotated[Caller, Depends(current_caller)]


def require_reviewer(caller: CallerDep) -> Caller:
    if caller.role != "reviewer":
        raise HTTPException(403, "reviewer token required")
    return caller


def require_device(caller: CallerDep) -> Caller:
    if caller.role != "device":
        raise HTTPException(403, "device token required")
    return caller


ReviewerDep = Annotated[Caller, Depends(require_reviewer)]
DeviceDep = Annotated[Caller, Depends(require_device)]


def audit(session: Session, caller: Caller, action: str, target: str | None = None, detail: str | None = None) -> None:
    session.add(AuditEvent(principal=caller.name, action=action, target=target, detail=(detail or "")[:500] or None))
