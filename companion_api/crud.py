"""Database operations (keyword-only, one transaction per call)."""
from __future__ import annotations

import base64
import binascii
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pydantic import ValidationError
from sqlalchemy import func, literal, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edge_runtime.contract import GRADE_NAMES, SCREENING_DISCLAIMER
from edge_runtime.wire import (
    RESULT_ID,
    SAFE_ID,
    ScreeningResult,
    content_hash_of,
    encounter_decision,
    result_referral_reason,
)

from .core.security import ROLES, hash_token, new_token
from .imaging import OVERLAY_MAX_PIXELS, DecodeSlots
from .models import Encounter, Principal, Result
from .schemas import EncounterPublic, ResultPublic, SyncEntry, SyncItemStatus


def create_principal(*, session: Session, name: str, role: str) -> str:
    """Create a device, reviewer or publisher, or re-issue a revoked one; returns the token (shown once, stored
    hashed).

    A revoked name can be issued again (a replaced phone keeps its name and its history); the old token stays dead.
    """
    if role not in ROLES:
        raise ValueError(f"role must be {'|'.join(ROLES)}, got {role!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,119}", name):
        raise ValueError(f"principal name {name!r} must be 1-120 letters, digits or . _ : - (starting alphanumeric)")
    token = new_token(role)
    existing = session.scalar(select(Principal).where(Principal.name == name))
    if existing is not None:
        if not existing.revoked:
            raise ValueError(f"a principal named {name!r} already exists; revoke it first to issue a new token")
        if existing.role != role:
            raise ValueError(f"{name!r} was a {existing.role}; choose another name for a {role}")
        existing.token_hash, existing.revoked = hash_token(token), False
    else:
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


def _check_images(overlay: bytes | None, image: bytes | None, max_bytes: int, max_pixels: int,
                  slots: DecodeSlots) -> str | None:
    """Overlays are shown to reviewers: real PNGs of display size, decoded in full (no bombs, no polyglots) in a
    decode slot. The raw capture is kept, never shown: an accepted format whose header is within the pixel limit.
    Both headers are read before anything is decoded."""
    from edge_runtime.errors import ImageError
    from edge_runtime.preprocess import check_image_header, decode_image

    try:
        if image is not None:
            check_image_header(image, max_bytes, max_pixels)
    except ImageError as exc:
        return f"image: {exc}"
    if overlay is None:
        return None
    try:
        if check_image_header(overlay, max_bytes, OVERLAY_MAX_PIXELS).format != "PNG":
            return "overlay is not a PNG"
        with slots.held():
            decode_image(overlay, max_bytes, OVERLAY_MAX_PIXELS)
    except ImageError as exc:
        return f"overlay: {exc}"
    return None


@dataclass(frozen=True)
class ImageLimits:
    """What a synced image may weigh: bytes (encoded) and width x height (from its header)."""

    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class CaptureWindow:
    """The server's plausible window for captured_at, evaluated at receive time.

    A device clock outside it (a day fast, reset to 2099 or 1999) does not cost the result: the server records both
    clocks, the device's in the stored result (its content hash covers it) and its own receive time as the row's
    ``captured_at`` (what history orders and filters by), with the difference in ``clock_skew_s``. Only a time no
    calendar can hold (past year 9999 or before year 1 in UTC) is rejected.
    """

    received_at: datetime
    earliest: datetime
    max_future: timedelta

    def context(self) -> dict:
        # Validation checks only that the time is representable; plausibility is decided by ``plausible``.
        return {"received_at": datetime.max.replace(tzinfo=timezone.utc) - timedelta(days=2),
                "min_captured_at": datetime.min.replace(tzinfo=timezone.utc) + timedelta(days=2),
                "max_future": timedelta(0)}

    def plausible(self, captured_at: datetime) -> bool:
        return self.earliest <= captured_at <= self.received_at + self.max_future


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """The errors' locations and messages, never the input (it may be huge, NaN, or a lone surrogate)."""
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'result'}: {e['msg']}" for e in exc.errors(include_input=False)[:limit]]
    more = exc.error_count() - limit
    return ("; ".join(parts) + (f" (+{more} more)" if more > 0 else ""))[:500]


