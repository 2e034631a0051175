"""The screening result on the wire: ONE strict pydantic v2 model that the device stores and sends and the server stores.

Everything a device writes is untrusted on the server, so the model checks itself: strict types (grade ``"3"`` or
``true`` is an error, not a coercion), finite floats, every free-text field and collection capped, timezone-aware
``captured_at`` normalised to UTC inside a plausible window, and the clinical fields consistent with each other:

- ``graded``/``uncertain`` need a grade, 5 probabilities in [0, 1] summing to 1, the operating threshold and a
  referral flag; ``ungradable`` carries no grade and no probabilities;
- ``referable_probability`` is P(grade >= 2) = sum(probabilities[2:]) and ``referable`` is
  ``referable_probability >= threshold``; the grade agrees with that decision (2-4 exactly when referred for DR) and
  is the most probable grade on its side (``edge_runtime.decision.consistent_grades``);
- ``grade_name`` is derived from the grade, never read from the device;
- models with a DME head add ``dme_probability``, ``dme_present`` and ``dme_threshold`` (all or none, graded and
  uncertain results only), with ``dme_present`` = ``dme_probability >= dme_threshold``; ``referable`` is then
  referable DR *or* DME present (``referral_reason`` says which). DR-only results omit the DME keys entirely, so
  their canonical JSON, and the content hash the server checks, is what it was before DME existed.

Torch-free: the edge runtime, the CLI and the companion server all import it. ``encounter_decision`` is the one
per-visit rule (refer when either eye is referable, uncertain or ungradable).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    computed_field,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from .contract import GRADE_NAMES, NUM_GRADES, REFERABLE_MIN_GRADE, SCREENING_DISCLAIMER
from .decision import referral_reason

# Plausible capture window. The server passes its receive time (and its own allowance) through the validation
# context: ScreeningResult.model_validate(data, context={"received_at": now, "max_future": timedelta(days=1)}).
CAPTURED_AT_MIN = datetime(2000, 1, 1, tzinfo=timezone.utc)
CAPTURED_AT_MAX_FUTURE = timedelta(days=1)
PROBABILITY_SUM_TOLERANCE = 1e-3
DERIVED_TOLERANCE = 1e-4  # rounding on the device (6 decimals) stays far inside this
Outcome = Literal["graded", "uncertain", "ungradable"]
Eye = Literal["left", "right"]
# Device names, encounter ids: letters, digits and . _ : - only (safe in paths, logs, HTML and SQL LIKE).
SAFE_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
RESULT_ID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# The DME head's fields: all absent (DR-only model, or ungradable) or the first three present together.
DME_FIELDS = ("dme_probability", "dme_present", "dme_threshold", "dme_cam_peak")


def _plain_text(value: str) -> str:
    # Lone surrogates cannot be stored (UTF-8) or rendered; control characters have no place in a clinical record.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    if _CONTROL.search(value):
        raise ValueError("text must not contain control characters")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number (no NaN or Infinity)")
    return float(value)


def Text(max_length: int, min_length: int = 0) -> Any:  # noqa: N802 - a type factory, read like a type
    """A strict, length-capped, printable string."""
    return Annotated[StrictStr, Field(min_length=min_length, max_length=max_length), AfterValidator(_plain_text)]


Finite = Annotated[float, Field(strict=True), AfterValidator(_finite)]
UnitFloat = Annotated[float, Field(strict=True, ge=0.0, le=1.0), AfterValidator(_finite)]
Threshold = Annotated[float, Field(strict=True, gt=0.0, lt=1.0), AfterValidator(_finite)]
MetricKey = Annotated[StrictStr, Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False, validate_default=True)


class QualityReport(_Strict):
    """Verdict of the image-quality gate."""

    gradable: StrictBool
    score: UnitFloat  # 0 (unusable) .. 1 (excellent)
    reasons: tuple[Text(300), ...] = Field(default=(), max_length=20)
    metrics: dict[MetricKey, Finite] = Field(default_factory=dict, max_length=32)

    def __init__(self, gradable: Any = None, score: Any = None, reasons: Any = (), metrics: Any = None, /, **data: Any):
        # Positional construction as the former dataclass allowed: QualityReport(True, 0.9, (), {"mean": 1.0}).
        if gradable is not None:
            data.setdefault("gradable", gradable)
        if score is not None:
            data.setdefault("score", score)
        if reasons != ():
            data.setdefault("reasons", tuple(reasons) if isinstance(reasons, list) else reasons)
        if metrics is not None:
            data.setdefault("metrics", metrics)
        super().__init__(**data)

    @field_validator("reasons", mode="before")
    @classmethod
    def _reasons_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value


def _new_id() -> str:
    return str(uuid.uuid4())


def _now() -> datetime:
    return datetime.now(timezone.utc)


class ScreeningResult(_Strict):
    """One graded, uncertain or ungradable capture: what the outbox stores, sync sends and the server keeps."""

    device_id: Text(120, 1)
    model_version: Text(200, 1)
    model_sha256: Annotated[StrictStr, Field(pattern=r"^([0-9a-f]{64})?$")]  # "" only when the artifact had none
    backend: Text(40, 1)
    provider: Text(80)
    quality: QualityReport
    grade: Annotated[StrictInt, Field(ge=0, le=NUM_GRADES - 1)] | None = None  # None when ungradable
    probabilities: tuple[UnitFloat, ...] | None = None  # calibrated, one per ICDR grade
    confidence: UnitFloat | None = None  # probability of the reported grade
    referable: StrictBool | None = None  # referable DR (P(grade >= 2) >= threshold), or DME present
    outcome: Outcome = "graded"
    referable_probability: UnitFloat | None = None  # P(grade >= 2); derived from probabilities when omitted
    threshold: Threshold | None = None
    cam_peak: tuple[UnitFloat, UnitFloat] | None = None  # (x, y) normalised to the original image
    dme_probability: UnitFloat | None = None  # calibrated P(DME); models with a DME head only
    dme_present: StrictBool | None = None  # dme_probability >= dme_threshold
    dme_threshold: Threshold | None = None  # the manifest's dme_operating_point threshold
    dme_cam_peak: tuple[UnitFloat, UnitFloat] | None = None  # (x, y) of the DME CAM maximum, original image
    latency_ms: dict[MetricKey, Annotated[float, Field(strict=True, ge=0.0), AfterValidator(_finite)]] = Field(
        default_factory=dict, max_length=16)
    result_id: Annotated[StrictStr, Field(pattern=RESULT_ID)] = Field(default_factory=_new_id)
    captured_at: datetime = Field(default_factory=_now)
    image_name: Text(255) | None = None  # file name only, never a patient name
    encounter_id: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=SAFE_ID)] | None = None
    eye: Eye | None = None
    disclaimer: Text(500) = SCREENING_DISCLAIMER

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        # grade_name is derived; a device may echo it (to_dict does), but it must agree with the grade.
        if "grade_name" in data:
            name, grade = data.pop("grade_name"), data.get("grade")
            expected = GRADE_NAMES[grade] if type(grade) is int and 0 <= grade < NUM_GRADES else None
            if name != expected:
                raise ValueError(f"grade_name {str(name)[:40]!r} does not match grade {grade!r}; "
                                 "the name is derived from the grade, omit it")
        for key in ("probabilities", "cam_peak", "dme_cam_peak"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        probs = data.get("probabilities")
        if data.get("referable_probability") is None and isinstance(probs, tuple) and len(probs) == NUM_GRADES:
            tail = probs[REFERABLE_MIN_GRADE:]
            if all(type(p) in (int, float) for p in tail):
                data["referable_probability"] = round(min(1.0, max(0.0, float(sum(tail)))), 6)
        return data

    @field_validator("captured_at", mode="before")
    @classmethod
    def _timestamp_text(cls, value: Any) -> Any:
        # Only ISO 8601 text or a datetime: numbers (epoch seconds? milliseconds?) are ambiguous.
        if not isinstance(value, (str, datetime)):
            raise ValueError("captured_at must be an ISO 8601 timestamp with a UTC offset")
        if isinstance(value, str) and len(value) > 40:
            raise ValueError("captured_at is too long for an ISO 8601 timestamp")
        return value

    @field_validator("captured_at")
    @classmethod
    def _plausible_time(cls, value: datetime, info: ValidationInfo) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("captured_at needs a UTC offset (e.g. 2026-01-31T10:00:00+00:00)")
        try:
            value = value.astimezone(timezone.utc)
        except OverflowError:  # 9999-12-31T23:59:59-05:00 is past datetime.max in UTC
            raise ValueError("captured_at is outside the plausible window; check the device clock") from None
        context = info.context or {}
        earliest = context.get("min_captured_at", CAPTURED_AT_MIN)
        latest = context.get("received_at") or _now()
        latest = latest + context.get("max_future", CAPTURED_AT_MAX_FUTURE)
        if not earliest <= value <= latest:
            raise ValueError(f"captured_at {value.isoformat()} is outside the plausible window "
                             f"{earliest.isoformat()} .. {latest.isoformat()}; check the device clock")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ScreeningResult:
        if self.outcome == "ungradable":
            stray = [name for name in ("grade", "probabilities", "confidence", "referable", "referable_probability",
                                       *DME_FIELDS) if getattr(self, name) is not None]
            if stray:
                raise ValueError(f"an ungradable result carries no {', '.join(stray)}")
            return self
        missing = [name for name in ("grade", "probabilities", "referable", "threshold") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.outcome} result needs {', '.join(missing)}")
        probs = self.probabilities
        if len(probs) != NUM_GRADES:
            raise ValueError(f"probabilities must hold {NUM_GRADES} values (one per ICDR grade), got {len(probs)}")
        if abs(sum(probs) - 1.0) > PROBABILITY_SUM_TOLERANCE:
            raise ValueError(f"probabilities must sum to 1 (±{PROBABILITY_SUM_TOLERANCE}), got {sum(probs):.6f}")
        derived = sum(probs[REFERABLE_MIN_GRADE:])
        if abs(self.referable_probability - derived) > DERIVED_TOLERANCE:
            raise ValueError(f"referable_probability {self.referable_probability} != sum(probabilities[2:]) = "
                             f"{derived:.6f}")
        # The grade shown must say what the referral says (edge_runtime.decision.consistent_grades).
        if (self.grade >= REFERABLE_MIN_GRADE) != self.dr_referable:
            raise ValueError(f"grade {self.grade} contradicts the referral decision (referable_probability "
                             f"{self.referable_probability} at threshold {self.threshold}): a referred photo shows "
                             "grade 2-4, one not referred 0-1; update the device software")
        side = probs[REFERABLE_MIN_GRADE:] if self.grade >= REFERABLE_MIN_GRADE else probs[:REFERABLE_MIN_GRADE]
        if probs[self.grade] < max(side) - DERIVED_TOLERANCE:
            raise ValueError(f"grade {self.grade} is not the most probable grade on its side of the referral "
                             f"decision in {list(probs)}")
        if self.confidence is not None and abs(self.confidence - probs[self.grade]) > DERIVED_TOLERANCE:
            raise ValueError(f"confidence {self.confidence} is not the probability of grade {self.grade}")
        self._check_dme()
        if self.referable != (self.dr_referable or bool(self.dme_present)):
            dme = f" and dme_present={self.dme_present}" if self.has_dme else ""
            raise ValueError(f"referable={self.referable} contradicts referable_probability "
                             f"{self.referable_probability} at threshold {self.threshold}{dme}")
        return self

    def _check_dme(self) -> None:
        given = [name for name in DME_FIELDS[:3] if getattr(self, name) is not None]
        if not given:
            if self.dme_cam_peak is not None:
                raise ValueError("dme_cam_peak needs dme_probability, dme_present and dme_threshold")
            return
        if len(given) < 3:
            missing = [name for name in DME_FIELDS[:3] if name not in given]
            raise ValueError(f"a DME result needs dme_probability, dme_present and dme_threshold; missing "
                             f"{', '.join(missing)}")
        if self.dme_present != (self.dme_probability >= self.dme_threshold):
            raise ValueError(f"dme_present={self.dme_present} contradicts dme_probability {self.dme_probability} "
                             f"at dme_threshold {self.dme_threshold}")

    @model_serializer(mode="wrap")
    def _omit_absent_heads(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A DR-only result serialises exactly as before DME existed: same keys, same canonical JSON and hash.
        data = handler(self)
        for name in DME_FIELDS:
            if data.get(name, 0) is None:
                del data[name]
        return data

    @property
    def has_dme(self) -> bool:
        """The result carries a DME finding (a model with a DME head graded it)."""
        return self.dme_present is not None

    @property
    def dr_referable(self) -> bool | None:
        """Referable DR alone: P(grade >= 2) >= threshold; None when ungradable."""
        if self.referable_probability is None or self.threshold is None:
            return None
        return self.referable_probability >= self.threshold

    @property
    def referral_reason(self) -> str | None:
        """Why this result is referred: "referable DR", "DME present", both, "uncertain (second read)", "ungradable";
        None when it is not."""
        return result_referral_reason(self.outcome, self.dr_referable, self.dme_present)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def grade_name(self) -> str | None:
        return None if self.grade is None else GRADE_NAMES[self.grade]

    @field_serializer("captured_at")
    def _iso(self, value: datetime) -> str:
        return value.astimezone(timezone.utc).isoformat()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists, ISO timestamps, derived grade_name); from_dict(to_dict()) == self."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any], **context: Any) -> ScreeningResult:
        """Validate a JSON-ish dict; ``context`` carries the server's receive time and capture window."""
        return cls.model_validate(data, context=context or None)

    def canonical_json(self) -> str:
        """The canonical text of the result (sorted keys): what content_hash covers and the server stores."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def content_hash(self) -> str:
        """Stable hash of the canonical content; the server recomputes it to tell a replay from a conflict."""
        return content_hash_of(self.canonical_json())

    @property
    def needs_referral(self) -> bool:
        """Refer (or get a second read) unless this is a clean, gradable, non-referable result."""
        return self.outcome != "graded" or bool(self.referable)


def result_referral_reason(outcome: str, dr_referable: bool | None, dme_present: bool | None) -> str | None:
    """Why a result is referred, from its outcome and findings (``ScreeningResult.referral_reason``; the server
    calls it with its stored columns); None when it is not referred."""
    if outcome == "ungradable":
        return "ungradable"
    reason = referral_reason(bool(dr_referable), dme_present)
    if outcome == "uncertain":
        return "; ".join(filter(None, ["uncertain (second read)", reason]))
    return reason


def content_hash_of(canonical_json: str) -> str:
    """sha256 of a result's canonical JSON (ScreeningResult.canonical_json)."""
    return hashlib.sha256(canonical_json.encode()).hexdigest()


