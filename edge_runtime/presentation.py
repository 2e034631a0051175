"""How a screening result reads: the one text of each outcome, shown by the CLI, the reviewer page and the insights.

Clinics see the same words wherever a result is shown; the JSON of a result is the wire schema's
(``ScreeningResult.to_dict``), never a second hand-made serialisation.
"""
from __future__ import annotations

from typing import Any

from .contract import SCREENING_DISCLAIMER

UNGRADABLE = "UNGRADABLE - retake, or refer if a retake fails"
UNCERTAIN = "UNCERTAIN - refer or get a second read"
REFER = "REFER"
NO_REFERRAL = "no referral"
NOT_A_DIAGNOSIS = SCREENING_DISCLAIMER


def action(result: Any) -> str:
    """What to do with this capture, in the words every surface uses."""
    if result.outcome == "ungradable":
        return UNGRADABLE
    if result.outcome == "uncertain":
        return UNCERTAIN
    return f"{REFER} ({result.referral_reason})" if result.referable else NO_REFERRAL


def finding(result: Any) -> str:
    """The model's finding: grade, referable probability at the operating point's threshold, DME when present."""
    if result.outcome == "ungradable":
        return "; ".join(result.quality.reasons) or "image quality too low to grade"
    text = (f"grade {result.grade} ({result.grade_name}), P(referable) {result.referable_probability:.2f} at "
            f"threshold {result.threshold:.2f}")
    if result.has_dme:
        text += f", P(DME) {result.dme_probability:.2f} at {result.dme_threshold:.2f}"
    return text


def verdict_text(result: Any) -> str:
    """One line: ``UNGRADABLE - ...: <reasons>`` or ``<finding>: <action>``."""
    if result.outcome == "ungradable":
        return f"{UNGRADABLE}: {finding(result)}"
    return f"{finding(result)}: {action(result)}"


def result_json(result: Any, **extra: Any) -> dict[str, Any]:
    """The wire schema's JSON of ``result`` plus what only this surface knows (e.g. where an overlay was saved)."""
    return {**result.to_dict(), **extra}


def encounter_json(encounter_id: str, decision: Any) -> dict[str, Any]:
    return {"encounter": encounter_id, "decision": decision.decision, "reason": decision.reason,
            "eyes": {eye: r.result_id for eye, r in decision.eyes.items()}}