@dataclass(frozen=True)
class _Candidate:
    index: int
    result: ScreeningResult
    canonical: str  # the validated result as stored (server-derived fields included)
    content_hash: str
    overlay: bytes | None
    image: bytes | None


def _check_entry(index: int, entry: SyncEntry, device: str, window: CaptureWindow, limits: ImageLimits,
                 slots: DecodeSlots) -> _Candidate | SyncItemStatus:
    raw_id = entry.result.get("result_id")
    rid = raw_id if isinstance(raw_id, str) and re.fullmatch(RESULT_ID, raw_id) else ""
    try:
        result = ScreeningResult.model_validate(entry.result, context=window.context())
    except ValidationError as exc:
        return SyncItemStatus(result_id=rid, status="rejected", detail=describe_validation_error(exc))
    if result.device_id != device:
        return SyncItemStatus(result_id=rid, status="rejected", detail="device_id does not match the token")
    canonical = result.canonical_json()
    if content_hash_of(canonical) != entry.content_hash:
        return SyncItemStatus(result_id=rid, status="rejected",
                              detail="content_hash does not match the result; send ScreeningResult.content_hash()")
    try:
        overlay = _decode(entry.overlay_png_b64, limits.max_bytes, "overlay")
        image = _decode(entry.image_b64, limits.max_bytes, "image")
    except ValueError as exc:
        return SyncItemStatus(result_id=rid, status="rejected", detail=str(exc))
    problem = _check_images(overlay, image, limits.max_bytes, limits.max_pixels, slots)
    if problem:
        return SyncItemStatus(result_id=rid, status="rejected", detail=problem)
    return _Candidate(index, result, canonical, entry.content_hash, overlay, image)


def _row(device: str, c: _Candidate, window: CaptureWindow) -> dict:
    r = c.result
    trusted = window.plausible(r.captured_at)
    # grade_name and referable are the server's own derivations (the model re-derived and cross-checked them).
    return {"device": device, "result_id": r.result_id, "content_hash": c.content_hash, "payload": c.canonical,
            "outcome": r.outcome, "grade": r.grade, "referable": r.referable, "confidence": r.confidence,
            "dme_present": r.dme_present, "dme_probability": r.dme_probability,
            "captured_at": r.captured_at if trusted else window.received_at, "received_at": window.received_at,
            "clock_skew_s": None if trusted else (r.captured_at - window.received_at).total_seconds(),
            "overlay_png": c.overlay, "image": c.image, "encounter_id": r.encounter_id, "eye": r.eye}