class EyeResult(Protocol):
    """What the encounter rule reads: a ScreeningResult, or a server row with the same attributes."""

    result_id: str
    outcome: str
    grade: int | None
    referable: bool | None
    dme_present: bool | None  # None: no DME head
    eye: str | None
    captured_at: datetime


@dataclass(frozen=True)
class EncounterDecision:
    """One patient visit: the result shown per eye and what to do."""

    decision: Literal["refer", "no_referral", "incomplete"]
    reason: str
    eyes: dict[str, Any]  # "left"/"right" -> the capture shown for that eye (the one that drives the decision)


def _refers(result: EyeResult) -> bool:
    """A gradable capture that asks for referral: referable, or uncertain (second read)."""
    return result.outcome == "uncertain" or (result.outcome == "graded" and bool(result.referable))


def _shown_key(result: EyeResult) -> tuple:
    # Referable before uncertain, then the higher grade, then the later capture; result_id breaks exact ties, so
    # the choice never depends on the order rows were inserted or read.
    return (result.outcome == "graded" and bool(result.referable), result.grade or 0, result.captured_at,
            result.result_id)


def _state(result: EyeResult) -> str:
    if result.outcome == "ungradable":
        return "ungradable"
    if result.outcome == "uncertain":
        return "uncertain (second read)"
    return "referable" + (" (DME present)" if result.dme_present else "")


