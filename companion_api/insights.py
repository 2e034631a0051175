"""Clinical insights: Gemini (google-genai, structured JSON) with an ICO 2017 guideline fallback.

Only grade, DME finding, confidence, quality and CAM location are sent: no identifiers, no image, no names.
The model's answer is untrusted: it must parse as :class:`InsightBody`, within length limits, and is reduced to
plain text with a real HTML sanitiser (nh3/ammonia). Urgency and follow-up interval always come from the ICO table
for the grade and the DME finding (DME present refers, whatever the DR grade); an answer that asks for another
urgency than the table, or whose free text claims another urgency or interval, is not shown (guideline fallback),
and a field that is empty after sanitising falls back to the guideline's text.
"""
from __future__ import annotations

import html
import json
import logging
import re

import nh3
from pydantic import ValidationError

from edge_runtime import presentation
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
# ICO 2017: any diabetic macular oedema is referred to an ophthalmologist; centre involvement cannot be told from
# one photograph, so the centre-involving interval (within a month) applies.
_DME = ("< 1 month", "urgent", "Diabetic macular oedema suspected: refer to an ophthalmologist.")
# Free text that claims an urgency: checked against the guideline's, so a note cannot say "no referral needed"
# beside an urgent referral (or "refer immediately" beside none).
_LOW_URGENCY = re.compile(r"(?i)\b(?:no (?:referral|need to refer|further action|retinopathy|diabetic retinopathy|"
                          r"signs? of)|not (?:referable|need(?:ed)? (?:a )?referral|require (?:a )?referral)|"
                          r"does not need|routine (?:screening|follow-up|recall)|normal|annual|every (?:1-2|one|two) "
                          r"years?|in (?:1-2|one|two|12|24) (?:years?|months)|reassur)")
_HIGH_URGENCY = re.compile(r"(?i)\b(?:urgent(?:ly)?|immediate(?:ly)?|emergency|as soon as possible|promptly|"
                           r"within (?:a|one|1|2|two) (?:week|month)s?|refer(?:ral)?\b)")