def _insert_ignoring_conflicts(session: Session, rows: list[dict]) -> set[str]:
    """INSERT ... ON CONFLICT DO NOTHING; returns the ids this transaction inserted."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    # executemany form: one cached compiled statement, batched by SQLAlchemy's "insertmanyvalues" (with RETURNING).
    statement = (dialect.insert(Result).on_conflict_do_nothing(index_elements=[Result.device, Result.result_id])
                 .returning(Result.result_id))
    return set(session.scalars(statement, rows))


def store_batch(*, session: Session, device: str, entries: list[SyncEntry], limits: ImageLimits,
                window: CaptureWindow, slots: DecodeSlots,
                max_captures: int) -> list[SyncItemStatus]:
    """Idempotent on (device, result UUID), one transaction: same id + content -> duplicate; different -> conflict.
    A result that would give its encounter more than ``max_captures`` captures is rejected.

    Rows are inserted in result-id order with ON CONFLICT DO NOTHING, so two batches holding the same ids in
    opposite orders cannot deadlock on PostgreSQL, and a concurrent insert of the same id is a duplicate/conflict
    answer, never an IntegrityError.
    """
    statuses: dict[int, SyncItemStatus] = {}
    candidates: list[_Candidate] = []
    for index, entry in enumerate(entries):
        checked = _check_entry(index, entry, device, window, limits, slots)
        if isinstance(checked, SyncItemStatus):
            statuses[index] = checked
        else:
            candidates.append(checked)
    candidates.sort(key=lambda c: c.result.result_id)
    ids = sorted({c.result.result_id for c in candidates})
    known = dict(session.execute(select(Result.result_id, Result.content_hash)
                                 .where(Result.device == device, Result.result_id.in_(ids))).all()) if ids else {}
    fresh: dict[str, _Candidate] = {}
    for c in candidates:
        rid = c.result.result_id
        earlier = known.get(rid) or (fresh[rid].content_hash if rid in fresh else None)
        if earlier is None:
            fresh[rid] = c
        else:
            statuses[c.index] = _same_or_conflict(rid, earlier, c.content_hash)
    for rid, c in list(fresh.items()):  # a visit holds a bounded number of captures (its page stays bounded)
        if not _room_in_encounter(session, device, c.result.encounter_id, fresh, rid, max_captures):
            statuses[c.index] = SyncItemStatus(
                result_id=rid, status="rejected",
                detail=f"encounter {c.result.encounter_id} already holds {max_captures} captures (the most one visit "
                       "may hold); start a new encounter id")
            del fresh[rid]
    if fresh:
        rows = [_row(device, c, window) for c in fresh.values()]
        row_times = {row["result_id"]: row["captured_at"] for row in rows}
        inserted = _insert_ignoring_conflicts(session, rows)
        _count_encounters(session, device, [(fresh[rid].result.encounter_id, row_times[rid]) for rid in sorted(inserted)])
        raced = sorted(set(fresh) - inserted)  # stored by a concurrent request between our read and our insert
        winners = dict(session.execute(select(Result.result_id, Result.content_hash)
                                       .where(Result.device == device, Result.result_id.in_(raced))).all()) if raced else {}
        for rid, c in fresh.items():
            statuses[c.index] = (SyncItemStatus(result_id=rid, status="stored") if rid in inserted
                                 else _same_or_conflict(rid, winners.get(rid, ""), c.content_hash))
    return [statuses[i] for i in range(len(entries))]


def _room_in_encounter(session: Session, device: str, encounter_id: str | None, fresh: dict[str, _Candidate],
                       rid: str, max_captures: int) -> bool:
    """Whether one more capture fits the visit: those stored plus those of this batch ahead of it. (Concurrent
    batches of one device can overshoot by at most one batch: the bound is on a page's size, not an invariant.)"""
    if encounter_id is None:
        return True
    stored = session.scalar(select(Encounter.captures).where(Encounter.device == device,
                                                             Encounter.encounter_id == encounter_id)) or 0
    ahead = sum(1 for other, c in fresh.items() if other < rid and c.result.encounter_id == encounter_id)
    return stored + ahead < max_captures


def _count_encounters(session: Session, device: str, stored: list[tuple[str | None, datetime]]) -> None:
    """Add stored results, as (encounter_id, the row's captured_at), to their visits (last capture time, capture
    count), in key order (no deadlocks)."""
    visits: dict[str, list[datetime]] = defaultdict(list)
    for encounter_id, captured_at in stored:
        if encounter_id is not None:
            visits[encounter_id].append(captured_at)
    if not visits:
        return
    postgres = session.get_bind().dialect.name == "postgresql"
    dialect = postgresql if postgres else sqlite
    rows = [{"device": device, "encounter_id": e, "last_captured_at": max(times), "captures": len(times)}
            for e, times in sorted(visits.items())]
    statement = dialect.insert(Encounter)
    latest = (func.greatest if postgres else func.max)(Encounter.last_captured_at, statement.excluded.last_captured_at)
    session.execute(statement.on_conflict_do_update(
        index_elements=[Encounter.device, Encounter.encounter_id],
        set_={"last_captured_at": latest, "captures": Encounter.captures + statement.excluded.captures}), rows)


def _same_or_conflict(result_id: str, stored_hash: str, content_hash: str) -> SyncItemStatus:
    if stored_hash == content_hash:
        return SyncItemStatus(result_id=result_id, status="duplicate")
    return SyncItemStatus(result_id=result_id, status="conflict", detail="same result id, different content")


def referral_reason_of(row: Result, payload: dict) -> str | None:
    """Why a stored result is referred (``ScreeningResult.referral_reason`` from the validated stored fields)."""
    score, threshold = payload.get("referable_probability"), payload.get("threshold")
    dr_referable = None if score is None or threshold is None else score >= threshold
    return result_referral_reason(row.outcome, dr_referable, row.dme_present)


def to_public(row: Result) -> ResultPublic:
    payload = json.loads(row.payload)
    return ResultPublic(result_id=row.result_id, device=row.device, outcome=row.outcome, grade=row.grade,
                        grade_name=GRADE_NAMES[row.grade] if row.grade is not None else None, referable=row.referable,
                        referral_reason=referral_reason_of(row, payload), dme_present=row.dme_present,
                        device_clock_skew_s=row.clock_skew_s,
                        dme_probability=row.dme_probability,
                        confidence=row.confidence, captured_at=row.captured_at, received_at=row.received_at,
                        encounter_id=row.encounter_id, eye=row.eye, has_overlay=row.overlay_png is not None,
                        result=payload, disclaimer=SCREENING_DISCLAIMER)


def find_result(*, session: Session, result_id: str, device: str | None) -> Result | None:
    """A result by id, scoped to a device when given; None when absent or (without a device) ambiguous."""
    query = select(Result).where(Result.result_id == result_id)
    if device is not None:
        query = query.where(Result.device == device)
    rows = session.scalars(query.limit(2)).all()
    return rows[0] if len(rows) == 1 else None


def _filtered(query, *, device, grade, referable, since, until, dme=None):
    if device is not None:
        query = query.where(Result.device == device)
    if dme is not None:
        query = query.where(Result.dme_present == dme)
    if grade is not None:
        query = query.where(Result.grade == grade)
    if referable is not None:
        query = query.where(Result.referable == referable)
    if since is not None:
        query = query.where(Result.captured_at >= since)
    if until is not None:
        query = query.where(Result.captured_at <= until)
    return query


class InvalidCursorError(ValueError):
    """A page cursor that this server did not hand out (or for another view)."""


def encode_cursor(at: datetime, device: str, key: str) -> str:
    """The opaque cursor of the page after the row (at, device, key): key is a result id or an encounter id."""
    text = json.dumps([at.astimezone(timezone.utc).isoformat(), device, key])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, key_pattern: str) -> tuple[datetime, str, str]:
    """(at, device, key) of a cursor; InvalidCursorError for anything this server did not write."""
    try:
        at, device, key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at = datetime.fromisoformat(at)
        if at.tzinfo is None or not (isinstance(device, str) and re.fullmatch(SAFE_ID, device)
                                     and isinstance(key, str) and re.fullmatch(key_pattern, key)):
            raise ValueError(cursor)
        return at, device, key
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, OverflowError) as exc:
        raise InvalidCursorError("invalid page cursor: pass the next_cursor of the previous page, or none") from exc


