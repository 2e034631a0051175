from datetime import datetime

from fastapi import APIRouter, HTTPException, Query, Response

from ...crud import query_results, to_public
from ...models import Result
from ...schemas import ResultPublic, ResultsPublic
from ..deps import Caller, CallerDep, SessionDep, audit

router = APIRouter(tags=["results"])


def _visible(row: Result | None, caller: Caller) -> Result:
    # Devices see only their own results; a foreign id answers 404 so ids cannot be probed.
    if row is None or (caller.role == "device" and row.device != caller.name):
        raise HTTPException(404, "result not found")
    return row


@router.get("/v1/history", response_model=ResultsPublic)
@router.get("/history", response_model=ResultsPublic, include_in_schema=False)
def history(caller: CallerDep, session: SessionDep, device: str | None = Query(None, max_length=120),
            grade: int | None = Query(None, ge=0, le=4), referable: bool | None = None,
            since: datetime | None = None, until: datetime | None = None,
            offset: int = Query(0, ge=0, le=1_000_000), limit: int = Query(50, ge=1, le=500)) -> ResultsPublic:
    """Paginated results; devices see their own, reviewers see all (filter by device, grade, referable, date)."""
    if caller.role == "device":
        if device not in (None, caller.name):
            raise HTTPException(403, "devices can read only their own results")
        device = caller.name
    rows, count = query_results(session=session, device=device, grade=grade, referable=referable, since=since,
                                until=until, offset=offset, limit=limit)
    audit(session, caller, "history", device, f"{len(rows)} rows")
    session.commit()
    return ResultsPublic(data=[to_public(r) for r in rows], count=count, offset=offset, limit=limit)


@router.get("/v1/results/{result_id}", response_model=ResultPublic)
def get_result(result_id: str, caller: CallerDep, session: SessionDep) -> ResultPublic:
    """One result."""
    row = _visible(session.get(Result, result_id[:36]), caller)
    audit(session, caller, "read", result_id)
    session.commit()
    return to_public(row)


@router.get("/v1/results/{result_id}/overlay.png", response_class=Response)
def get_overlay(result_id: str, caller: CallerDep, session: SessionDep) -> Response:
    """The CAM overlay PNG of a result."""
    row = _visible(session.get(Result, result_id[:36]), caller)
    if row.overlay_png is None:
        raise HTTPException(404, "this result has no overlay (ungradable capture)")
    return Response(row.overlay_png, media_type="image/png")
