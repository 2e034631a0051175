import re
from datetime import datetime, timezone
from typing import Literal

from fastapi import APIRouter, HTTPException, Path, Query, Response

from edge_runtime.wire import RESULT_ID, SAFE_ID

from ...crud import (
    InvalidCursorError,
    find_result,
    override_encounter,
    query_encounters,
    query_results,
    to_public,
)
from ...models import Result
from ...schemas import EncounterOverride, EncountersPublic, ResultPublic, ResultsPublic
from ..deps import Caller, CallerDep, ReviewerDep, SessionDep, audit

router = APIRouter(tags=["results"])
ENCOUNTER_PAGE_MAX = 100
DeviceQuery = Query(None, max_length=120, pattern=SAFE_ID, description="reviewers: one device; devices: their own")


def visible_result(session, result_id: str, caller: Caller, device: str | None = None) -> Result:
    """The caller's view of one result. Devices see only their own ids: another device's id is simply not found
    (no oracle). Reviewers pass ``device`` when two devices used the same id."""
    if not re.fullmatch(RESULT_ID, result_id):
        raise HTTPException(404, "result not found")
    if caller.role == "device":
        device = caller.name
    row = find_result(session=session, result_id=result_id, device=device)
    if row is None:
        raise HTTPException(404, "result not found (reviewers: add ?device= when several devices used this id)")
    return row


def _utc(value: datetime | None) -> datetime | None:
    # A timestamp without an offset is read as UTC (say so in the API docs); with one, it is converted.
    if value is None:
        return None
    try:
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:59:59-05:00 is past the last representable UTC instant
        raise HTTPException(422, "since/until is outside the representable range") from None


def _json(page: ResultsPublic | EncountersPublic) -> Response:
    # Built and validated once here; returned as is, FastAPI would validate it again against the response union
    # (both members), which cost more than reading the page from the database.
    return Response(page.model_dump_json(), media_type="application/json")


CursorQuery = Query(None, max_length=400, pattern=r"^[A-Za-z0-9_-]+$",
                    description="next_cursor of the previous page; omit for the newest page")


@router.get("/v1/history", response_model=ResultsPublic | EncountersPublic)
@router.get("/history", response_model=ResultsPublic | EncountersPublic, include_in_schema=False)
def history(caller: CallerDep, session: SessionDep, device: str | None = DeviceQuery,
            grade: int | None = Query(None, ge=0, le=4), referable: bool | None = None,
            dme: bool | None = Query(None, description="DME found (true) or not (false); models with a DME head"),
            since: datetime | None = Query(None, description="ISO 8601; without an offset it is UTC"),
            until: datetime | None = Query(None, description="ISO 8601; without an offset it is UTC"),
            group: Literal["result", "encounter"] = "result", cursor: str | None = CursorQuery,
            limit: int = Query(50, ge=1, le=500)):
    """One page of results (or encounters with ``group=encounter``), newest first; devices see their own,
    reviewers see all. Follow ``next_cursor`` for older pages."""
    if caller.role == "device":
        if device not in (None, caller.name):
            raise HTTPException(403, "devices can read only their own results")
        device = caller.name
    try:
        if group == "encounter":
            # An encounter carries up to MAX_CAPTURES_PER_ENCOUNTER results: its pages are shorter.
            limit = min(limit, ENCOUNTER_PAGE_MAX)
            encounters, next_cursor = query_encounters(session=session, device=device, since=_utc(since),
                                                       until=_utc(until), limit=limit, cursor=cursor)
            audit(session, caller, "history", device, f"{len(encounters)} encounters")
            session.commit()
            return _json(EncountersPublic(data=encounters, count=len(encounters), limit=limit, next_cursor=next_cursor))
        rows, next_cursor = query_results(session=session, device=device, grade=grade, referable=referable,
                                          since=_utc(since), until=_utc(until), limit=limit, dme=dme, cursor=cursor)
    except InvalidCursorError as exc:
        raise HTTPException(422, str(exc)) from None
    audit(session, caller, "history", device, f"{len(rows)} rows")
    session.commit()
    return _json(ResultsPublic(data=[to_public(r) for r in rows], count=len(rows), limit=limit, next_cursor=next_cursor))


@router.get("/v1/results/{result_id}", response_model=ResultPublic)
def get_result(result_id: str, caller: CallerDep, session: SessionDep, device: str | None = DeviceQuery) -> ResultPublic:
    """One result."""
    row = visible_result(session, result_id, caller, device)
    audit(session, caller, "read", result_id)
    session.commit()
    return to_public(row)


@router.get("/v1/results/{result_id}/overlay.png", response_class=Response)
def get_overlay(result_id: str, caller: CallerDep, session: SessionDep, device: str | None = DeviceQuery) -> Response:
    """The CAM overlay PNG of a result."""
    row = visible_result(session, result_id, caller, device)
    if row.overlay_png is None:
        raise HTTPException(404, "this result has no overlay (ungradable capture)")
    return Response(row.overlay_png, media_type="image/png")


@router.post("/v1/encounters/{encounter_id}/decision", status_code=204, response_class=Response)
def decide_encounter(body: EncounterOverride, caller: ReviewerDep, session: SessionDep,
                     encounter_id: str = Path(..., max_length=64, pattern=SAFE_ID),
                     device: str = Query(..., max_length=120, pattern=SAFE_ID)) -> Response:
    """A clinician's decision for one visit (reviewers): it replaces the automatic one, which stays shown."""
    if not override_encounter(session=session, device=device, encounter_id=encounter_id, decision=body.decision,
                              reason=body.reason, clinician=caller.name):
        raise HTTPException(404, "encounter not found (give ?device= of the device that captured it)")
    audit(session, caller, "decide_encounter", f"{device}/{encounter_id}", f"{body.decision}: {body.reason}")
    session.commit()
    return Response(status_code=204)