def _after(columns, at: datetime, device: str, key: str, same_device: bool):
    """Rows after the cursor in the (at, device, key) descending order; with one device fixed, (at, key) compare
    alone, so the comparison matches the device index (device, at, key)."""
    at_column, device_column, key_column = columns
    at_value = literal(at, type_=at_column.type)
    if same_device:
        return tuple_(at_column, key_column) < tuple_(at_value, literal(key))
    return tuple_(at_column, device_column, key_column) < tuple_(at_value, literal(device), literal(key))


def _keyset_page(session: Session, query, columns, key_pattern: str, limit: int, cursor: str | None,
                 same_device: bool) -> tuple[list, str | None]:
    """``limit`` rows of ``query`` after ``cursor`` in descending (at, device, key) order, and the next cursor
    (None on the last page): one more row than the page is read to know whether another page exists."""
    if cursor is not None:
        query = query.where(_after(columns, *decode_cursor(cursor, key_pattern), same_device=same_device))
    rows = session.scalars(query.order_by(*(c.desc() for c in columns)).limit(limit + 1)).all()
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(*(getattr(rows[-1], c.key) for c in columns))


def query_results(*, session: Session, device: str | None, grade: int | None, referable: bool | None,
                  since: datetime | None, until: datetime | None, limit: int, dme: bool | None = None,
                  cursor: str | None = None) -> tuple[list[Result], str | None]:
    """One page of results, newest first, and the cursor of the next page (None on the last one).

    ``dme``: only results whose DME head found edema (True) or not (False); DR-only results match neither. Every
    filter has an index in this order, so a page reads ``limit + 1`` index entries from the cursor, never the table.
    """
    query = _filtered(select(Result), device=device, grade=grade, referable=referable, since=since, until=until,
                      dme=dme)
    return _keyset_page(session, query, (Result.captured_at, Result.device, Result.result_id), RESULT_ID, limit,
                        cursor, same_device=device is not None)