def encounter_decision(results: Iterable[EyeResult]) -> EncounterDecision:
    """Per-visit rule: refer if any gradable capture of either eye is referable or uncertain, or an eye has only
    ungradable captures; a capture whose eye is unknown refers the visit when it is referable, uncertain or
    ungradable (it may be either eye).

    A later clean retake never cancels an earlier referable capture of the same eye: every gradable capture counts,
    so the decision depends on the set of captures, not on their timestamps or insert order. A gradable capture
    supersedes ungradable ones of the same eye. With one eye missing and nothing referred, the visit is
    ``incomplete`` (never a clean negative).
    """
    by_eye: dict[str | None, list[EyeResult]] = {"left": [], "right": [], None: []}
    for result in sorted(results, key=lambda r: (r.captured_at, r.result_id)):
        by_eye[result.eye if result.eye in ("left", "right") else None].append(result)
    chosen: dict[str, Any] = {}
    reasons = []
    for eye in ("left", "right"):
        captures = by_eye[eye]
        if not captures:
            continue
        gradable = [r for r in captures if r.outcome != "ungradable"]
        referred = [r for r in gradable if _refers(r)]
        chosen[eye] = max(referred, key=_shown_key) if referred else (gradable or captures)[-1]
        if referred or not gradable:
            reasons.append(f"{eye} eye {_state(chosen[eye])}" + ("" if referred else " after retakes"))
    unknown = [r for r in by_eye[None] if r.outcome == "ungradable" or _refers(r)]
    if unknown:
        worst = max(unknown, key=lambda r: (_refers(r), *_shown_key(r)))
        count = f"{len(unknown)} captures of unknown eye, the worst" if len(unknown) > 1 else "a capture of unknown eye"
        reasons.append(f"{count} {_state(worst)}")
    if reasons:
        return EncounterDecision("refer", "; ".join(reasons), chosen)
    if len(chosen) < 2:
        missing = [eye for eye in ("left", "right") if eye not in chosen]
        return EncounterDecision("incomplete", f"no gradable photo of the {' and '.join(missing)} eye yet", chosen)
    return EncounterDecision("no_referral", "both eyes gradable and not referable", chosen)
