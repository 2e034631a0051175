import base64
import json

from fastapi import APIRouter, File, HTTPException, Request, UploadFile

from edge_runtime.contract import GRADE_NAMES, SCREENING_DISCLAIMER
from edge_runtime.errors import ImageError

from ...imaging import DecodeBusyError
from ...models import Result
from ...schemas import PredictResponse
from ..deps import Caller, CallerDep, audit

router = APIRouter(tags=["predict"])


def _grade_and_store(request: Request, caller: Caller, data: bytes):
    """The device's Screener path on the teacher, then the stored result (runs in a worker thread)."""
    from ...grading import screen_upload, teacher_session

    settings = request.app.state.settings
    screening = screen_upload(settings.TEACHER_CHECKPOINT, data, caller.name, settings.MAX_IMAGE_BYTES,
                              settings.MAX_IMAGE_PIXELS)
    record, overlay = screening.result, screening.overlay_png
    with request.app.state.sessionmaker() as session:
        # Every server-side grading is stored and appears in history.
        session.add(Result(result_id=record.result_id, device=caller.name, content_hash=record.content_hash(),
                           payload=json.dumps(record.to_dict()), outcome=record.outcome, grade=record.grade,
                           referable=record.referable, confidence=record.confidence, dme_present=record.dme_present,
                           dme_probability=record.dme_probability, captured_at=record.captured_at,
                           overlay_png=overlay))
        audit(session, caller, "predict", record.result_id)
        session.commit()
    return record, overlay, teacher_session(settings.TEACHER_CHECKPOINT).info.manifest.operating_point


@router.post("/v1/predict", response_model=PredictResponse)
@router.post("/predict", response_model=PredictResponse, include_in_schema=False)
async def predict(caller: CallerDep, request: Request, file: UploadFile = File(...)) -> PredictResponse:
    """Grade an uploaded fundus photo (JPEG, PNG or WebP) with the FP32 teacher through the device's screening path."""
    settings = request.app.state.settings
    data = await file.read(settings.MAX_IMAGE_BYTES + 1)
    if len(data) > settings.MAX_IMAGE_BYTES:
        raise HTTPException(413, f"image over the {settings.MAX_IMAGE_BYTES // 1_000_000} MB limit")
    if not settings.TEACHER_CHECKPOINT:
        raise HTTPException(503, "server-side grading is not configured: set RETINAEDGE_TEACHER_CHECKPOINT")
    try:
        # Off the event loop and bounded: /health and every other request keep answering while photos decode.
        record, overlay, point = await request.app.state.decode_slots.run(_grade_and_store, request, caller, data)
    except ImageError as exc:
        raise HTTPException(422, f"{type(exc).__name__}: {exc}") from exc
    except DecodeBusyError as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc
    grade = record.grade
    return PredictResponse(result_id=record.result_id, grade=grade,
                           grade_name=GRADE_NAMES[grade] if grade is not None else None,
                           confidence=record.confidence, probabilities=record.probabilities, referable=record.referable,
                           referable_probability=record.referable_probability, threshold=record.threshold,
                           dme_probability=record.dme_probability, dme_present=record.dme_present,
                           referral_reason=record.referral_reason,
                           operating_point=point.describe() if record.outcome != "ungradable" else None,
                           outcome=record.outcome, quality=record.quality, model_version=record.model_version,
                           backend=record.backend,
                           overlay_png_b64=base64.b64encode(overlay).decode() if overlay else None,
                           disclaimer=SCREENING_DISCLAIMER)
