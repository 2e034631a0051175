"""Request/response schemas (pydantic). The result itself is the one wire schema, edge_runtime.wire.ScreeningResult."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_runtime.wire import QualityReport


class SyncEntry(BaseModel):
    """One outbox item. ``result`` is a :class:`edge_runtime.wire.ScreeningResult`, validated item by item (with the
    server's receive time) so that one bad result is rejected on its own instead of blocking the device's batch."""

    model_config = ConfigDict(extra="forbid")

    result: dict[str, Any] = Field(description="a ScreeningResult (edge_runtime.wire), e.g. ScreeningResult.to_dict()")
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    overlay_png_b64: str | None = None
    image_b64: str | None = None


class SyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: list[SyncEntry] = Field(max_length=1000)


class SyncItemStatus(BaseModel):
    result_id: str
    status: Literal["stored", "duplicate", "conflict", "rejected"]
    detail: str = ""


class SyncResponse(BaseModel):
    items: list[SyncItemStatus]


class ResultPublic(BaseModel):
    result_id: str
    device: str
    outcome: str
    grade: int | None
    grade_name: str | None  # derived by the server from the grade
    referable: bool | None  # cross-checked by the server: referable DR (probability >= threshold) or DME present
    referral_reason: str | None = None  # "referable DR", "DME present", both, uncertain, ungradable; None: not referred
    dme_present: bool | None = None  # models with a DME head; None for DR-only models and ungradable captures
    dme_probability: float | None = None
    confidence: float | None
    captured_at: datetime  # the device's clock; the server's receive time when that clock was implausible
    received_at: datetime
    device_clock_skew_s: float | None = None  # set when the device's clock was implausible: its claim - received_at
    encounter_id: str | None
    eye: str | None
    has_overlay: bool
    result: dict[str, Any]  # the stored ScreeningResult (server-derived grade_name and referable above)
    disclaimer: str


class EncounterPublic(BaseModel):
    """One patient visit: the result that counts per eye and the visit's decision."""

    device: str
    encounter_id: str
    decision: Literal["refer", "no_referral", "incomplete"]  # a clinician's override when there is one
    reason: str
    automatic_decision: Literal["refer", "no_referral", "incomplete"]  # the visit rule's (wire.encounter_decision)
    automatic_reason: str
    decided_by: str | None = None  # the clinician who overrode the automatic decision; None: not overridden
    left: ResultPublic | None
    right: ResultPublic | None
    results: list[ResultPublic]  # every capture of the visit (at most MAX_CAPTURES_PER_ENCOUNTER), newest first
    disclaimer: str


class EncountersPublic(BaseModel):
    data: list[EncounterPublic]
    count: int  # encounters on this page (pages are read by key: no total is counted)
    limit: int
    next_cursor: str | None  # pass as ?cursor= for the next (older) page; None on the last page


class ResultsPublic(BaseModel):
    data: list[ResultPublic]
    count: int  # results on this page (pages are read by key: no total is counted)
    limit: int
    next_cursor: str | None  # pass as ?cursor= for the next (older) page; None on the last page


class InsightBody(BaseModel):
    """What an insight must contain, whichever source wrote it."""

    summary: str = Field(min_length=1, max_length=1200)
    follow_up_interval: str = Field(min_length=1, max_length=120)
    referral_urgency: Literal["none", "routine", "soon", "urgent", "retake"]
    caveats: list[str] = Field(default_factory=list, max_length=8)


class InsightPublic(InsightBody):
    result_id: str
    source: Literal["gemini", "guideline"]
    disclaimer: str


class PredictResponse(BaseModel):
    result_id: str
    grade: int | None
    grade_name: str | None
    confidence: float | None
    probabilities: list[float] | None
    referable: bool | None  # referable DR, or DME present (teachers with a DME head)
    referable_probability: float | None = None  # calibrated P(grade >= 2)
    dme_probability: float | None = None  # calibrated P(DME), teachers with a DME head
    dme_present: bool | None = None
    referral_reason: str | None = None
    threshold: float | None = None  # the teacher's operating point (chosen on val at training)
    operating_point: str | None = None  # in words: rule, target, val evidence
    outcome: str
    quality: QualityReport
    model_version: str
    backend: str = "pytorch"
    overlay_png_b64: str | None
    disclaimer: str


class ModelPublic(BaseModel):
    format: str
    filename: str
    sha256: str
    manifest: dict[str, Any]  # as the publisher signed it (signature and release included)
    download_url: str
    uploaded_at: datetime
    size_bytes: int | None  # devices refuse a download longer than this
    sequence: int | None  # the signed release sequence (None: an unsigned development upload)


class EncounterOverride(BaseModel):
    """A clinician's decision for one visit, replacing the automatic one (which stays shown beside it)."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["refer", "no_referral"]
    reason: str = Field(min_length=3, max_length=500, pattern=r"^[^\x00-\x1f\x7f]+$")
