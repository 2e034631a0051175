"""Database operations (keyword-only, one transaction per call)."""
from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edge_runtime.contract import GRADE_NAMES, SCREENING_DISCLAIMER

from .core.security import hash_token, new_token
from .models import Principal, Result
from .schemas import ResultPublic, SyncEntry, SyncItemStatus


def create_principal(*, session: Session, name: str, role: str) -> str:
    """Create a device or reviewer; returns the token (shown once, stored hashed)."""
    if role not in ("device", "reviewer"):
        raise ValueError(f"role must be device|reviewer, got {role!r}")
    if session.scalar(select(Principal).where(Principal.name == name)):
        raise ValueError(f"a principal named {name!r} already exists; revoke it or choose another name")
    token = new_token(role)
    session.add(Principal(name=name, role=role, token_hash=hash_token(token)))
    session.commit()
    return token


def revoke_principal(*, session: Session, name: str) -> None:
    principal = session.scalar(select(Principal).where(Principal.name == name))
    if principal is None:
        raise ValueError(f"no principal named {name!r}")
    principal.revoked = True
    session.commit()


def _decode(data: str | None, limit: int, what: str) -> bytes | None:
    if data is None:
        return None
    if len(data) > limit * 4 // 3 + 4:
        raise ValueError(f"{what} is over the {limit // 1_000_000} MB limit")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{what} is not valid base64") from exc


def _check_images(overlay: bytes | None, image: bytes | None, max_bytes: int) -> str | None:
    """Overlays are shown to reviewers: they must be real, size-limited PNGs (no bombs, no polyglots)."""
    from edge_runtime.errors import ImageError
    from edge_runtime.preprocess import decode_image

    for name, data in (("overlay", overlay), ("image", image)):
        if data is None:
            continue
        if name == "overlay" and data[:8] != b"\x89PNG\r\n\x1a\n":
            return "overlay is not a PNG"
        try:
            decode_image(data, max_bytes, 25_000_000)
        except ImageError as exc:
            return f"{name}: {exc}"
    return None


def store_batch(*, session: Session, device: str, entries: list[SyncEntry], max_image_bytes: int) -> list[SyncItemStatus]:
    """Idempotent on result UUID, all in one transaction: same UUID + content -> duplicate; different -> conflict."""
    statuses: list[SyncItemStatus] = []
    ids = [e.result.result_id for e in entries]
    existing = {r.result_id: r for r in session.scalars(select(Result).where(Result.result_id.in_(ids)))}
    seen: dict[str, str] = {}
    for entry in entries:
        r = entry.result
        rid = r.result_id
        if r.device_id != device:
            statuses.append(SyncItemStatus(result_id=rid, status="rejected", detail="device_id does not match the token"))
            continue
        known = existing.get(rid)
        known_hash = known.content_hash if known else seen.get(rid)
        if known is not None and known.device != device:
            statuses.append(SyncItemStatus(result_id=rid, status="conflict", detail="result id belongs to another device"))
            continue
        if known_hash is not None:
            status = "duplicate" if known_hash == entry.content_hash else "conflict"
            statuses.append(SyncItemStatus(result_id=rid, status=status,
                                           detail="" if status == "duplicate" else "same result id, different content"))
            continue
        try:
            overlay = _decode(entry.overlay_png_b64, max_image_bytes, "overlay")
            image = _decode(entry.image_b64, max_image_bytes, "image")
        except ValueError as exc:
            statuses.append(SyncItemStatus(result_id=rid, status="rejected", detail=str(exc)))
            continue
        problem = _check_images(overlay, image, max_image_bytes)
        if problem:
            statuses.append(SyncItemStatus(result_id=rid, status="rejected", detail=problem))
            continue
        session.add(Result(result_id=rid, device=device, content_hash=entry.content_hash,
                           payload=r.model_dump_json(), outcome=r.outcome, grade=r.grade, referable=r.referable,
                           confidence=r.confidence, captured_at=r.captured_at, overlay_png=overlay, image=image))
        seen[rid] = entry.content_hash
        statuses.append(SyncItemStatus(result_id=rid, status="stored"))
    try:
        session.commit()
    except IntegrityError:
        # Another worker stored one of these ids between our read and commit: resolve item by item.
        session.rollback()
        return store_batch_serially(session=session, device=device, entries=entries, max_image_bytes=max_image_bytes)
    return statuses


def store_batch_serially(*, session, device, entries, max_image_bytes):
    out = []
    for entry in entries:
        out += store_batch(session=session, device=device, entries=[entry], max_image_bytes=max_image_bytes)
    return out


def to_public(row: Result) -> ResultPublic:
    return ResultPublic(result_id=row.result_id, device=row.device, outcome=row.outcome, grade=row.grade,
                        grade_name=GRADE_NAMES[row.grade] if row.grade is not None else None, referable=row.referable,
                        confidence=row.confidence, captured_at=row.captured_at, received_at=row.received_at,
                        has_overlay=row.overlay_png is not None, result=json.loads(row.payload),
                        disclaimer=SCREENING_DISCLAIMER)


def query_results(*, session: Session, device: str | None, grade: int | None, referable: bool | None,
                  since: datetime | None, until: datetime | None, offset: int, limit: int):
    query = select(Result)
    if device is not None:
        query = query.where(Result.device == device)
    if grade is not None:
        query = query.where(Result.grade == grade)
    if referable is not None:
        query = query.where(Result.referable == referable)
    if since is not None:
        query = query.where(Result.captured_at >= since)
    if until is not None:
        query = query.where(Result.captured_at <= until)
    count = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(query.order_by(Result.captured_at.desc(), Result.result_id).offset(offset).limit(limit)).all()
    return rows, count
