"""Clinical insights: Gemini (google-genai, structured JSON) with an ICO 2017 guideline fallback.

Only grade, confidence, quality and CAM location are sent: no identifiers, no image, no names.
The model's answer is untrusted: it must parse as :class:`InsightBody`, within length limits, as plain text.
"""
from __future__ import annotations

import json
import logging
import re

from pydantic import ValidationError

from edge_runtime.contract import GRADE_NAMES

from .core.config import Settings
from .schemas import InsightBody

log = logging.getLogger(__name__)

# ICO Guidelines for Diabetic Eye Care (2017): follow-up by ICDR grade; low-resource intervals where they differ.
_GUIDELINE = {
    0: ("1-2 years", "1-2 years", "none", "No diabetic retinopathy detected."),
    1: ("6-12 months", "1-2 years", "routine", "Mild non-proliferative DR (microaneurysms only)."),
    2: ("3-6 months", "3-6 months", "soon", "Moderate non-proliferative DR: refer to an ophthalmologist."),
    3: ("< 3 months", "< 3 months", "urgent", "Severe non-proliferative DR: refer promptly."),
    4: ("< 1 month", "< 1 month", "urgent", "Proliferative DR: refer urgently."),
}
_MARKUP = re.compile(r"<[^>]*>|[`*_#]{2,}|https?://\S+")


def guideline_insight(grade: int | None, outcome: str, resource_setting: str = "standard") -> InsightBody:
    """Deterministic fallback from the ICO 2017 follow-up table."""
    if outcome == "ungradable" or grade is None:
        return InsightBody(summary="The photograph could not be graded. Retake it; if a retake also fails, refer "
                                   "for a dilated examination (no result means refer).",
                           follow_up_interval="retake now; refer if a retake fails", referral_urgency="retake",
                           caveats=["Screening aid only; not a diagnosis."])
    standard, low, urgency, text = _GUIDELINE[grade]
    interval = low if resource_setting == "low" else standard
    caveats = ["Screening aid only; not a diagnosis. A clinician must confirm the grade.",
               "Diabetic macular oedema cannot be excluded from a single 2D photograph."]
    return InsightBody(summary=f"{text} Suggested follow-up: {interval} (ICO 2017).", follow_up_interval=interval,
                       referral_urgency=urgency, caveats=caveats)


def build_prompt(grade: int | None, confidence: float | None, quality: dict, cam_peak, resource_setting: str) -> str:
    facts = {
        "icdr_grade": grade, "grade_name": GRADE_NAMES[grade] if grade is not None else None,
        "model_confidence": None if confidence is None else round(float(confidence), 3),
        "image_gradable": bool(quality.get("gradable")), "quality_score": quality.get("score"),
        "activation_peak_xy_normalised": cam_peak, "resource_setting": resource_setting,
    }
    return ("You support a diabetic-retinopathy screening programme. From these model outputs only (no patient data), "
            "write a short plain-text note for the screening nurse following the ICO 2017 guidelines: summary, "
            "follow_up_interval, referral_urgency (none|routine|soon|urgent|retake), caveats. Do not diagnose.\n"
            + json.dumps(facts))


def validate_untrusted(text: str) -> InsightBody:
    """Parse and sanitise the model's answer; raises ValueError when it is unusable."""
    try:
        body = InsightBody.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError, TypeError) as exc:
        raise ValueError(f"invalid insight from model: {str(exc)[:200]}") from exc
    clean = lambda s: _MARKUP.sub("", s).strip()  # noqa: E731 - plain text only: no HTML, links or markdown
    return InsightBody(summary=clean(body.summary), follow_up_interval=clean(body.follow_up_interval),
                       referral_urgency=body.referral_urgency, caveats=[clean(c)[:300] for c in body.caveats])


def gemini_insight(settings: Settings, prompt: str) -> InsightBody:
    from google import genai
    from google.genai import types

    options = types.HttpOptions(timeout=int(settings.GEMINI_TIMEOUT_S * 1000), base_url=settings.GEMINI_BASE_URL)
    client = genai.Client(api_key=settings.GEMINI_API_KEY, http_options=options)
    response = client.models.generate_content(
        model=settings.GEMINI_MODEL, contents=prompt,
        config=types.GenerateContentConfig(response_mime_type="application/json", response_schema=InsightBody,
                                           temperature=0.2, max_output_tokens=800))
    return validate_untrusted(response.text or "")


def make_insight(settings: Settings, grade, confidence, quality: dict, cam_peak, outcome: str) -> tuple[InsightBody, str]:
    """(insight, source). Gemini when a key is configured and it answers validly; the guideline otherwise."""
    if settings.GEMINI_API_KEY and outcome == "graded":
        try:
            prompt = build_prompt(grade, confidence, quality, cam_peak, settings.RESOURCE_SETTING)
            return gemini_insight(settings, prompt), "gemini"
        except Exception as exc:  # noqa: BLE001 - timeout, HTTP error or invalid output: all fall back
            log.warning("Gemini unavailable, using guideline fallback: %s", type(exc).__name__)
    return guideline_insight(grade, outcome, settings.RESOURCE_SETTING), "guideline"