def query_encounters(*, session: Session, device: str | None, since: datetime | None, until: datetime | None,
                     limit: int, cursor: str | None = None) -> tuple[list[EncounterPublic], str | None]:
    """One page of encounters (results sharing device + encounter_id), newest visit first (by its last capture;
    ``since``/``until`` select on it), each with every capture and the per-visit decision; and the next cursor."""
    query = select(Encounter)
    if device is not None:
        query = query.where(Encounter.device == device)
    if since is not None:
        query = query.where(Encounter.last_captured_at >= since)
    if until is not None:
        query = query.where(Encounter.last_captured_at <= until)
    visits, next_cursor = _keyset_page(session, query, (Encounter.last_captured_at, Encounter.device,
                                                        Encounter.encounter_id), SAFE_ID, limit, cursor,
                                       same_device=device is not None)
    pairs = [(v.device, v.encounter_id) for v in visits]
    rows = session.scalars(select(Result).where(tuple_(Result.device, Result.encounter_id).in_(pairs))).all() if pairs else []
    grouped: dict[tuple[str, str], list[Result]] = {pair: [] for pair in pairs}
    for row in rows:
        grouped[(row.device, row.encounter_id)].append(row)
    visit_rows = {(v.device, v.encounter_id): v for v in visits}
    out = []
    for (dev, encounter), members in grouped.items():
        decision = encounter_decision(members)
        members.sort(key=lambda r: (r.captured_at, r.result_id), reverse=True)
        public = {r.result_id: to_public(r) for r in members}  # each payload parsed once
        eyes = {eye: public[row.result_id] for eye, row in decision.eyes.items()}
        visit = visit_rows[(dev, encounter)]
        final, reason = decision.decision, decision.reason
        if visit.override_decision is not None:
            final, reason = visit.override_decision, f"clinician {visit.override_by}: {visit.override_reason}"
        out.append(EncounterPublic(device=dev, encounter_id=encounter, decision=final, reason=reason,
                                   automatic_decision=decision.decision, automatic_reason=decision.reason,
                                   decided_by=visit.override_by, left=eyes.get("left"), right=eyes.get("right"),
                                   results=list(public.values()), disclaimer=SCREENING_DISCLAIMER))
    return out, next_cursor


def override_encounter(*, session: Session, device: str, encounter_id: str, decision: str, reason: str,
                       clinician: str) -> bool:
    """Record a clinician's decision for a visit; False when the visit does not exist."""
    visit = session.get(Encounter, (device, encounter_id))
    if visit is None:
        return False
    visit.override_decision, visit.override_reason = decision, reason
    visit.override_by, visit.override_at = clinician, datetime.now(timezone.utc)
    return True
