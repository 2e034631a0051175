import json

from fastapi import APIRouter, HTTPException, Query, Request
from sqlalchemy.exc import IntegrityError

from edge_runtime.contract import SCREENING_DISCLAIMER
from edge_runtime.wire import SAFE_ID

from ...insights import make_insight
from ...models import Insight
from ...schemas import InsightBody, InsightPublic
from ..deps import CallerDep, SessionDep, audit
from .results import visible_result

router = APIRouter(prefix="/v1", tags=["insights"])


@router.post("/results/{result_id}/insight", response_model=InsightPublic)
def insight(result_id: str, caller: CallerDep, session: SessionDep, request: Request,
            device: str | None = Query(None, max_length=120, pattern=SAFE_ID)) -> InsightPublic:
    """Clinical follow-up note (Gemini, or the ICO 2017 guideline fallback); cached per result."""
    row = visible_result(session, result_id, caller, device)
    key = (row.device, row.result_id)
    cached = session.get(Insight, key)
    if cached is None:
        payload = json.loads(row.payload)
        body, source = make_insight(request.app.state.settings, row.grade, row.confidence, payload.get("quality", {}),
                                    payload.get("cam_peak"), row.outcome, row.dme_present, row.dme_probability)
        cached = Insight(device=row.device, result_id=row.result_id, source=source, body=body.model_dump_json())
        session.add(cached)
        audit(session, caller, "insight", row.result_id, source)
        try:
            session.commit()
        except IntegrityError:  # a concurrent worker cached it first: use theirs
            session.rollback()
            cached = session.get(Insight, key)
            if cached is None:
                raise HTTPException(503, "could not store the insight; retry", headers={"Retry-After": "1"}) from None
    body = InsightBody.model_validate_json(cached.body)
    return InsightPublic(result_id=row.result_id, source=cached.source, disclaimer=SCREENING_DISCLAIMER, **body.model_dump())
