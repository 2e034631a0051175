import base64
import json
import uuid

from fastapi import APIRouter, File, HTTPException, Request, UploadFile

from edge_runtime.contract import GRADE_NAMES, SCREENING_DISCLAIMER
from edge_runtime.errors import ImageError
from edge_runtime.preprocess import decode_image
from edge_runtime.quality import assess
from edge_runtime.wire import QualityReport, ScreeningResult

from ...models import Result
from ...schemas import PredictResponse
from ..deps import CallerDep, SessionDep, audit

router = APIRouter(tags=["predict"])


@router.post("/v1/predict", response_model=PredictResponse)
@router.post("/predict", response_model=PredictResponse, include_in_schema=False)
async def predict(caller: CallerDep, session: SessionDep, request: Request, file: UploadFile = File(...)) -> PredictResponse:
    """Grade an uploaded fundus photo with the FP32 teacher and a full Grad-CAM overlay."""
    settings = request.app.state.settings
    data = await file.read(settings.MAX_IMAGE_BYTES + 1)
    if len(data) > settings.MAX_IMAGE_BYTES:
        raise HTTPException(413, f"image over the {settings.MAX_IMAGE_BYTES // 1_000_000} MB limit")
    try:
        bgr = decode_image(data, settings.MAX_IMAGE_BYTES, settings.MAX_IMAGE_PIXELS)
    except ImageError as exc:
        raise HTTPException(422, f"{type(exc).__name__}: {exc}") from exc
    quality = assess(bgr)
    if not settings.TEACHER_CHECKPOINT:
        raise HTTPException(503, "server-side grading is not configured: set RETINAEDGE_TEACHER_CHECKPOINT")
    graded = None
    if quality.gradable:
        from ...grading import grade_with_gradcam

        try:
            graded = grade_with_gradcam(settings.TEACHER_CHECKPOINT, bgr)
        except ImageError as exc:
            raise HTTPException(422, f"{type(exc).__name__}: {exc}") from exc
    result_id = str(uuid.uuid4())
    quality_report = QualityReport(gradable=quality.gradable, score=float(quality.score),
                                   reasons=tuple(r[:300] for r in quality.reasons), metrics=quality.metrics)
    grade = graded.decision.grade if graded else None
    model_version = graded.model_version if graded else "teacher"
    if graded:
        decision = graded.decision
        clinical = dict(grade=grade, probabilities=decision.probabilities, confidence=decision.confidence,
                        referable_probability=decision.referable_probability, threshold=decision.threshold,
                        referable=decision.referable, outcome=decision.outcome)
        if decision.dme is not None:
            clinical.update(dme_probability=decision.dme.probability, dme_present=decision.dme.present,
                            dme_threshold=decision.dme.threshold)
    else:
        clinical = dict(outcome="ungradable")
    record = ScreeningResult(result_id=result_id, device_id=caller.name, model_version=model_version, model_sha256="",
                             backend="pytorch", provider="cpu", quality=quality_report, **clinical)
    referable = record.referable
    # Every server-side grading is stored and appears in history.
    session.add(Result(result_id=result_id, device=caller.name, content_hash=record.content_hash(),
                       payload=json.dumps(record.to_dict()), outcome=record.outcome, grade=grade, referable=referable,
                       confidence=record.confidence, dme_present=record.dme_present,
                       dme_probability=record.dme_probability, captured_at=record.captured_at,
                       overlay_png=graded.overlay if graded else None))
    audit(session, caller, "predict", result_id)
    session.commit()
    return PredictResponse(result_id=result_id, grade=grade, grade_name=GRADE_NAMES[grade] if grade is not None else None,
                           confidence=record.confidence, probabilities=record.probabilities, referable=referable,
                           referable_probability=record.referable_probability, threshold=record.threshold,
                           dme_probability=record.dme_probability, dme_present=record.dme_present,
                           referral_reason=record.referral_reason,
                           operating_point=graded.point.describe() if graded else None,
                           outcome=record.outcome, quality=quality_report, model_version=model_version,
                           overlay_png_b64=base64.b64encode(graded.overlay).decode() if graded else None,
                           disclaimer=SCREENING_DISCLAIMER)
