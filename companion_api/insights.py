"""Clinical insights: Gemini (google-genai, structured JSON) with an ICO 2017 guideline fallback.

Only grade, confidence, quality and CAM location are sent: no identifiers, no image, no names.
The model's answer is untrusted: it must parse as :class:`InsightBody`, within length limits, and is reduced to
plain text with a real HTML sanitiser (nh3/ammonia). Urgency and follow-up interval always come from the ICO table
for the grade; an answer that asks for less urgency than the table is rejected (guideline fallback), and a field
that is empty after sanitising falls back to the guideline's text.
"""
from __future__ import annotations

import html
import json
import logging
import re

import nh3
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
URGENCY_RANK = {"none": 0, "routine": 1, "soon": 2, "urgent": 3, "retake": 3}
# After the sanitiser: links and script-capable URL schemes, markdown emphasis, stray angle brackets.
_UNSAFE = re.compile(r"(?i)\b(?:https?|ftp|javascript|vbscript|data|file)\s*:\S*|www\.\S+|[`*_#]{2,}|[<>]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def plain_text(text: str, limit: int) -> str:
    """Untrusted model text -> plain text: every tag dropped (closed or not), no links or schemes, one line."""
    cleaned = html.unescape(nh3.clean(text, tags=set(), attributes={}, strip_comments=True))
    cleaned = _UNSAFE.sub("", _CONTROL.sub(" ", cleaned))
    return " ".join(cleaned.split())[:limit]


def guideline_insight(grade: int | None, outcome: str, resource_setting: str = "standard") -> InsightBody:
    """Deterministic fallback from the ICO 2017 follow-up table."""
    if outcome == "uncertain" and grade is not None:
        return InsightBody(summary="The referral decision is uncertain (the referable probability is close to the "
                                   "operating threshold): refer, or get a second read by a grader.",
                           follow_up_interval="second read now; refer if it cannot be obtained", referral_urgency="soon",
                           caveats=["Screening aid only; not a diagnosis. A clinician must confirm the grade."])
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


def validate_untrusted(text: str, grade: int | None = None, outcome: str = "graded",
                       resource_setting: str = "standard") -> InsightBody:
    """Parse, sanitise and reconcile the model's answer with the ICO table; raises ValueError when it is unusable."""
    try:
        body = InsightBody.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError, TypeError) as exc:
        raise ValueError(f"invalid insight from model: {str(exc)[:200]}") from exc
    guide = guideline_insight(grade, outcome, resource_setting)
    if URGENCY_RANK[body.referral_urgency] < URGENCY_RANK[guide.referral_urgency]:
        raise ValueError(f"the model's urgency {body.referral_urgency!r} is lower than the guideline's "
                         f"{guide.referral_urgency!r} for this grade")
    caveats = [c for c in (plain_text(c, 300) for c in body.caveats) if c]
    return InsightBody(summary=plain_text(body.summary, 1200) or guide.summary,
                       # The table decides how soon; the model may only explain.
                       follow_up_interval=guide.follow_up_interval, referral_urgency=guide.referral_urgency,
                       caveats=caveats or guide.caveats)


def gemini_insight(settings: Settings, prompt: str, grade: int | None = None, outcome: str = "graded") -> InsightBody:
    from google import genai
    from google.genai import types

    options = types.HttpOptions(timeout=int(settings.GEMINI_TIMEOUT_S * 1000), base_url=settings.GEMINI_BASE_URL)
    client = genai.Client(api_key=settings.GEMINI_API_KEY, http_options=options)
    response = client.models.generate_content(
        model=settings.GEMINI_MODEL, contents=prompt,
        config=types.GenerateContentConfig(response_mime_type="application/json", response_schema=InsightBody,
                                           temperature=0.2, max_output_tokens=800))
    return validate_untrusted(response.text or "", grade, outcome, settings.RESOURCE_SETTING)


def make_insight(settings: Settings, grade, confidence, quality: dict, cam_peak, outcome: str) -> tuple[InsightBody, str]:
    """(insight, source). Gemini when a key is configured and it answers validly; the guideline otherwise."""
    if settings.GEMINI_API_KEY and outcome == "graded":
        try:
            prompt = build_prompt(grade, confidence, quality, cam_peak, settings.RESOURCE_SETTING)
            return gemini_insight(settings, prompt, grade, outcome), "gemini"
        except Exception as exc:  # noqa: BLE001 - timeout, HTTP error or invalid output: all fall back
            log.warning("Gemini unavailable, using guideline fallback: %s", type(exc).__name__)
    return guideline_insight(grade, outcome, settings.RESOURCE_SETTING), "guideline"