# After the sanitiser: links and script-capable URL schemes, markdown emphasis, stray angle brackets.
_UNSAFE = re.compile(r"(?i)\b(?:https?|ftp|javascript|vbscript|data|file)\s*:\S*|www\.\S+|[`*_#]{2,}|[<>]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def plain_text(text: str, limit: int) -> str:
    """Untrusted model text -> plain text: every tag dropped (closed or not), no links or schemes, one line."""
    cleaned = html.unescape(nh3.clean(text, tags=set(), attributes={}, strip_comments=True))
    cleaned = _UNSAFE.sub("", _CONTROL.sub(" ", cleaned))
    return " ".join(cleaned.split())[:limit]


def guideline_insight(grade: int | None, outcome: str, resource_setting: str = "standard",
                      dme_present: bool | None = None) -> InsightBody:
    """Deterministic fallback from the ICO 2017 follow-up table; DME present refers within a month at any grade."""
    if outcome == "uncertain" and grade is not None:
        return InsightBody(summary=f"{presentation.UNCERTAIN}: the referable probability is close to the operating "
                                   "threshold.",
                           follow_up_interval="second read now; refer if it cannot be obtained", referral_urgency="soon",
                           caveats=["Screening aid only; not a diagnosis. A clinician must confirm the grade."])
    if outcome == "ungradable" or grade is None:
        return InsightBody(summary=f"{presentation.UNGRADABLE}: the photograph could not be graded; a retake that "
                                   "also fails means a dilated examination (no result means refer).",
                           follow_up_interval="retake now; refer if a retake fails", referral_urgency="retake",
                           caveats=["Screening aid only; not a diagnosis."])
    standard, low, urgency, text = _GUIDELINE[grade]
    interval = low if resource_setting == "low" else standard
    caveats = ["Screening aid only; not a diagnosis. A clinician must confirm the grade."]
    if dme_present:
        interval, urgency, dme_text = _DME
        text = f"{text} {dme_text}"
    elif dme_present is None:
        caveats.append("Diabetic macular oedema cannot be excluded from a single 2D photograph.")
    else:
        caveats.append("The model found no diabetic macular oedema; a single 2D photograph cannot exclude it.")
    return InsightBody(summary=f"{text} Suggested follow-up: {interval} (ICO 2017).", follow_up_interval=interval,
                       referral_urgency=urgency, caveats=caveats)


def contradicts_urgency(text: str, urgency: str) -> bool:
    """Whether free text claims a lower urgency than a referral (or a referral where the guideline has none)."""
    if URGENCY_RANK[urgency] >= URGENCY_RANK["soon"]:
        return bool(_LOW_URGENCY.search(text))
    return bool(_HIGH_URGENCY.search(text))


def build_prompt(grade: int | None, confidence: float | None, quality: dict, cam_peak, resource_setting: str,
                 dme_present: bool | None = None, dme_probability: float | None = None) -> str:
    facts = {
        "icdr_grade": grade, "grade_name": GRADE_NAMES[grade] if grade is not None else None,
        "model_confidence": None if confidence is None else round(float(confidence), 3),
        # null: the model has no DME head (DME neither found nor excluded).
        "diabetic_macular_oedema_present": dme_present,
        "dme_probability": None if dme_probability is None else round(float(dme_probability), 3),
        "image_gradable": bool(quality.get("gradable")), "quality_score": quality.get("score"),
        "activation_peak_xy_normalised": cam_peak, "resource_setting": resource_setting,
    }
    return ("You support a diabetic-retinopathy screening programme. From these model outputs only (no patient data), "
            "write a short plain-text note for the screening nurse following the ICO 2017 guidelines: summary, "
            "follow_up_interval, referral_urgency (none|routine|soon|urgent|retake), caveats. Diabetic macular oedema "
            "present is referred to an ophthalmologist whatever the DR grade. Do not diagnose.\n"
            + json.dumps(facts))


def validate_untrusted(text: str, grade: int | None = None, outcome: str = "graded",
                       resource_setting: str = "standard", dme_present: bool | None = None) -> InsightBody:
    """Parse, sanitise and reconcile the model's answer with the ICO table; raises ValueError when it is unusable:
    invalid, a lower urgency than the table's, or free text that claims another urgency (the field itself is
    replaced by the table's, but the text is what a nurse reads)."""
    try:
        body = InsightBody.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError, TypeError) as exc:
        raise ValueError(f"invalid insight from model: {str(exc)[:200]}") from exc
    guide = guideline_insight(grade, outcome, resource_setting, dme_present)
    if URGENCY_RANK[body.referral_urgency] < URGENCY_RANK[guide.referral_urgency]:
        raise ValueError(f"the model's urgency {body.referral_urgency!r} is lower than the guideline's "
                         f"{guide.referral_urgency!r} for this grade")
    summary = plain_text(body.summary, 1200)
    caveats = [c for c in (plain_text(c, 300) for c in body.caveats) if c]
    if any(contradicts_urgency(t, guide.referral_urgency) for t in (summary, *caveats)):
        raise ValueError(f"the model's text contradicts the guideline's urgency {guide.referral_urgency!r}")
    # The table decides how soon; the model may only explain.
    return InsightBody(summary=summary or guide.summary, follow_up_interval=guide.follow_up_interval,
                       referral_urgency=guide.referral_urgency, caveats=caveats or guide.caveats)


def gemini_insight(settings: Settings, prompt: str, grade: int | None = None, outcome: str = "graded",
                   dme_present: bool | None = None) -> InsightBody:
    from google import genai
    from google.genai import types

    options = types.HttpOptions(timeout=int(settings.GEMINI_TIMEOUT_S * 1000), base_url=settings.GEMINI_BASE_URL)
    client = genai.Client(api_key=settings.GEMINI_API_KEY, http_options=options)
    response = client.models.generate_content(
        model=settings.GEMINI_MODEL, contents=prompt,
        config=types.GenerateContentConfig(response_mime_type="application/json", response_schema=InsightBody,
                                           temperature=0.2, max_output_tokens=800))
    return validate_untrusted(response.text or "", grade, outcome, settings.RESOURCE_SETTING, dme_present)


def make_insight(settings: Settings, grade, confidence, quality: dict, cam_peak, outcome: str,
                 dme_present: bool | None = None, dme_probability: float | None = None) -> tuple[InsightBody, str]:
    """(insight, source). Gemini when a key is configured and it answers validly; the guideline otherwise."""
    if settings.GEMINI_API_KEY and outcome == "graded":
        try:
            prompt = build_prompt(grade, confidence, quality, cam_peak, settings.RESOURCE_SETTING, dme_present,
                                  dme_probability)
            return gemini_insight(settings, prompt, grade, outcome, dme_present), "gemini"
        except Exception as exc:  # noqa: BLE001 - timeout, HTTP error or invalid output: all fall back
            log.warning("Gemini unavailable, using guideline fallback: %s", type(exc).__name__)
    return guideline_insight(grade, outcome, settings.RESOURCE_SETTING, dme_present), "guideline"
