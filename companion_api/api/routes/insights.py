import json

from fastapi import APIRouter, HTTPException, Request

from edge_runtime.contract import SCREENING_DISCLAIMER

from ...insights import make_insight
from ...models import Insight, Result
from ...schemas import InsightBody, InsightPublic
from ..deps import CallerDep, SessionDep, audit
from .results import _visible

router = APIRouter(prefix="/v1", tags=["insights"])


@router.post("/results/{result_id}/insight", response_model=InsightPublic)
def insight(result_id: str, caller: CallerDep, session: SessionDep, request: Request) -> InsightPublic:
    """Clinical follow-up note (Gemini, or the ICO 2017 guideline fallback); cached per result."""
    row = _visible(session.get(Result, result_id[:36]), caller)
    cached = session.get(Insight, row.result_id)
    if cached is None:
        payload = json.loads(row.payload)
        body, source = make_insight(request.app.state.settings, row.grade, row.confidence, payload.get("quality", {}),
                                    payload.get("cam_peak"), row.outcome)
        cached = Insight(result_id=row.result_id, source=source, body=body.model_dump_json())
        session.add(cached)
        audit(session, caller, "insight", row.result_id, source)
        try:
            session.commit()
        except Exception:  # noqa: BLE001 - a concurrent worker cached it first: use theirs
            session.rollback()
            cached = session.get(Insight, row.result_id)
            if cached is None:
                raise HTTPException(503, "could not store the insight; retry") from None
    body = InsightBody.model_validate_json(cached.body)
    return InsightPublic(result_id=row.result_id, source=cached.source, disclaimer=SCREENING_DISCLAIMER, **body.model_dump())
